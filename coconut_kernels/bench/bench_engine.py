"""Continuous batching (`LatentEngine`) vs static batches of `LatentLM.generate` vs `transformers` generate of
an explicit-CoT answer, on a mixed workload; and the cost of a latent step against a token step.

Scenario `engine` (x: n, samples per prompt): ProsQA-shaped prompts `question <bot> <latent>*k <eot>` with k
drawn from [0, 16] and an answer length m from [4, max answer] per prompt; EOS disabled, so every sample
decodes exactly m tokens. Every provider gets all requests at t=0.
- coconut_kernels engine: every request through max_batch slots, each with its own max_tokens (n=8: one
  request of n=8 samples per prompt, seeded);
- static generate: `generate` over batches of max_batch rows in input order, each batch until its longest
  answer (n=8: each prompt repeated 8 times in its batch);
- transformers: `GPT2LMHeadModel.generate` (same weights, KV cache) of the question up to <bot>, k + 1 + m
  new tokens per row (the explicit-CoT answer of the same total length: the thoughts spelled out as
  tokens), static batches as above (n=8: num_return_sequences=8);
- engine, n requests of n=1 (n=8 only): the same 8 samples as 8 independent requests (8 prefills), all sent
  at t=0; and "one at a time": each sent when the previous has finished (a client without batching).
Rate: positions generated per second, k + 1 + m per sample for every provider (a static batch's extra steps
past a sample's length do not count). Per-request latency (t=0 to the request's last sample) p50 and p99.

Scenario `engine_step`: one engine step of max_batch slots that all think (a latent step: the fed-back
vector, hidden feedback, fixed count) vs one where all decode tokens, ProsQA-length contexts.

The suite (`python -m coconut_kernels.bench --scenario engine`) runs a reduced workload; `--full` there, or
this module's command, the full one (256 prompts, answers 4-128, 32 slots):

    python -m coconut_kernels.bench.bench_engine [--full] [--out benchmarks/out]
"""
from __future__ import annotations

import random
import time

import torch

from coconut_kernels import LatentLM

from .harness import Case, Scenario, register
from .workloads import Special, collate, make_models

VOCAB = 50257
NEVER = -1  # an EOS id no token has
MAX_LATENTS = 16


def workload(n_prompts: int, max_answer: int, q_len=(280, 330), seed: int = 0, vocab: int = VOCAB):
    """[(prompt ids, k latents, answer length)] of n_prompts ProsQA-shaped prompts."""
    sp, rng = Special.for_vocab(vocab), random.Random(seed)
    out = []
    for _ in range(n_prompts):
        k = rng.randint(0, MAX_LATENTS)
        q = [rng.randrange(vocab - 4) for _ in range(rng.randint(*q_len))]
        out.append((q + [sp.bot] + [sp.latent] * k + [sp.eot], k, rng.randint(4, max_answer)))
    return out


def _sizes(settings: dict) -> dict:
    full, quick = settings.get("full"), settings["quick"]
    if full:
        return dict(size=settings.get("model") or "gpt2-4x256", prompts=256, max_batch=32, max_answer=128,
                    q_len=(280, 330), reps=3)
    if quick:
        return dict(size="gpt2-tiny", prompts=8, max_batch=8, max_answer=16, q_len=(40, 60), reps=2)
    return dict(size=settings.get("model") or "gpt2-4x256", prompts=16, max_batch=8, max_answer=64,
                q_len=(280, 330), reps=2)


class _Latency:
    """Per-request latencies of the last timed run, read after the timing (the rows' p50/p99)."""

    def __init__(self):
        self.last: list[float] = []

    def quantile(self, q: float) -> float:
        """The q-quantile (nearest rank) of the last run's latencies."""
        xs = sorted(self.last)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _providers(cfg: dict, n: int, device, dtype) -> list[tuple]:
    """(name, role, setup, latency record, positions generated) per provider at n samples per prompt."""
    state = {}
    max_batch = cfg["max_batch"]
    per_prompt = max(1, cfg["prompts"] // n)  # about the same number of samples at n=1 and n=8

    def build():
        if not state:
            hf, ours = make_models(cfg["size"], VOCAB, dtype=dtype, device=device)
            sp = Special.for_vocab(VOCAB)
            state.update(hf=hf, sp=sp, lm=LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER))
        return state

    work = workload(per_prompt, cfg["max_answer"], cfg["q_len"])
    positions = n * sum(k + 1 + m for _, k, m in work)

    def engine(independent: bool, lat: _Latency, one_at_a_time: bool = False):
        from coconut_kernels.engine import LatentEngine, SamplingParams

        def setup():
            lm = build()["lm"]
            max_tokens = max(len(p) + m for p, _, m in work) + 1
            # no log-probs: generate and transformers report none (an RL rollout would ask for them)
            sample = dict(do_sample=True, temperature=1.0, logprobs=False) if n > 1 else dict(logprobs=False)

            def run():
                eng = LatentEngine(lm, max_batch, max_tokens)
                t0, owner = time.perf_counter(), {}
                if one_at_a_time:  # each sample a request of its own, the next sent when it has finished
                    lat.last = []
                    for i, (p, _, m) in enumerate(work):
                        for j in range(n):
                            (res,) = eng.generate([p], SamplingParams(max_tokens=m, seed=i * n + j, **sample))
                            assert res.error is None, res.error
                        lat.last.append(time.perf_counter() - t0)
                    return
                for i, (p, _, m) in enumerate(work):
                    if independent:  # sample j of prompt i: the seed the n-sample request gives it
                        for j in range(n):
                            owner[eng.add(p, SamplingParams(max_tokens=m, seed=i * n + j, **sample))] = i
                    else:
                        owner[eng.add(p, SamplingParams(n=n, max_tokens=m, seed=i * n, **sample))] = i
                left, done = {i: 0 for i in range(len(work))}, {}
                for i in owner.values():
                    left[i] += 1
                while eng.has_unfinished():
                    for res in eng.step():
                        assert res.error is None, res.error
                        i = owner[res.request_id]
                        left[i] -= 1
                        if not left[i]:
                            done[i] = time.perf_counter() - t0
                lat.last = list(done.values())
            return run
        return setup

    def static(lat: _Latency):
        def setup():
            lm = build()["lm"]
            gen = torch.Generator(device=device)

            def run():
                t0, lat.last = time.perf_counter(), []
                rows = [(p, m) for p, _, m in work for _ in range(n)]
                for i in range(0, len(rows), max_batch):
                    chunk = rows[i:i + max_batch]
                    b = collate([{"input_ids": p} for p, _ in chunk], VOCAB, layout="ragged", device=device)
                    lm.generate(b["input_ids"], b["attention_mask"], max_new_tokens=max(m for _, m in chunk),
                                do_sample=n > 1, generator=gen.manual_seed(i))
                    lat.last += [time.perf_counter() - t0] * max(1, len(chunk) // n)
            return run
        return setup

    def transformers(lat: _Latency):
        from .bench_generate import left_padded

        def setup():
            s = build()
            hf, sp = s["hf"], s["sp"]
            plain = [(p[:p.index(sp.bot) + 1], k + 1 + m) for p, k, m in work]
            per_batch = max(1, max_batch // n)

            def run():
                t0, lat.last = time.perf_counter(), []
                for i in range(0, len(plain), per_batch):
                    chunk = plain[i:i + per_batch]
                    ids, mask = left_padded([{"input_ids": p} for p, _ in chunk], sp.pad, device)
                    steps = max(t for _, t in chunk)
                    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                do_sample=n > 1, num_return_sequences=n, num_beams=1, use_cache=True,
                                pad_token_id=sp.pad)
                    lat.last += [time.perf_counter() - t0] * len(chunk)
            return run
        return setup

    factories = [("coconut_kernels engine", "impl", lambda lat: engine(False, lat)),
                 ("static generate", "reference", static),
                 ("transformers (explicit CoT)", "external", transformers)]
    if n > 1:
        factories.append((f"engine, {n} requests of n=1", "other", lambda lat: engine(True, lat)))
        factories.append((f"engine, {n} requests of n=1 one at a time", "other",
                          lambda lat: engine(True, lat, one_at_a_time=True)))
    out = []
    for name, role, factory in factories:
        lat = _Latency()
        out.append((name, role, factory(lat), lat, positions))
    return out


def cases(settings: dict):
    device, dtype = settings["device"], settings["dtype"]
    cfg = _sizes(settings)
    for n in (1, 8):
        for name, role, setup, lat, positions in _providers(cfg, n, device, dtype):
            yield Case("engine", name, "n", n, setup, role=role, reps=cfg["reps"], warmup=1,
                       extra={"memory": False, "metric:tokens/s": (positions, "tok/s"),
                              "observed": {"latency p50": ("s", lambda q=lat: q.quantile(0.5)),
                                           "latency p99": ("s", lambda q=lat: q.quantile(0.99))}})


ENGINE = register(Scenario("engine", "continuous batching vs static generate vs transformers CoT, mixed "
                                     "ProsQA workload (latents 0-16), positions/s and request latency", cases,
                           x_label="n"))


def step_cases(settings: dict):
    """An engine of max_batch slots brought to the wanted phase; each timed call is one engine.step()."""
    from coconut_kernels.engine import LatentEngine, SamplingParams

    device, dtype = settings["device"], settings["dtype"]
    cfg = _sizes(settings)
    B = cfg["max_batch"]

    def setup(thinking: bool):
        def build():
            _, ours = make_models(cfg["size"], VOCAB, dtype=dtype, device=device)
            sp = Special.for_vocab(VOCAB)
            lm = LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER)
            rng = random.Random(0)
            k = 64 if thinking else 0  # enough thoughts (or tokens) for the warm-up and every repetition
            eng = LatentEngine(lm, B, 400 + k + 64 + 1)
            for _ in range(B):
                q = [rng.randrange(VOCAB - 4) for _ in range(rng.randint(*cfg["q_len"]))]
                eng.add(q + [sp.bot] + [sp.latent] * k + [sp.eot], SamplingParams(max_tokens=64))
            for _ in range(3):  # prefill, then the first steps of the phase
                eng.step()
            return eng.step
        return build

    yield Case("engine_step", "token step", "B", B, setup(False), role="reference", reps=10, warmup=2,
               extra={"memory": False})
    yield Case("engine_step", "latent step", "B", B, setup(True), role="impl", reps=10, warmup=2,
               extra={"memory": False})


STEP = register(Scenario("engine_step", "one engine step: every slot thinking (latent step) vs every slot "
                                        "decoding a token", step_cases))


def main(argv=None) -> int:
    """Both scenarios through the suite's runner (its table, CSV with provenance, JSON and plots), then the
    latency and rate plot of `engine` (engine_latency.png beside the CSV). Arguments: the suite's."""
    import sys
    from pathlib import Path

    from . import __main__ as suite

    args = sys.argv[1:] if argv is None else list(argv)
    rc = suite.main(["--scenario", "engine", "--scenario", "engine_step", *args])
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path("benchmarks/out")
    if rc == 0 and (out / "results.csv").exists():
        rows = suite.read_rows(out / "results.csv")
        table = [["case", "provider", "latency p50", "latency p99"]]
        for r in rows:
            if r["metric"] == "latency p50":
                p99 = next(q for q in rows if q["metric"] == "latency p99" and q["provider"] == r["provider"]
                           and q["x_value"] == r["x_value"])
                table.append([f"engine n={r['x_value']}", r["provider"], f"{r['p50']:.3g} s", f"{p99['p50']:.3g} s"])
        print("\n" + suite.format_table(table))
        print(f"wrote {plot_latency(rows, out)}")
    return rc


def plot_latency(rows: list[dict], out) -> object:
    """engine_latency.png: positions/s and request latency p50/p99 per provider at each n, stamped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .__main__ import stamp

    sub = [r for r in rows if r["scenario"] == "engine"]
    provs = list(dict.fromkeys(r["provider"] for r in sub))
    ns = list(dict.fromkeys(str(r["x_value"]) for r in sub))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, metric in zip(axes, ("tokens/s", "latency p50", "latency p99")):
        width = 0.8 / len(provs)
        for j, prov in enumerate(provs):
            vals = {str(r["x_value"]): r["p50"] for r in sub if r["provider"] == prov and r["metric"] == metric}
            xs = [i + j * width for i, n in enumerate(ns) if n in vals]
            ax.bar(xs, [vals[n] for n in ns if n in vals], width, label=prov)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ns))], [f"n={n}" for n in ns])
        ax.set_title(f"engine: {metric}", fontsize=9)
        ax.set_ylabel("positions / s" if metric == "tokens/s" else "s")
    axes[0].legend(fontsize=7)
    fig.text(0.01, 0.01, f"{stamp(sub[0])}\n{sub[0]['command']}", fontsize=6.5, va="bottom", ha="left", color="0.3")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "engine_latency.png"
    fig.savefig(path, dpi=110, metadata={"Description": f"{stamp(sub[0])} | {sub[0]['command']}"})
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
