"""Cost against the number of thoughts: a training step (fwd+bwd) and `generate` at n thoughts per example.

Providers at each n (ProsQA-shaped batches, the suite's default model, every example with n thoughts):
- sequential: `LatentLM` with the default schedule (one pass per thought);
- jacobi T=t: `latent_schedule="jacobi", jacobi_iters=t` (PCCoT), at the n where t < n (with t >= n it is the
  sequential result, computed t times);
- reference: the reference algorithm (coconut_kernels/bench/reference_coconut.py), only up to the n its time
  allows (training: n <= 4 at B=1, n <= 2 at B=8; generate, one example at a time: n <= 4 over one example);
- floor: one plain pass over the same tokens (`feedback="pause"`: every latent keeps its token embedding); in
  generate, the same prompts prefilled in one pass, then the same answer tokens decoded.
Besides the time of each point (median, p20-p80 and the maximum of the repetitions) the scenario fits a line
over n >= 1 to each provider's medians and reports the marginal cost of one thought: in ms, and as a fraction
of the plain pass (the slope of time / floor), and the aten operator calls one thought adds to a step
(counted with a TorchDispatchMode, forward and backward, not timed).

The default run keeps the suite's time modest: B=8 only, n in {0, 4, 16, 64}, Jacobi T=4, the reference at
n <= 2. `python -m coconut_kernels.bench --scenario latent_scaling --full` runs the whole grid: B in {1, 8},
n in {0, 1, 2, 4, 8, 16, 32, 64}, Jacobi T in {2, 4, 8}.
"""
from __future__ import annotations

import torch

from coconut_kernels import LatentLM

from .harness import Case, Scenario, register, switched
from .reference_coconut import ReferenceCoconut
from .workloads import Special, collate, make_models, prosqa_examples

VOCAB = 50257
N_ANSWER = 16   # answer tokens decoded by generate
NEVER = -1      # an EOS id no token has: every example decodes N_ANSWER tokens
FULL = {"thoughts": (0, 1, 2, 4, 8, 16, 32, 64), "batches": (1, 8), "jacobi": (2, 4, 8)}
DEFAULT = {"thoughts": (0, 4, 16, 64), "batches": (8,), "jacobi": (4,)}
QUICK = {"thoughts": (0, 2, 4), "batches": (2,), "jacobi": (2,)}
# The largest n the reference runs at (its passes re-stack the B x T inputs and concatenate caches: seconds each).
REFERENCE_MAX = {"train": {1: 4, 8: 2}, "generate": 4}


def suite_models(state: dict, size: str, device, dtype) -> dict:
    """The suite's models of `size` on the same weights, made once into `state` (shared by the scenarios that
    train or generate with them): this library's LatentLM (lm; gen_lm never stops at EOS), its pause-feedback
    floor (floor, gen_floor), the reference algorithm on a transformers GPT-2 (ref, gen_ref), the transformers
    model (hf) and the special ids (sp)."""
    if not state:
        hf, ours = make_models(size, VOCAB, dtype=dtype, device=device)
        sp = Special.for_vocab(VOCAB)
        state.update(hf=hf, sp=sp, lm=LatentLM(ours, sp.latent, sp.bot, sp.eot, sp.eos),
                     floor=LatentLM(ours, sp.latent, sp.bot, sp.eot, sp.eos, feedback="pause"),
                     ref=ReferenceCoconut(hf, sp.latent, sp.bot, sp.eot, sp.eos),
                     gen_lm=LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER),
                     gen_floor=LatentLM(ours, sp.latent, sp.bot, sp.eot, NEVER, feedback="pause"),
                     gen_ref=ReferenceCoconut(hf, sp.latent, sp.bot, sp.eot, NEVER))
    return state


def train_step(module, batch, schedule: dict | None = None):
    """One training step of `module` (LatentLM or the reference) on `batch`: zero_grad, forward, backward."""
    def step():
        module.zero_grad(set_to_none=True)
        out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"],
                     **(schedule or {}))
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        return loss
    return step


def _train_cases(state, size, B, n, jacobi, device, dtype, q_len, reps, ref_max, only_reference=False):
    scenario = f"latent_scaling_train_B{B}"
    batch = {}

    def get():
        s = suite_models(state, size, device, dtype)
        if not batch:
            batch.update(collate(prosqa_examples(B, VOCAB, n_latents=n, seed=B + n, q_len=q_len), VOCAB,
                                 device=device))
        return s, batch

    def make(key, schedule=None):
        def setup():
            s, b = get()
            return train_step(s[key], b, schedule)
        return setup

    extra = {"max": True, "memory": False, "aten_calls": True}
    if not only_reference:
        yield Case(scenario, "sequential", "thoughts", n, make("lm"), reps=reps, warmup=1, extra=extra)
        for t in jacobi:
            if t < n:
                yield Case(scenario, f"jacobi T={t}", "thoughts", n,
                           make("lm", {"latent_schedule": "jacobi", "jacobi_iters": t}), reps=reps, warmup=1,
                           extra=extra)
    if n <= ref_max:
        yield Case(scenario, "reference", "thoughts", n, make("ref"), role="reference", reps=max(2, reps // 3),
                   warmup=1, extra={"max": True, "memory": False})
    if not only_reference:
        yield Case(scenario, "floor", "thoughts", n, make("floor"), role="floor", reps=reps, warmup=1,
                   extra=extra)


def _generate_cases(state, size, B, n, jacobi, device, dtype, q_len, reps, ref_max):
    scenario = f"latent_scaling_generate_B{B}"
    prompts = {}

    def get():
        s = suite_models(state, size, device, dtype)
        if not prompts:
            ex = prosqa_examples(B, VOCAB, n_latents=n, seed=B + n, with_labels=False, q_len=q_len)
            prompts.update(collate(ex, VOCAB, layout="ragged", device=device))
        return s, prompts

    def make(key, schedule=None):
        def setup():
            s, p = get()
            return lambda: s[key].generate(p["input_ids"], p["attention_mask"], max_new_tokens=N_ANSWER,
                                           **(schedule or {}))
        return setup

    def reference():
        s, p = get()
        row = p["input_ids"][:1, : int(p["attention_mask"][0].sum())]  # one example: the reference never batches
        return lambda: s["gen_ref"].generate(row, torch.ones_like(row), max_new_tokens=N_ANSWER)

    extra = {"max": True, "memory": False, "aten_calls": True}
    yield Case(scenario, "sequential", "thoughts", n, make("gen_lm"), reps=reps, extra=extra)
    for t in jacobi:
        if t < n:
            yield Case(scenario, f"jacobi T={t}", "thoughts", n,
                       make("gen_lm", {"latent_schedule": "jacobi", "jacobi_iters": t}), reps=reps, extra=extra)
    if n <= ref_max:
        yield Case(scenario, "reference (1 example)", "thoughts", n, reference, role="other", reps=2,
                   extra={"max": True, "memory": False})
    yield Case(scenario, "floor", "thoughts", n, make("gen_floor"), role="floor", reps=reps, extra=extra)


def cases(settings: dict):
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    size = settings.get("model") or ("gpt2-tiny" if quick else "gpt2-4x256")
    grid = QUICK if quick else FULL if settings.get("full") else DEFAULT
    batches = settings["sizes"] or grid["batches"]
    q_len = (40, 60) if quick else (280, 330)
    reps = 2 if quick else 7
    state: dict = {}  # the models, built once and shared by every point
    for B in batches:
        ref_max = REFERENCE_MAX["train"].get(B, 2)
        # the reference also at every n <= ref_max the grid skips: the points its trend is fitted to
        for n in sorted(set(grid["thoughts"]) | set(range(ref_max + 1))):
            yield from _train_cases(state, size, B, n, grid["jacobi"], device, dtype, q_len, reps, ref_max,
                                    only_reference=n not in grid["thoughts"])
        for n in grid["thoughts"]:
            yield from _generate_cases(state, size, B, n, grid["jacobi"], device, dtype, q_len, reps,
                                       REFERENCE_MAX["generate"])
    if device.type == "cpu":  # the deferred one-row gradients (cache._DeferredRows) are the CPU kernels'
        yield from _deferral_cases(state, size, max(batches), max(grid["thoughts"]), device, dtype, q_len, reps)


def _deferral_cases(state, size, B, n, device, dtype, q_len, reps):
    """The training step at the grid's most thoughts with the one-row passes' gradient of the prefix rows
    deferred to one product (the default) and added pass by pass (cache.set_deferred_kv_grads(False)),
    interleaved in one run: what the deferral changes end to end."""
    from coconut_kernels.cache import deferred_kv_grads, set_deferred_kv_grads

    def make(defer: bool):
        def setup():
            s = suite_models(state, size, device, dtype)
            b = collate(prosqa_examples(B, VOCAB, n_latents=n, seed=B + n, q_len=q_len), VOCAB, device=device)
            return switched(set_deferred_kv_grads, deferred_kv_grads, defer, train_step(s["lm"], b))
        return setup

    scenario = f"latent_scaling_deferral_B{B}"
    yield Case(scenario, "sequential", "thoughts", n, make(True), reps=reps, extra={"memory": False})
    yield Case(scenario, "sequential, one-row gradients added per pass", "thoughts", n, make(False),
               role="reference", reps=reps, extra={"memory": False})


def _line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The least-squares line of y over x as (slope, intercept), None for fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def _fit(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of y over x, None for fewer than two distinct x."""
    line = _line(points)
    return None if line is None else line[0]


TREND = "speedup over the reference trend"


def _trend_rows(times: list[dict]) -> list[dict]:
    """Per provider (not the reference, not the floor) at its largest n beyond the reference's: the reference's
    time there, read off the line through the reference's medians (each thought is one more pass of the
    reference, so its time grows linearly in n), over the provider's median. x_value "trend at n=N". No rows
    where the reference has fewer than two distinct n (the role "reference": the training scenario only)."""
    ref = [(int(r["x_value"]), r["p50"]) for r in times if r["role"] == "reference"]
    line = _line(ref)
    if line is None:
        return []
    slope, intercept = line
    out = []
    for prov in dict.fromkeys(r["provider"] for r in times if r["role"] not in ("reference", "floor")):
        last = max((r for r in times if r["provider"] == prov), key=lambda r: int(r["x_value"]))
        n = int(last["x_value"])
        if n <= max(x for x, _ in ref):
            continue  # measured, not extrapolated: the scenario's own ratio column says it
        v = (intercept + slope * n) / last["p50"]
        out.append({**{k: v2 for k, v2 in last.items() if k not in ("p20", "p50", "p80", "metric", "unit")},
                    "x_value": f"trend at n={n}", "metric": TREND, "unit": "x", "p20": v, "p50": v, "p80": v})
    return out


def marginal_rows(rows: list[dict]) -> list[dict]:
    """Per (scenario, provider): the slope over n >= 1 of the median time (ms per thought), of the time above
    the floor (ms per thought) and of time / floor (fraction of a plain pass per thought), and of the aten
    calls per step (calls per thought). Rows in the CSV's format, x_value "fit n>=1"."""
    out = []
    for scn in dict.fromkeys(r["scenario"] for r in rows):
        if not scn.startswith(("latent_scaling_train", "latent_scaling_generate")):
            continue  # the deferral A/B: one point, no fit
        times = [r for r in rows if r["scenario"] == scn and r["metric"] == "time"]
        floor = {int(r["x_value"]): r["p50"] for r in times if r["role"] == "floor"}
        for prov in dict.fromkeys(r["provider"] for r in times):
            mine = [r for r in times if r["provider"] == prov and int(r["x_value"]) >= 1]
            base = {k: v for k, v in mine[0].items() if k not in ("p20", "p50", "p80", "metric", "unit")} \
                if mine else None
            if base is None:
                continue
            base["x_value"] = "fit n>=1"
            fits = {("marginal time per thought", "ms"): _fit([(int(r["x_value"]), r["p50"] * 1e3) for r in mine])}
            over = [r for r in mine if int(r["x_value"]) in floor]
            if prov != "floor" and over:
                fits[("marginal time per thought above the floor", "ms")] = _fit(
                    [(int(r["x_value"]), (r["p50"] - floor[int(r["x_value"])]) * 1e3) for r in over])
                fits[("marginal time per thought / floor", "fraction")] = _fit(
                    [(int(r["x_value"]), r["p50"] / floor[int(r["x_value"])]) for r in over])
            calls = [r for r in rows if r["scenario"] == scn and r["provider"] == prov and
                     r["metric"] == "aten calls per step" and int(r["x_value"]) >= 1]
            fits[("aten calls per thought", "calls")] = _fit([(int(r["x_value"]), r["p50"]) for r in calls])
            for (metric, unit), v in fits.items():
                if v is not None:
                    out.append({**base, "metric": metric, "unit": unit, "p20": v, "p50": v, "p80": v})
        out += _trend_rows(times)
    return out


def marginal_table(rows: list[dict]) -> list[list[str]]:
    """The fits of marginal_rows as a table: one line per (scenario, provider)."""
    cols = ["marginal time per thought", "marginal time per thought above the floor",
            "marginal time per thought / floor", "aten calls per thought", TREND]
    head = ["case", "provider", "ms / thought", "ms / thought above floor", "floor fraction / thought",
            "aten calls / thought", "x faster than the reference's trend"]
    lines: dict = {}
    for r in rows:
        if r["metric"] in cols:
            v = r["p50"]
            if r["metric"] == TREND:
                v = f"{v:.3g}x at {r['x_value'].removeprefix('trend at ')}"
            lines.setdefault((r["scenario"], r["provider"]), {})[r["metric"]] = v
    out = [head]
    for (scn, prov), v in lines.items():
        fmt = ["{:.3g}", "{:.3g}", "{:.2%}", "{:.0f}", "{}"]
        out.append([scn, prov] + [f.format(v[c]) if c in v else "-" for f, c in zip(fmt, cols)])
    return out


SCENARIO = register(Scenario("latent_scaling", "train step and generate against the number of thoughts n "
                             "(sequential, Jacobi, reference, floor; marginal cost per thought)", cases,
                             x_label="thoughts", summarize=marginal_rows, summary_table=marginal_table))
