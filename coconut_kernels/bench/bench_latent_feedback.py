"""latent_feedback_ on CPU: one feedback step, forward + backward, against the official COCONUT list-and-stack
rebuild of inputs_embeds and against index_put (plus a separate LayerNorm), all in one run.

    python -m pytest coconut_kernels/bench/bench_latent_feedback.py -s --benchmark-columns=median,iqr,rounds
    python -m coconut_kernels.bench --scenario latent_feedback        (the suite's runner: the same cases at N = B)

The rebuild at B=32, T=350, d=768 takes minutes per round, so it runs once (pedantic)
and only with COCONUT_BENCH_FULL=1; by default a B=4 rebuild runs 3 rounds. Every other case runs 15 rounds
after 2 warm-up rounds (shared 2-core machines are noisy: the median needs them). Ratios of medians are
printed at the end (and written to benchmarks/out/latent_feedback.json under the current directory).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import coconut_kernels as ck

from .harness import Case, Scenario, register

T, D, N_LATENT = 350, 768, 6
MEDIANS: dict[str, float] = {}


def make(B: int, per_seq: int, seed: int = 0, device="cpu", dtype=torch.float32):
    """Leaves as in a pass: embeds and hidden (B, T, d) requiring grad, LayerNorm parameters, per-sequence
    latent positions (dst) fed from the previous position (src = dst - 1), the upstream gradient."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, shift=0.0):
        return (torch.randn(*shape, generator=g) + shift).to(device, dtype).requires_grad_()
    embeds, hidden, weight, bias = leaf(B, T, D), leaf(B, T, D), leaf(D, shift=1.0), leaf(D)
    start = torch.randint(50, T - N_LATENT, (B,), generator=g)
    batch_idx = torch.arange(B).repeat_interleave(per_seq).to(device)
    dst = (start[:, None] + torch.arange(per_seq)).flatten().to(device)
    grad = torch.randn(B, T, D, generator=g).to(device, dtype)
    return dict(embeds=embeds, hidden=hidden, weight=weight, bias=bias, batch_idx=batch_idx, dst=dst, src=dst - 1,
                grad=grad, B=B)


def rebuild(x):
    """The official code after a pass: a B x T list of row slices, the latent rows replaced, stacked back."""
    embeds, hidden = x["embeds"], x["hidden"]
    rows = [[embeds[b, pos, :] for pos in range(T)] for b in range(x["B"])]
    for b, dst, src in zip(x["batch_idx"].tolist(), x["dst"].tolist(), x["src"].tolist()):
        rows[b][dst] = hidden[b, src, :]
    return torch.stack([torch.stack(rows[b]) for b in range(x["B"])])


def index_put(x):
    return x["embeds"].index_put((x["batch_idx"], x["dst"]), x["hidden"][x["batch_idx"], x["src"]])


def index_put_layernorm(x):
    rows = F.layer_norm(x["hidden"][x["batch_idx"], x["src"]], (D,), x["weight"], x["bias"])
    return x["embeds"].index_put((x["batch_idx"], x["dst"]), rows)


def feedback(x):
    return ck.latent_feedback(x["embeds"], x["hidden"], x["batch_idx"], x["dst"], x["src"])


def feedback_layernorm(x):
    return ck.latent_feedback(x["embeds"], x["hidden"], x["batch_idx"], x["dst"], x["src"], norm="layernorm",
                              weight=x["weight"], bias=x["bias"])


def feedback_inplace_layernorm(x):
    # In a pass embeds is the output of an earlier op; the clone stands for it (and costs what the
    # out-of-place form's copy costs).
    return ck.latent_feedback_(x["embeds"].clone(), x["hidden"], x["batch_idx"], x["dst"], x["src"],
                               norm="layernorm", weight=x["weight"], bias=x["bias"])


IMPLS = {"rebuild": rebuild, "index_put": index_put, "index_put+layer_norm": index_put_layernorm,
         "latent_feedback": feedback, "latent_feedback(layernorm)": feedback_layernorm,
         "latent_feedback_(layernorm, in place)": feedback_inplace_layernorm}


def step(fn, x):
    for k in ("embeds", "hidden", "weight", "bias"):
        x[k].grad = None
    fn(x).backward(x["grad"])


def cases(settings):
    """The runner's cases: identity feedback (vs the rebuild, the reference, and index_put, the floor) and
    fused LayerNorm (vs index_put + a separate layer_norm), at N = B (one latent row per sequence)."""
    device, dtype, quick = settings["device"], settings["dtype"], settings["quick"]
    sizes = settings["sizes"] or ([2] if quick else [4, 32])
    reps = 3 if quick else 15
    groups = {"latent_feedback": [("latent_feedback", "impl"), ("index_put", "floor"), ("rebuild", "reference")],
              "latent_feedback_layernorm": [("latent_feedback(layernorm)", "impl"),
                                            ("latent_feedback_(layernorm, in place)", "other"),
                                            ("index_put+layer_norm", "floor")]}
    for B in sizes:
        for scenario, impls in groups.items():
            for impl, role in impls:
                if impl == "rebuild" and (B > 8 and not FULL or device.type != "cpu"):
                    continue  # minutes per round at B=32: COCONUT_BENCH_FULL=1 runs it

                def setup(impl=impl, B=B):
                    x = make(B, 1, device=device, dtype=dtype)
                    return lambda: step(IMPLS[impl], x)
                yield Case(scenario, impl, "B", B, setup, role=role, reps=1 if impl == "rebuild" and B > 8 else reps,
                           warmup=0 if impl == "rebuild" else 2, extra={"memory": False})


SCENARIO = register(Scenario("latent_feedback", f"one feedback write, fwd+bwd, T={T}, d={D}, N=B", cases))

FULL = os.environ.get("COCONUT_BENCH_FULL", "0") not in ("", "0")
# The B=32 rebuild once, at N=B only (N=6B rebuilds the same B x T slices).
CASES = [(impl, B, per) for B in (4, 32) for per in (1, N_LATENT) for impl in IMPLS
         if not (impl == "rebuild" and B == 32 and (per == N_LATENT or not FULL))]


@pytest.mark.parametrize("impl,B,per", CASES, ids=[f"{i}-B{b}-N{p}B" for i, b, p in CASES])
def test_latent_feedback_step(benchmark, impl, B, per):
    torch.set_num_threads(2)
    x = make(B, per)
    benchmark.group = f"latent_feedback fwd+bwd B={B} T={T} d={D} N={per}B"
    if impl == "rebuild":
        rounds = 1 if B == 32 else 3
        benchmark.pedantic(step, args=(IMPLS[impl], x), rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(step, args=(IMPLS[impl], x), rounds=15, iterations=1, warmup_rounds=2)
    if benchmark.stats:  # None under --benchmark-disable
        MEDIANS[f"{impl}|{B}|{per}"] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    yield
    lines = ["", "medians (ms) and ratios, one run:"]
    for B in (4, 32):
        for per in (1, N_LATENT):
            m = {impl: MEDIANS.get(f"{impl}|{B}|{per}") for impl in IMPLS}
            if not all(m[k] for k in IMPLS if k != "rebuild"):
                continue
            lines.append(f"B={B} N={per * B}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in m.items() if v))
            if m["rebuild"]:
                lines.append(f"  rebuild / latent_feedback = {m['rebuild'] / m['latent_feedback']:.0f}x "
                             f"(target >= 1000x)")
            for ours, base, target in (("latent_feedback", "index_put", " (target <= 1.5)"),
                                       ("latent_feedback(layernorm)", "index_put+layer_norm", " (target <= 1.5)"),
                                       ("latent_feedback_(layernorm, in place)", "index_put+layer_norm", "")):
                lines.append(f"  {ours} / {base} = {m[ours] / m[base]:.2f}{target}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        reporter.write_line(line) if reporter else print(line)
    out = os.path.join("benchmarks", "out")  # under the current directory, as the runner's default --out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "latent_feedback.json"), "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "medians_s": MEDIANS}, f, indent=1)
