"""Correctness sweep of every op and GPU backend for benchmarks/gpu_check.sh.

For each op (latent_feedback, latent_attention, soft_embedding), backend ("cuda" = CUDA C++, "triton",
"torch" = the plain-PyTorch reference path) and dtype (fp32, bf16, fp16), over a sweep of shapes that includes
ragged lengths, odd sizes and a large case: the forward output and the input gradients against the fp64
reference of coconut_kernels.reference computed on the CPU, as max |error| / max(1, max |reference|), checked
against the tolerance of the dtype (TOLERANCES); and the attention backward's determinism (two runs bitwise
equal). Writes a JSON list of rows and exits 1 on any failure.

    python benchmarks/gpu_correctness.py --out gpu_correctness.json [--small] [--backend triton]

--small: the small shapes only (what compute-sanitizer runs, and the CPU dry run). Without a GPU the sweep runs
on CPU tensors (the "cuda" backend then means the compiled CPU kernels and Triton runs interpreted), which only
proves the script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import coconut_kernels as ck  # noqa: E402
from coconut_kernels import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative to max(1, max |reference|): fp32 keeps ~6 digits through fp32 accumulation; bf16/fp16 inputs are
# rounded before the op, so the error is that of the inputs' rounding carried through (a few units of the
# dtype's epsilon times the reduction's growth), as the CPU tests' "within 2x of torch's error" bound allows.
TOLERANCES = {"fp32": 2e-4, "bf16": 6e-2, "fp16": 8e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def check_feedback(device, dtype, shape):
    B, T, d, n_rows, norm = shape
    gen = torch.Generator().manual_seed(d + n_rows)
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    embeds = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    # Distinct (batch, destination) pairs, sources anywhere (several rows may read one source).
    pairs = torch.randperm(B * T, generator=gen)[:n_rows]
    batch_idx, dst = (pairs // T).to(torch.int32), (pairs % T).to(torch.int32)
    src = torch.randint(0, T, (n_rows,), generator=gen, dtype=torch.int32)
    w = torch.randn(d, generator=gen, dtype=torch.float64) if norm != "none" else None
    b = torch.randn(d, generator=gen, dtype=torch.float64) if norm == "layernorm" else None
    g = torch.randn(B, T, d, generator=gen, dtype=torch.float64)

    def run(dev, dt, fn):
        xs = [t.to(dev, dt).requires_grad_() if t is not None else None for t in (embeds, hidden, w, b)]
        idx = [t.to(dev) for t in (batch_idx, dst, src)]
        out = fn(xs[0], xs[1], *idx, norm=norm, weight=xs[2], bias=xs[3])
        grads = _grads(out, [x for x in xs if x is not None], g.to(dev, dt))
        return [out] + list(grads)

    ref = run("cpu", torch.float64, reference.latent_feedback_reference)
    ours = run(device, dtype, ck.latent_feedback)
    return max(rel_err(o, r) for o, r in zip(ours, ref))


def check_attention(device, dtype, shape):
    B, Sq, Hq, Hkv, D, T0, rotary, ragged = shape
    gen = torch.Generator().manual_seed(Sq * 7 + D)
    Tmax = T0 + Sq + 3
    q = torch.randn(B, Sq, Hq, D, generator=gen, dtype=torch.float64)
    k_new, v_new = (torch.randn(B, Sq, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, Tmax, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    cs = torch.randint(max(T0 - 5, 0), T0 + 1, (B,), generator=gen, dtype=torch.int32)
    new = torch.randint(0, Sq + 1, (B,), generator=gen, dtype=torch.int32) if ragged else None
    cos = sin = None
    if rotary:
        ang = torch.rand(Tmax, D // 2, generator=gen, dtype=torch.float64) * 6.3
        cos, sin = ang.cos(), ang.sin()
    g = torch.randn(B, Sq, Hq, D, generator=gen, dtype=torch.float64)

    def run(dev, dt, fn):
        xs = [t.to(dev, dt).requires_grad_() for t in (q, k_new, v_new)]
        kc, vc = k_cache.to(dev, dt), v_cache.to(dev, dt)
        rot = {} if cos is None else dict(rotary_cos=cos.to(dev, torch.float32 if dt != torch.float64 else dt),
                                          rotary_sin=sin.to(dev, torch.float32 if dt != torch.float64 else dt))
        out = fn(xs[0], xs[1], xs[2], kc, vc, cs.to(dev), new_seqlens=None if new is None else new.to(dev),
                 **rot)
        return [out, kc, vc] + list(_grads(out, xs, g.to(dev, dt)))

    def ref_fn(q_, kn, vn, kc, vc, cs_, **kw):
        return reference.latent_attention_reference(q_, kn, vn, kc, vc, cs_, **kw)[0]

    ref = run("cpu", torch.float64, ref_fn)
    ours = run(device, dtype, ck.latent_attention)
    return max(rel_err(o, r) for o, r in zip(ours, ref))


def check_attention_determinism(device, dtype, shape):
    """Two backward runs on equal inputs: the largest |difference| of dq, dk_new, dv_new (0 when bitwise equal).
    The CUDA C++ and Triton backwards sum in a fixed order (no atomics), so anything but 0 fails."""
    B, Sq, Hq, Hkv, D, T0, rotary, ragged = shape
    gen = torch.Generator().manual_seed(Sq * 11 + D)
    Tmax = T0 + Sq + 3
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(device, dtype)
    k_new, v_new = (torch.randn(B, Sq, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, Tmax, Hkv, D, generator=gen).to(device, dtype) for _ in range(2))
    cs = torch.randint(max(T0 - 5, 0), T0 + 1, (B,), generator=gen, dtype=torch.int32).to(device)
    new = torch.randint(0, Sq + 1, (B,), generator=gen, dtype=torch.int32).to(device) if ragged else None
    rot = {}
    if rotary:
        ang = torch.rand(Tmax, D // 2, generator=gen) * 6.3
        rot = dict(rotary_cos=ang.cos().to(device), rotary_sin=ang.sin().to(device))
    g = torch.randn(B, Sq, Hq, D, generator=gen).to(device, dtype)

    def run():
        xs = [t.clone().requires_grad_() for t in (q, k_new, v_new)]
        out = ck.latent_attention(xs[0], xs[1], xs[2], k_cache.clone(), v_cache.clone(), cs, new_seqlens=new,
                                  **rot)
        return _grads(out, xs, g)

    first, second = run(), run()
    return max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(first, second))


def check_soft_embedding(device, dtype, shape):
    N, V, D, top_k, top_p = shape
    gen = torch.Generator().manual_seed(N + V)
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    g = torch.randn(N, D, generator=gen, dtype=torch.float64)

    def run(dev, dt, fn):
        xs = [t.to(dev, dt).requires_grad_() for t in (logits, weight)]
        out = fn(xs[0], xs[1], top_k=top_k, top_p=top_p)
        return [out] + list(_grads(out, xs, g.to(dev, dt)))

    # The filter's kept set is decided on the rounded logits: the reference sees the same rounded values.
    logits = logits.to(dtype).double()
    ref = run("cpu", torch.float64, reference.soft_embedding_reference)
    ours = run(device, dtype, ck.soft_embedding)
    return max(rel_err(o, r) for o, r in zip(ours, ref))


def shapes(small: bool):
    fb = [(2, 5, 40, 3, "layernorm"), (3, 7, 1, 4, "rmsnorm"), (2, 4, 24, 8, "none")]
    # Attention (B, Sq, Hq, Hkv, D, cache rows, rotary, ragged): Sq = 12 and 300 take the CUDA backend's tiled
    # (Triton) forward, Sq <= 8 its split-KV one; the backward's dQ key split (few rows), several key blocks and
    # query tiles, GQA groups and head dims off the 64/128/256 tiles are all in the sweep.
    att = [(2, 1, 4, 2, 64, 9, False, False), (2, 5, 4, 1, 40, 6, True, True), (1, 3, 2, 2, 128, 0, True, False),
           (2, 12, 6, 2, 80, 70, True, True)]
    det = [(2, 12, 6, 2, 80, 70, True, True)]
    soft = [(3, 50, 24, 0, 1.0), (4, 97, 16, 5, 0.9)]
    if not small:
        fb += [(8, 300, 4096, 8, "layernorm"), (4, 64, 8192, 4, "rmsnorm"), (2, 33, 13001, 2, "layernorm")]
        att += [(8, 1, 32, 8, 128, 4000, True, False), (4, 300, 12, 12, 64, 40, False, True),
                (2, 64, 8, 8, 256, 700, True, True), (1, 1, 8, 8, 128, 32768, False, False),
                (2, 300, 32, 8, 128, 1200, True, True), (4, 8, 16, 2, 200, 900, True, True)]
        det += [(4, 300, 32, 8, 128, 1200, True, True), (8, 1, 32, 8, 128, 4000, True, False)]
        soft += [(8, 50257, 768, 0, 1.0), (16, 32000, 1024, 50, 0.9)]
    return {"latent_feedback": (check_feedback, fb), "latent_attention": (check_attention, att),
            "latent_attention_determinism": (check_attention_determinism, det),
            "soft_embedding": (check_soft_embedding, soft)}


# Ops whose "error" is the difference between two runs: they must be bitwise equal.
BITWISE = ("latent_attention_determinism",)


def backends_for(op: str, device) -> list[str]:
    if device.type != "cuda":
        # Dry run: "cpu" is the compiled op; Triton runs interpreted (soft_embedding's Triton kernels are the
        # op's CUDA implementation, reachable from CUDA tensors only).
        return ["cpu", "torch"] if op == "soft_embedding" else ["cpu", "triton", "torch"]
    out = ["triton", "torch"]
    if op != "soft_embedding" and ck.backend.has_cuda_kernels(
            "latent_attention_fwd" if op.startswith("latent_attention") else "latent_feedback_"):
        out.insert(0, "cuda")
    return out


def summarize(out_dir: str) -> int:
    """gpu_check.json from the files gpu_check.sh left in out_dir (env.txt, steps.csv, gpu_correctness.json,
    sanitizer.log, gpu_attention.json), a one-screen summary, and the exit status: 1 on any correctness failure
    (a failed row, or a failed tests / correctness / sanitizer step)."""
    import csv

    def load(name, default):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            return default
        with open(path) as f:
            return json.load(f) if name.endswith(".json") else f.read()

    with open(os.path.join(out_dir, "steps.csv")) as f:
        steps = list(csv.DictReader(f))
    correctness = load("gpu_correctness.json", [])
    attention = load("gpu_attention.json", {})
    timings = [r for r in attention.get("rows", []) if r.get("ms") == r.get("ms")]  # NaN-free
    fastest = {}
    for r in timings:
        if r["name"].startswith(("decode", "multipass")):
            best = fastest.get(r["name"])
            if best is None or r["ms"] < best["ms"]:
                fastest[r["name"]] = dict(backend=r["backend"], ms=r["ms"])
    gating = ("tests_cuda", "tests_triton", "correctness", "sanitizer")
    # A gating step that failed, timed out or was cut by the time budget fails the check; "skipped" means the
    # step does not apply (no compute-sanitizer, or a dry run).
    failed_steps = [s["step"] for s in steps if s["step"] in gating and s["rc"] not in ("0", "skipped")]
    failed_rows = [r for r in correctness if not r["pass"] and not r.get("informational")]
    report = dict(env=load("env.txt", ""), steps=steps, correctness=correctness,
                  sanitizer=load("sanitizer.log", None), timings=timings, fastest=fastest,
                  failed_steps=failed_steps, failed_rows=len(failed_rows),
                  passed=not failed_steps and not failed_rows and bool(correctness))
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("== gpu_check summary")
    print(f"{'step':<16} {'rc':>6} {'s':>5}")
    for st in steps:
        print(f"{st['step']:<16} {st['rc']:>6} {st['seconds']:>5}")
    worst = {}
    for r in (r for r in correctness if not r.get("informational")):
        key = (r["op"], r["backend"], r["dtype"], r["tol"])
        err = float("inf") if r["max_err"] is None else r["max_err"]
        worst[key] = max(worst.get(key, 0.0), err)
    print(f"{'op':<28} {'backend':<7} {'dtype':<5} {'max err':>10} {'tol':>8}")
    for (op, be, dt, tol), err in sorted(worst.items()):
        print(f"{op:<28} {be:<7} {dt:<5} {err:10.3g} {tol:8.0e} {'ok' if err <= tol else 'FAIL'}")
    for name, best in sorted(fastest.items()):
        print(f"fastest {name}: {best['backend']} ({best['ms']:.4g} ms)")
    print("== PASSED" if report["passed"] else f"== FAILED (steps: {failed_steps}, rows: {len(failed_rows)})")
    return 0 if report["passed"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_correctness.json")
    ap.add_argument("--small", action="store_true", help="small shapes only (sanitizer runs, dry run)")
    ap.add_argument("--backend", action="append", help="only these backends (repeatable)")
    ap.add_argument("--summarize", metavar="DIR", help="write DIR/gpu_check.json from gpu_check.sh's outputs")
    a = ap.parse_args(argv)
    if a.summarize:
        return summarize(a.summarize)
    device = torch.device("cuda" if ON_GPU else "cpu")
    rows = []
    for op, (fn, sweep) in shapes(a.small or not ON_GPU).items():
        for backend in backends_for(op, device):
            if a.backend and backend not in a.backend:
                continue
            for dname, dtype in DTYPES.items():
                if device.type == "cpu" and dtype != torch.float32 and backend == "triton":
                    continue  # interpreted half-precision dots are numpy's, not the GPU's: fp32 proves the script
                for shape in sweep:
                    ck.set_backend(backend if device.type == "cuda" else None)
                    t0 = time.perf_counter()
                    row = dict(op=op, backend=backend, dtype=dname, shape=list(shape),
                               tol=0.0 if op in BITWISE else TOLERANCES[dname])
                    if op in BITWISE and backend == "torch":
                        # The reference's autograd (gather's backward scatters with atomics on CUDA) promises no
                        # bitwise repeatability: reported only.
                        row["informational"] = True
                    if op == "soft_embedding" and backend == "torch" and dname != "fp32" and shape[4] < 1.0:
                        # The reference path decides the nucleus in the input dtype (as Hugging Face does): in
                        # bf16/fp16 its kept set may differ from the exact one, so its error is reported only.
                        row["informational"] = True
                    try:
                        if device.type == "cpu" and backend != "cpu":
                            row["max_err"] = _forced(backend, fn, dtype, shape)
                        else:
                            row["max_err"] = fn(device, dtype, shape)
                        row["pass"] = row["max_err"] <= row["tol"]
                    except Exception as e:  # a crash is a failure of that row, reported with its message
                        row.update(max_err=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                                   **{"pass": False})
                    finally:
                        ck.set_backend(None)
                    row["seconds"] = round(time.perf_counter() - t0, 3)
                    rows.append(row)
                    print(f"  {op:<28} {backend:<7} {dname} {str(shape):<44} err={row['max_err']} "
                          f"tol={row['tol']:g} {'ok' if row['pass'] else 'FAIL ' + row.get('error', '')}", flush=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["pass"] and not r.get("informational")]
    print(f"== correctness: {len(rows) - len(failed)}/{len(rows)} passed (informational rows do not count)")
    return 1 if failed else 0


def _forced(backend, fn, dtype, shape):
    """Dry run of `backend` on CPU tensors, for which get_backend() always answers "cpu": the op modules' backend
    choice is pointed at `backend` for the call, so the Triton launchers (interpreted) or the reference run."""
    mods = [sys.modules[m] for m in ("coconut_kernels.ops.latent_attention", "coconut_kernels.ops.latent_feedback",
                                     "coconut_kernels.ops.soft_embedding")]
    saved = [(m, name, getattr(m, name)) for m in mods for name in ("get_backend", "_backend_of") if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, lambda device: backend)
    try:
        return fn(torch.device("cpu"), dtype, shape)
    finally:
        for m, name, f in saved:
            setattr(m, name, f)


if __name__ == "__main__":
    sys.exit(main())
