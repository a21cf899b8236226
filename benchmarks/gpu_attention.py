"""GPU measurements of latent_attention for benchmarks/gpu_check.sh.

Ceilings first (a large device-to-device copy, a large bf16 matmul), then the decode step (append + attend
at B=64, T=4096, Hkv=8, Hq=8 and 32, D=128, bf16) as bytes moved / time against the copy bandwidth, for the
CUDA C++ and Triton backends, and multi-pass training attention (prefix 300, 6 one-token passes, suffix 40,
B=32, 12x64 heads, bf16, fwd+bwd) through KVCache against concatenation + SDPA. Writes gpu_attention.csv and
.json to --out and prints a summary table. --dry-run: the same steps on the CPU at tiny sizes (Triton in the
interpreter), to prove the script without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import torch.nn.functional as F  # noqa: E402

import coconut_kernels  # noqa: E402,F401  (registers torch.ops.coconut.*)

DECODE_TARGET = 0.80  # fraction of the copy bandwidth
MULTIPASS_TARGET = 2.0  # speed-up over concatenation + SDPA


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def timeit(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds per call; on the GPU each sample times `reps` back-to-back calls with events."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(5 if ON_GPU else 1):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


class Results:
    def __init__(self):
        self.rows = []

    def add(self, name, backend, shape, seconds, metric="", value=float("nan"), target="", ok=None, note=""):
        row = dict(name=name, backend=backend, shape=shape, ms=seconds * 1e3 if seconds is not None else float("nan"),
                   metric=metric, value=value, target=target, ok="" if ok is None else ("yes" if ok else "NO"),
                   note=note)
        self.rows.append(row)
        print(f"  {name:<22} {backend:<8} {row['ms']:10.4f} ms  {metric} {value:.4g} {target} {row['ok']} {note}",
              flush=True)

    def skip(self, name, backend, why):
        self.rows.append(dict(name=name, backend=backend, shape="", ms=float("nan"), metric="", value=float("nan"),
                              target="", ok="skipped", note=why))
        print(f"  {name:<22} {backend:<8} skipped: {why}", flush=True)


def ceilings(res: Results, dry: bool, device) -> float:
    n = (1 << 22) if dry else (1 << 30)  # bf16 elements: 8 MiB on CPU, 2 GiB on the GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), reps=3 if dry else 10)
    bw = 2 * src.numel() * src.element_size() / t
    res.add("copy_bandwidth", "torch", f"{n} bf16", t, "GB/s", bw / 1e9)
    m = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    t = timeit(lambda: a @ b, reps=3 if dry else 10)
    res.add("matmul", "torch", f"{m}^3 {str(dtype)[6:]}", t, "TFLOP/s", 2 * m ** 3 / t / 1e12)
    del src, dst, a, b
    return bw


def decode(res: Results, dry: bool, device, copy_bw: float):
    """One decode step per sequence: append the new row at T-1 and attend all T rows."""
    from coconut_kernels.backend import has_cuda_kernels
    from coconut_kernels.triton.latent_attention import kv_cache_append_triton, latent_attention_fwd_triton

    B, T, Hkv, D = (2, 64, 2, 32) if dry else (64, 4096, 8, 128)
    dtype = torch.float32 if dry else torch.bfloat16
    k_cache = torch.randn(B, T, Hkv, D, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    cs = torch.full((B,), T - 1, dtype=torch.int32, device=device)
    for Hq in ((2, 8) if dry else (8, 32)):
        shape = f"B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} {str(dtype)[6:]}"
        q = torch.randn(B, 1, Hq, D, dtype=dtype, device=device)
        k_new = torch.randn(B, 1, Hkv, D, dtype=dtype, device=device)
        v_new = torch.randn_like(k_new)
        moved = 2 * k_cache.numel() * k_cache.element_size() + 2 * q.numel() * q.element_size()
        scale = D ** -0.5

        def cuda_step():
            return torch.ops.coconut.latent_attention(q, k_new, v_new, k_cache, v_cache, cs)

        def triton_step():
            kv_cache_append_triton(k_cache, v_cache, k_new, v_new, cs, None, None, None, None, False)
            return latent_attention_fwd_triton(q, k_cache, v_cache, cs, None, None, None, None, False, scale, True)

        def sdpa_step():  # the floor of plain PyTorch: SDPA over the (already concatenated) cache
            return F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                                  enable_gqa=True)

        # On the CPU (dry run) the compiled op runs its CPU kernel, once the attention branch provides it.
        steps = [("cuda" if device.type == "cuda" else "cpu-op", cuda_step), ("triton", triton_step),
                 ("sdpa", sdpa_step)]
        for backend, fn in steps:
            name = f"decode_Hq{Hq}"
            if backend == "cuda" and device.type == "cuda" and not has_cuda_kernels("latent_attention_fwd"):
                res.skip(name, backend, "extension built without CUDA kernels")
                continue
            try:
                t = timeit(fn, reps=1 if dry else 20)
            except (NotImplementedError, RuntimeError) as e:  # e.g. no CPU kernel in this checkout
                res.skip(name, backend, str(e).splitlines()[0][:100])
                continue
            frac = moved / t / copy_bw
            target = f">= {DECODE_TARGET:.0%} of copy" if backend != "sdpa" else "(reference)"
            res.add(name, backend, shape, t, "frac_of_copy_bw", frac, target,
                    ok=None if backend == "sdpa" or dry else frac >= DECODE_TARGET,
                    note=f"{moved / t / 1e9:.1f} GB/s")


def multipass(res: Results, dry: bool, device):
    """Attention of one layer over a COCONUT step: prefix pass, one-token latent passes, suffix pass; fwd+bwd."""
    if not hasattr(coconut_kernels, "KVCache"):
        res.skip("multipass", "-", "coconut_kernels.KVCache is missing in this checkout (branch `attention` "
                                   "not merged)")
        return
    from coconut_kernels import KVCache, set_backend

    B, H, D, prefix, n_lat, suffix = (2, 2, 16, 12, 3, 5) if dry else (32, 12, 64, 300, 6, 40)
    dtype = torch.float32 if dry else torch.bfloat16
    lengths = [prefix] + [1] * n_lat + [suffix]
    total = sum(lengths)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(n):
        return torch.randn(B, n, H, D, dtype=dtype, device=device, generator=g).requires_grad_()

    qkv = [(rnd(n), rnd(n), rnd(n)) for n in lengths]
    grads = [torch.randn(B, n, H, D, dtype=dtype, device=device, generator=g) for n in lengths]
    shape = f"B{B} H{H}x{D} {prefix}+{n_lat}x1+{suffix} {str(dtype)[6:]}"
    cache = KVCache(1, B, total, H, D, dtype=dtype, device=device)

    def ours():
        cache.reset()
        outs = []
        for (q, k, v), n in zip(qkv, lengths):
            outs.append(cache.attend(0, q, k, v))
            cache.advance(n)
        torch.autograd.backward(outs, grads)

    def concat():  # what the official code does through HF: concatenate the past and attend, every pass
        outs, k_all, v_all = [], None, None
        for q, k, v in qkv:
            k_all = k if k_all is None else torch.cat([k_all, k], 1)
            v_all = v if v_all is None else torch.cat([v_all, v], 1)
            n, past = q.shape[1], k_all.shape[1] - q.shape[1]
            # Causal aligned bottom-right: query i sees keys <= past + i.
            mask = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                               attn_mask=mask)
            outs.append(o.transpose(1, 2))
        torch.autograd.backward(outs, grads)

    t_ref = timeit(concat, reps=1 if dry else 5)
    res.add("multipass_fwd_bwd", "concat", shape, t_ref, note="concatenation + SDPA")
    backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    for backend in backends:
        if device.type == "cuda":
            set_backend(backend)
        try:
            t = timeit(ours, reps=1 if dry else 5)
        except (NotImplementedError, RuntimeError) as e:
            res.skip("multipass_fwd_bwd", backend, str(e).splitlines()[0][:100])
            continue
        finally:
            set_backend(None)
        speedup = t_ref / t
        res.add("multipass_fwd_bwd", backend, shape, t, "speedup_vs_concat", speedup,
                f">= {MULTIPASS_TARGET:g}x", ok=None if dry else speedup >= MULTIPASS_TARGET)
    if device.type == "cuda":
        for name, fn in (("concat", concat), ("ours", ours)):
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            print(f"  peak memory {name}: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_results")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreted)")
    args = ap.parse_args(argv)
    if not ON_GPU and not args.dry_run:
        sys.exit("no CUDA device: run with --dry-run to exercise the script on the CPU")
    device = torch.device("cuda" if ON_GPU and not args.dry_run else "cpu")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    res = Results()
    print(f"== gpu_attention on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (dry run)'}")
    copy_bw = ceilings(res, args.dry_run, device)
    decode(res, args.dry_run, device, copy_bw)
    multipass(res, args.dry_run, device)

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), dry_run=args.dry_run,
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    with open(os.path.join(args.out, "gpu_attention.json"), "w") as f:
        json.dump(dict(meta=meta, rows=res.rows), f, indent=1, default=str)
    cols = ["name", "backend", "shape", "ms", "metric", "value", "target", "ok", "note"]
    with open(os.path.join(args.out, "gpu_attention.csv"), "w") as f:
        f.write(",".join(cols + list(meta)) + "\n")
        for r in res.rows:
            f.write(",".join(str(r[c]).replace(",", ";") for c in cols) + "," +
                    ",".join(str(v).replace(",", ";") for v in meta.values()) + "\n")
    print("\n== summary (" + ", ".join(f"{k}={v}" for k, v in meta.items()) + ")")
    print(f"{'measurement':<22} {'backend':<8} {'ms':>10}  {'metric':<18} {'value':>8}  {'target':<20} ok")
    for r in res.rows:
        print(f"{r['name']:<22} {r['backend']:<8} {r['ms']:10.4f}  {r['metric']:<18} {r['value']:8.4g}  "
              f"{r['target']:<20} {r['ok']} {r['note']}")
    return 1 if any(r["ok"] == "NO" for r in res.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
