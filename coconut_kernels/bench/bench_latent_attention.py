"""latent_attention on CPU: multi-pass training through KVCache vs concatenating the cache every pass (what HF
past_key_values does) vs one causal SDPA over the whole sequence (the floor), and decode vs SDPA on the
cache slice. `python -m coconut_kernels.bench.bench_latent_attention` prints the table (the suite's runner,
`python -m coconut_kernels.bench --scenario latent_attention`, runs the same cases); pytest-benchmark too:
`python -m pytest coconut_kernels/bench/bench_latent_attention.py --benchmark-only`.
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F

from coconut_kernels import KVCache
from coconut_kernels.cache import deferred_kv_grads, set_deferred_kv_grads
from coconut_kernels.ops.latent_attention import latent_attention

from .harness import Case, Scenario, register, saved_bytes, switched, time_step

# GPT-2 heads, ProsQA-like pass structure: a prefix, one-token latent passes, a suffix.
B, H, D = 32, 12, 64
PREFIX, N_LATENT, SUFFIX = 300, 6, 40
LENGTHS = [PREFIX] + [1] * N_LATENT + [SUFFIX]
TOTAL = sum(LENGTHS)


def make_passes(dtype=torch.float32, seed=0, device="cpu", batch=B, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(batch, S, H, D, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3))
            for S in lengths]


def _sdpa(q, k, v, mask=None, is_causal=False):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=is_causal)
    return out.transpose(1, 2)


def train_concat(passes):
    """The reference way: concatenate the past K/V with the new rows in every pass (each copy kept for
    backward), then SDPA with the causal mask aligned bottom-right."""
    K = V = None
    outs = []
    for q, k, v in passes:
        K = k if K is None else torch.cat((K, k), 1)
        V = v if V is None else torch.cat((V, v), 1)
        T, S = K.shape[1], q.shape[1]
        mask = None if S == 1 else (torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None]).to(q.device)
        outs.append(_sdpa(q, K, V, mask))
    return outs


def train_cache(passes, cache):
    cache.reset()
    outs = []
    for q, k, v in passes:
        outs.append(cache.attend(0, q, k, v))
        cache.advance(q.shape[1])
    return outs


def train_floor(full):
    return [_sdpa(*full, is_causal=True)]


def step(outs):
    sum(o.float().sum() for o in outs).backward()


def run_training(reps=5):
    passes = make_passes()
    g = torch.Generator().manual_seed(1)
    full = tuple(torch.randn(B, TOTAL, H, D, generator=g).requires_grad_() for _ in range(3))
    cache = KVCache(1, B, TOTAL, H, D)
    cases = {
        "concat + SDPA per pass": lambda: step(train_concat(passes)),
        "KVCache (latent_attention)": lambda: step(train_cache(passes, cache)),
        "one causal SDPA (floor)": lambda: step(train_floor(full)),
    }
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(reps):  # interleaved, so that load changes on a shared machine hit every case alike
        for name, fn in cases.items():
            times[name] += time_step(fn, 1, 0, torch.device("cpu"))
    one_cache = 2 * B * TOTAL * H * D * 4
    # q, out (fp32) and lse of every token: saved by every method, the new tokens' own activations.
    own = 2 * B * TOTAL * H * D * 4 + B * H * TOTAL * 4
    mem = {
        "concat + SDPA per pass": saved_bytes(lambda: train_concat(passes)),
        # the cache's own buffers plus what autograd keeps (each pass's q, out, lse)
        "KVCache (latent_attention)": saved_bytes(lambda: train_cache(passes, cache)) + one_cache,
        "one causal SDPA (floor)": saved_bytes(lambda: train_floor(full)),
    }
    return {name: (statistics.median(ts), mem[name], mem[name] - own) for name, ts in times.items()}, one_cache


def run_decode(reps=15):
    rows = {}
    for L in (512, 2048):
        g = torch.Generator().manual_seed(L)
        kc, vc = (torch.randn(B, L, H, D, generator=g) for _ in range(2))
        q, kn, vn = (torch.randn(B, 1, H, D, generator=g) for _ in range(3))
        seqlens = torch.full((B,), L - 1, dtype=torch.int32)
        scale = D ** -0.5
        cases = {
            "latent_attention_fwd": lambda: torch.ops.coconut.latent_attention_fwd(
                q, kc, vc, seqlens, None, None, None, None, False, scale, True),
            "latent_attention (append + fwd)": lambda: latent_attention(q, kn, vn, kc, vc, seqlens),
            "SDPA on the cache slice": lambda: _sdpa(q, kc[:, :L], vc[:, :L]),
        }
        times = {name: [] for name in cases}
        with torch.no_grad():
            for fn in cases.values():
                fn()
            for _ in range(reps):
                for name, fn in cases.items():
                    times[name] += time_step(fn, 1, 0, torch.device("cpu"))
        rows[L] = {name: statistics.median(ts) for name, ts in times.items()}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"\nTraining, attention only, fp32: B={B}, {H} heads x {D}, passes {PREFIX} + {N_LATENT} x 1 + {SUFFIX} "
          f"= {TOTAL} tokens, forward + backward, median of {args.reps}")
    train, one_cache = run_training(args.reps)
    floor = train["one causal SDPA (floor)"][0]
    print(f"| method | time (ms) | x floor | kept for backward (MB) | of which K/V (MB) | K/V x one cache "
          f"({one_cache / 2**20:.0f} MB) |")
    print("|---|---|---|---|---|---|")
    for name, (t, m, kv) in train.items():
        print(f"| {name} | {t * 1e3:.0f} | {t / floor:.2f} | {m / 2**20:.0f} | {kv / 2**20:.0f} | {kv / one_cache:.2f} |")
    print("(kept for backward: distinct storages packed by saved_tensors_hooks, plus the KVCache buffers; K/V = that "
          "minus every token's q, out and lse. KVCache's backward also allocates fp32 dK/dV accumulators, one "
          "cache per layer, freed when the first pass's backward ends.)")
    print(f"\nDecode, fp32: Sq=1, B={B}, {H} heads x {D}, median of {3 * args.reps}")
    print("| cache length | latent_attention_fwd (ms) | append + fwd (ms) | SDPA on cache slice (ms) | fwd / SDPA |")
    print("|---|---|---|---|---|")
    for L, r in run_decode(3 * args.reps).items():
        f, c, s = r["latent_attention_fwd"], r["latent_attention (append + fwd)"], r["SDPA on the cache slice"]
        print(f"| {L} | {f * 1e3:.1f} | {c * 1e3:.1f} | {s * 1e3:.1f} | {f / s:.2f} |")


# ---- the runner's scenario (python -m coconut_kernels.bench --scenario latent_attention) -----------------------------


def cases(settings):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    batch = 4 if quick else B
    lengths = [60, 1, 1, 1, 1, 1, 1, 10] if quick else LENGTHS
    total = sum(lengths)
    label = f"{lengths[0]}+{len(lengths) - 2}x1+{lengths[-1]}"
    reps = 2 if quick else 5
    one_cache = 2 * batch * total * H * D * torch.finfo(dtype).bits // 8

    def passes():
        return make_passes(dtype, device=device, batch=batch, lengths=lengths)

    def concat():
        p = passes()
        return lambda: step(train_concat(p))

    def cached():
        p, cache = passes(), KVCache(1, batch, total, H, D, dtype=dtype, device=device)
        return lambda: step(train_cache(p, cache))

    def floor():
        g = torch.Generator().manual_seed(1)
        full = tuple(torch.randn(batch, total, H, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        return lambda: step(train_floor(full))

    # The cache is built in setup, before the measured step: count its buffers with what the step allocates.
    yield Case("latent_attention", "concat + SDPA per pass", "passes", label, concat, role="reference", reps=reps)
    yield Case("latent_attention", "KVCache", "passes", label, cached, reps=reps,
               extra={"memory_extra_bytes": one_cache})
    yield Case("latent_attention", "one causal SDPA (floor)", "passes", label, floor, role="floor", reps=reps)
    if device.type == "cpu":  # the deferred one-row gradients (cache._DeferredRows) are the CPU kernels'
        yield from _deferral_cases(device, dtype, quick, reps)
    for L in ([128] if quick else [512, 2048]):
        def inputs(L=L):
            g = torch.Generator().manual_seed(L)
            kc, vc = (torch.randn(batch, L, H, D, generator=g).to(device, dtype) for _ in range(2))
            q = torch.randn(batch, 1, H, D, generator=g).to(device, dtype)
            return q, kc, vc, torch.full((batch,), L - 1, dtype=torch.int32, device=device)

        def ours(L=L):
            q, kc, vc, seqlens = inputs(L)
            return lambda: torch.ops.coconut.latent_attention_fwd(q, kc, vc, seqlens, None, None, None, None, False,
                                                                  D ** -0.5, True)

        def sdpa(L=L):
            q, kc, vc, _ = inputs(L)
            return lambda: _sdpa(q, kc, vc)

        yield Case("latent_attention_decode", "latent_attention_fwd", "cache", L, ours, reps=3 * reps,
                   extra={"memory": False})
        yield Case("latent_attention_decode", "SDPA on the cache slice", "cache", L, sdpa, role="floor",
                   reps=3 * reps, extra={"memory": False})


def _deferral_cases(device, dtype, quick, reps):
    """Many thoughts at a training step's batch: a prefix, one-row passes, a suffix through KVCache, with each
    one-row pass's gradient of the prefix rows deferred to one product (the default) and added pass by pass."""
    batch = 2 if quick else 8
    lengths = [60, *[1] * 8, 10] if quick else [PREFIX, *[1] * 64, SUFFIX]
    total = sum(lengths)
    label = f"{lengths[0]}+{len(lengths) - 2}x1+{lengths[-1]}, B={batch}"

    def run(defer: bool):
        p, cache = make_passes(dtype, device=device, batch=batch, lengths=lengths), \
            KVCache(1, batch, total, H, D, dtype=dtype, device=device)
        return switched(set_deferred_kv_grads, deferred_kv_grads, defer, lambda: step(train_cache(p, cache)))

    yield Case("latent_attention", "KVCache", "passes", label, lambda: run(True), reps=reps,
               extra={"memory": False})
    yield Case("latent_attention", "KVCache, one-row gradients added per pass", "passes", label,
               lambda: run(False), role="reference", reps=reps, extra={"memory": False})


SCENARIO = register(Scenario("latent_attention", f"attention alone, B={B}, {H}x{D} heads: multi-pass training "
                                                 "fwd+bwd, and decode (Sq=1)", cases))


# ---- pytest-benchmark -----------------------------------------------------------------------------------------


def _bench(benchmark, fn):
    torch.set_num_threads(2)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


def test_train_concat_sdpa(benchmark):
    passes = make_passes()
    _bench(benchmark, lambda: step(train_concat(passes)))


def test_train_kvcache(benchmark):
    passes, cache = make_passes(), KVCache(1, B, TOTAL, H, D)
    _bench(benchmark, lambda: step(train_cache(passes, cache)))


def test_train_floor(benchmark):
    full = tuple(torch.randn(B, TOTAL, H, D).requires_grad_() for _ in range(3))
    _bench(benchmark, lambda: step(train_floor(full)))


def test_decode(benchmark):
    L = 2048
    kc, vc, q = torch.randn(B, L, H, D), torch.randn(B, L, H, D), torch.randn(B, 1, H, D)
    seqlens = torch.full((B,), L - 1, dtype=torch.int32)
    _bench(benchmark, lambda: torch.ops.coconut.latent_attention_fwd(q, kc, vc, seqlens, None, None, None, None,
                                                                      False, D ** -0.5, True))


def test_decode_sdpa(benchmark):
    L = 2048
    kc, vc, q = torch.randn(B, L, H, D), torch.randn(B, L, H, D), torch.randn(B, 1, H, D)
    _bench(benchmark, lambda: _sdpa(q, kc, vc))


if __name__ == "__main__":
    main()
