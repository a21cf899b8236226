"""Ahead-of-time compilation of every Triton kernel the library launches, for sm_80 and sm_90, without a GPU.

    python -m coconut_kernels.triton.aot [--full] [--cuda] [--out benchmarks/results/gpu_static.csv]
    python -m coconut_kernels.triton.aot --kernels REGEX --append --out ...   (recompile some kernels' rows)

The launch configurations are not listed by hand: the library's own launchers run on meta tensors (shapes and
dtypes, no data) while every @triton.jit kernel's `run` is replaced by a recorder, so what is compiled is
exactly what a GPU would be asked to launch: the same arguments, constexprs, block sizes and num_warps /
num_stages, specialized as Triton's JIT specializes them (i32 or i64 by value, 16-divisibility of pointers and
integers). Each recorded launch is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`, Triton's own path, whose `ptxas -v` log gives the cubin's registers, spills and stack; the occupancy
per SM follows from the registers, shared memory and warps against the A100 (sm_80) and H100 /
H200 (sm_90) limits. With `--cuda`, every CUDA C++ kernel of csrc/cuda/ is compiled with `nvcc -Xptxas -v`
for both targets and added to the same table.

The process fails (exit 1) on any compile error, on a launch grid outside the hardware limits, or on a kernel
that needs more shared memory than its target has. The default set is the representative one CI compiles
(every kernel and head dim, every dtype at least once; see `scenarios`); `--full` crosses every option. Run it
without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .device import interpreted

if interpreted() and __name__ == "__main__":
    # The interpreter replaces @triton.jit kernels by Python functions: nothing to compile.
    sys.exit("run the AOT compiler without TRITON_INTERPRET=1")

import torch
import triton

from . import latent_attention as _la
from . import latent_feedback as _lf
from . import soft_embedding as _se

MODULES = (_la, _lf, _se)


@dataclass(frozen=True)
class Target:
    cc: int
    name: str
    smem_per_block: int  # opt-in maximum of dynamic + static shared memory per block, bytes
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024  # the runtime's own share of each block (sm_80 and later)


# CUDA C Programming Guide, "Technical Specifications per Compute Capability" (8.0: 164 KB per SM, 163 KB per
# block; 9.0: 228 KB per SM, 227 KB per block).
TARGETS = {80: Target(80, "A100", 163 * 1024, 164 * 1024), 90: Target(90, "H100/H200", 227 * 1024, 228 * 1024)}
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def occupancy(t: Target, regs: int, smem: int, num_warps: int) -> tuple[int, str]:
    """(resident warps per SM, the limiting resource) for a kernel of `regs` registers per thread, `smem` bytes of
    shared memory per block and `num_warps` warps per block; 0 warps when the block cannot launch at all."""
    if smem > t.smem_per_block or regs > 255 or num_warps * 32 > 1024:
        return 0, "does not fit"
    # Registers are allocated per warp in units of 256.
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (t.regs_per_sm // regs_per_warp) // num_warps
    by_smem = t.smem_per_sm // (smem + t.reserved_smem_per_block) if smem else t.max_blocks_per_sm
    by_warps = t.max_warps_per_sm // num_warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "blocks": t.max_blocks_per_sm}
    limiter = min(limits, key=limits.get)
    return limits[limiter] * num_warps, limiter


# ---- recording the launches ------------------------------------------------------------------------------


@dataclass
class Launch:
    scenario: str
    kernel: object
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"


def _kernels():
    for mod in MODULES:
        for obj in vars(mod).values():
            if hasattr(obj, "run") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
                yield obj


@contextlib.contextmanager
def recording(scenario_name=lambda: ""):
    """Replace every kernel's launch by a recorder for the duration; yields the list of Launch it fills."""
    launches: list[Launch] = []
    kernels = list(_kernels())
    for k in kernels:
        def run(*args, grid, warmup, _k=k, **kwargs):
            g = grid(dict(zip(_k.arg_names, args))) if callable(grid) else grid
            launches.append(Launch(scenario_name(), _k, args, kwargs, tuple(int(x) for x in g)))
        k.run = run
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run


def grid_errors(launches) -> list[str]:
    """Launches whose grid a GPU would refuse (x < 2^31, y and z <= 65535)."""
    out = []
    for la in launches:
        if len(la.grid) > 3 or any(g < 0 or g > lim for g, lim in zip(la.grid, GRID_LIMITS)):
            out.append(f"{la.scenario}: {la.name} grid {la.grid} exceeds {GRID_LIMITS}")
    return out


# ---- the scenarios: the library's launchers on meta tensors ---------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def attention_calls(B, Sq, Hq, Hkv, D, Tmax, dtype, *, rotary=False, interleaved=False, causal=True, leftpad=False,
                    new_seqlens=False, backward=True, dropout=False):
    """Calls the append, forward and (optionally) backward launchers once at this shape (with attention dropout
    when `dropout`)."""
    q = _t(B, Sq, Hq, D, dtype=dtype)
    kn, vn = _t(B, Sq, Hkv, D, dtype=dtype), _t(B, Sq, Hkv, D, dtype=dtype)
    kc, vc = _t(B, Tmax, Hkv, D, dtype=dtype), _t(B, Tmax, Hkv, D, dtype=dtype)
    cs = _t(B, dtype=torch.int32)
    lp = _t(B, dtype=torch.int32) if leftpad else None
    ns = _t(B, dtype=torch.int32) if new_seqlens else None
    cos = sin = _t(Tmax, D // 2) if rotary else None
    drop = (0.1, 2 ** 40 + 1) if dropout else (0.0, 0)
    _la.kv_cache_append_triton(kc, vc, kn, vn, cs, lp, ns, cos, sin, interleaved)
    out, lse = _la.latent_attention_fwd_triton(q, kc, vc, cs, lp, ns, cos, sin, interleaved, D ** -0.5, causal, *drop)
    if backward:
        gk, gv = _t(B, Tmax, Hkv, D), _t(B, Tmax, Hkv, D)
        _la.latent_attention_bwd_triton(out, q, kc, vc, out, lse, cs, lp, ns, cos, sin, interleaved, D ** -0.5,
                                        causal, gk, gv, *drop)


def feedback_calls(n, B, T, d, dtype, norm, *, affine=True, batched=True):
    e, h = _t(B, T, d, dtype=dtype), _t(B, T, d, dtype=dtype)
    idx = _t(n, dtype=torch.int64)
    w = _t(d, dtype=dtype) if affine and norm != "none" else None
    b = _t(d, dtype=dtype) if affine and norm == "layernorm" else None
    _lf.latent_feedback_fwd(e, h, idx if batched else None, idx, idx, norm, w, b, 1e-5)
    _lf.latent_feedback_bwd(e, h, idx if batched else None, idx, idx, norm, w, b, 1e-5)


def soft_embedding_calls(N, V, D, dtype, top_k, top_p):
    logits, weight = _t(N, V, dtype=dtype), _t(V, D, dtype=dtype)
    out, thr, lse = _se.soft_embedding_fwd(logits, weight, 1.0, top_k, top_p)
    _se.soft_embedding_bwd(out, logits, weight, thr, lse, 1.0, (True, True))


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128, 256)


def scenarios(full: bool):
    """(name, thunk) pairs. Shapes are the models' (GPT-2: 12 x 64 heads, no rotary; Llama-family: GQA with
    rotary at head dims 64/128/256); Sq=1 is decode, Sq=300 a prefix or multi-row latent pass.

    The CI subset (174 compilations, minutes on 2 cores) has every kernel at least once, every head dim in
    bf16, the tightest shared-memory cases (rotary; fp32 at head dim 128), split-KV decode at GQA ratios
    1/4/8 in each dtype and the attention kernels with dropout once; `full` (~1,000) crosses dtypes,
    head dims, rotary, GQA, decode, causality, left padding and ragged rows, norms and filters."""
    out = []
    if full:
        att = [(dt, D, dict(rotary=r, group=g, Sq=sq, interleaved=i, causal=c, leftpad=lp, new_seqlens=lp))
               for dt, D, r, g, sq, i, c, lp in itertools.product(DTYPES, HEAD_DIMS, (False, True), (1, 4), (1, 300),
                                                                  (False, True), (True, False), (False, True))
               if r or not i]
        att += [(dt, D, dict(rotary=True, group=4, Sq=sq, dropout=True))
                for dt, D, sq in itertools.product(DTYPES, HEAD_DIMS, (1, 300))]
    else:
        att = [(dt, D, dict(rotary=True, group=4, Sq=300)) for dt, D in
               [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128),
                (torch.float32, 256), (torch.float16, 128)]]
        att += [(torch.bfloat16, 128, dict(rotary=True, group=4, Sq=1, leftpad=True, new_seqlens=True)),
                (torch.bfloat16, 64, dict(rotary=False, group=1, Sq=300)),
                (torch.bfloat16, 64, dict(rotary=False, group=1, Sq=300, dropout=True))]
        # Decode (split-KV forward and its combine) at the other GQA ratios, dtypes and head dims; the backward
        # of Sq=1 adds nothing the cases above do not compile.
        att += [(dt, D, dict(rotary=r, group=g, Sq=1, backward=False)) for dt, D, r, g in
                [(torch.bfloat16, 64, False, 1), (torch.float16, 128, True, 8), (torch.bfloat16, 256, True, 8),
                 (torch.float32, 128, True, 4), (torch.float32, 256, False, 1)]]
    for dtype, D, v in att:
        dn = str(dtype).rsplit(".", 1)[-1]
        v = dict(v)
        group, Sq = v.pop("group"), v.pop("Sq")
        name = f"attention {dn} D={D} group={group} Sq={Sq} " + " ".join(f"{k}={x}" for k, x in v.items())
        out.append((name, lambda dtype=dtype, D=D, group=group, Sq=Sq, v=v: attention_calls(
            2, Sq, 8 * group, 8, D, 1024, dtype, **v)))
    fb = itertools.product(DTYPES + (torch.float64,), (768, 4096, 8192), ("none", "layernorm", "rmsnorm")) if full \
        else [(torch.bfloat16, 8192, "layernorm"), (torch.float32, 768, "rmsnorm")]
    for dtype, d, norm in fb:
        dn = str(dtype).rsplit(".", 1)[-1]
        out.append((f"feedback {dn} d={d} {norm}", lambda dtype=dtype, d=d, norm=norm: feedback_calls(
            16, 4, 64, d, dtype, norm)))
    soft = itertools.product(DTYPES, [(8, 50257, 768), (4096, 128256, 4096)], [(0, 1.0), (50, 0.9), (50, 1.0),
                                                                                 (0, 0.9)]) if full \
        else [(torch.bfloat16, (8, 50257, 768), (50, 0.9)), (torch.float32, (8, 50257, 768), (0, 1.0)),
              (torch.float16, (4096, 128256, 4096), (0, 0.9))]  # many rows: unsplit vocabulary, 64-row tiles
    for dtype, (N, V, D), (k, p) in soft:
        dn = str(dtype).rsplit(".", 1)[-1]
        out.append((f"soft_embedding {dn} N={N} V={V} D={D} top_k={k} top_p={p}",
                    lambda dtype=dtype, N=N, V=V, D=D, k=k, p=p: soft_embedding_calls(N, V, D, dtype, k, p)))
    return out


def record_all(items, cc: int | None = None) -> list[Launch]:
    """Run every thunk with the kernels' launches recorded; `cc` makes the launchers choose their tiles for that
    target (the dK/dV kernel's depend on it)."""
    current = [""]
    saved = _la._capability
    if cc is not None:
        _la._capability = lambda device: cc
    try:
        with recording(lambda: current[0]) as launches:
            for name, thunk in items:
                current[0] = name
                thunk()
    finally:
        _la._capability = saved
    return launches


# ---- compiling -----------------------------------------------------------------------------------------------


def _specialize(la: Launch, cc: int):
    """(source, options) exactly as Triton's JIT would build them for this launch on target `cc`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(la.kernel.signature, la.kernel.params, backend)
    kwargs = dict(la.kwargs, debug=False)
    bound, spec, opts = binder(*la.args, **kwargs)
    options, signature, constexprs, attrs = la.kernel._pack_args(backend, kwargs, bound, spec, opts)
    return target, ASTSource(la.kernel, signature, constexprs, attrs), options


def _config(la: Launch, src) -> str:
    cx = {la.kernel.arg_names[k[0]]: v for k, v in src.constants.items()}
    parts = [f"{k}={v}" for k, v in cx.items()]
    parts += [f"{k}:{v}" for k, v in src.signature.items() if v.startswith("*")][:1]
    parts += [f"{k}:i64" for k, v in src.signature.items() if v == "i64"]
    return " ".join(parts)


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(text: str) -> list[dict]:
    """One dict per function of `ptxas -v` output (nvcc -Xptxas -v prints the same lines)."""
    funcs, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if m and "Compiling entry" in line:
            cur = {"function": m.group(1), "arch": m.group(2), "regs": 0, "spill_stores": 0, "spill_loads": 0,
                   "stack": 0, "static_smem": 0}
            funcs.append(cur)
            continue
        if cur is None:
            continue
        for key, rx in _PTXAS_RE.items():
            mm = rx.search(line)
            if mm:
                cur[key] = int(mm.group(1))
    return funcs


def compile_launch(la: Launch, cc: int) -> dict:
    target, src, options = _specialize(la, cc)
    row = {"kind": "triton", "kernel": la.name, "scenario": la.scenario, "config": _config(la, src),
           "target": f"sm_{cc}", "num_warps": options.num_warps, "num_stages": options.num_stages,
           "grid": "x".join(map(str, la.grid))}
    # Triton runs `ptxas -v` itself; its log (printed when dump_ptxas_log is set) is the resource report of
    # the very cubin it builds. always_compile: a cached kernel would skip ptxas and print nothing.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # every compile error is a failure of the run, reported with its kernel and config
        row.update(status="compile error", error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        return row
    funcs = parse_ptxas(log.getvalue())
    if not funcs:
        row.update(status="compile error", error="no ptxas -v report")
        return row
    info = funcs[-1]
    # metadata.shared: what the launch asks for (Triton's dynamic shared memory, which includes any static use).
    smem = max(compiled.metadata.shared, info["static_smem"])
    row.update({k: info[k] for k in ("regs", "spill_stores", "spill_loads", "stack")}, shared_bytes=smem)
    return _finish(row, TARGETS[cc], options.num_warps)


def _finish(row: dict, t: Target, num_warps: int) -> dict:
    warps, limiter = occupancy(t, row["regs"], row["shared_bytes"], num_warps)
    row.update(gpu=t.name, smem_limit=t.smem_per_block, warps_per_sm=warps,
               occupancy=f"{warps / t.max_warps_per_sm:.3f}", limiter=limiter)
    if row["shared_bytes"] > t.smem_per_block:
        row.update(status="over shared-memory limit")
    elif row.get("spill_stores", 0) or row.get("spill_loads", 0):
        row.setdefault("status", "spills")
    else:
        row.setdefault("status", "ok")
    return row


def unique(launches, cc: int):
    """One launch per distinct compiled kernel (grid and sizes that do not change the specialization merge)."""
    seen, out = set(), []
    for la in launches:
        _, src, options = _specialize(la, cc)
        key = (la.name, src.hash(), str(sorted(options.__dict__.items())))
        if key not in seen:
            seen.add(key)
            out.append(la)
    return out


_TODO: list = []  # (launch, cc) pairs; forked workers inherit it and receive indices (meta tensors do not pickle)


def _progress(i: int, n: int, row: dict) -> dict:
    if row["status"] != "ok" or (i + 1) % 25 == 0 or i + 1 == n:
        print(f"  [{i + 1}/{n}] {row['kernel']} {row['target']} {row['status']} {row.get('error', '')}", flush=True)
    return row


def _compile_one(i: int) -> dict:
    return compile_launch(*_TODO[i])


# ---- CUDA C++ ----------------------------------------------------------------------------------------------


def torch_includes(python: str) -> list[str]:
    """Include folders for compiling against the torch of interpreter `python`: its headers, and the CUDA
    headers its pip dependencies install (ATen/cuda/CUDAContext.h includes cusparse.h and friends)."""
    code = ("import glob, os, sysconfig; from torch.utils.cpp_extension import include_paths; "
            "site = sysconfig.get_paths()['purelib']; "
            "print('\\n'.join(include_paths() + sorted(glob.glob(os.path.join(site, 'nvidia', '*', 'include')))))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p]


def cuda_rows(root: str, python: str = sys.executable, ccs=tuple(TARGETS), jobs: int = 2) -> list[dict]:
    """`nvcc -Xptxas -v` of every csrc/cuda/*.cu for each target in `ccs`, `jobs` compilations at a time (flags
    as setup.py's, headers of the torch of `python`; compiling needs the headers only, not a GPU)."""
    from concurrent.futures import ThreadPoolExecutor

    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else "nvcc"
    incs = [f"-I{p}" for p in torch_includes(python)] + [f"-I{os.path.join(root, 'csrc')}"]
    src_dir = os.path.join(root, "csrc", "cuda")

    def one(cu: str, cc: int) -> list[dict]:
        with tempfile.TemporaryDirectory() as d:
            cmd = [nvcc, "-c", os.path.join(src_dir, cu), "-o", os.path.join(d, "o.o"), "-std=c++20", "-O3",
                   "--use_fast_math", "-DCOCONUT_WITH_CUDA", "--expt-relaxed-constexpr",
                   f"-gencode=arch=compute_{cc},code=sm_{cc}", "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C",
                   "-D_GLIBCXX_USE_CXX11_ABI=1", *incs]
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            first = [ln for ln in r.stderr.splitlines() if "error" in ln] or ["nvcc failed"]
            return [{"kind": "cuda", "kernel": cu, "target": f"sm_{cc}", "status": "compile error",
                     "error": first[0].strip()[:300]}]
        out = []
        for f in parse_ptxas(r.stderr):
            name = cuda_kernel_name(demangle(f["function"]))
            # The feedback launcher bounds its block by the registers (maxThreadsPerBlock), as here.
            by_regs = TARGETS[cc].regs_per_sm // (-(-max(f["regs"], 1) * 32 // 256) * 256)
            row = {"kind": "cuda", "kernel": f"{cu}:{name}", "scenario": "", "config": "", "target": f"sm_{cc}",
                   "num_warps": min(cuda_block_warps(name), by_regs), "num_stages": "",
                   **{k: f[k] for k in ("regs", "spill_stores", "spill_loads", "stack")},
                   "shared_bytes": f["static_smem"], "grid": ""}
            out.append(_finish(row, TARGETS[cc], row["num_warps"]))
        return out

    tasks = [(cu, cc) for cu in sorted(f for f in os.listdir(src_dir) if f.endswith(".cu")) for cc in ccs]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return [row for rows in pool.map(lambda t: one(*t), tasks) for row in rows]


def demangle(sym: str) -> str:
    try:
        return subprocess.run(["c++filt", sym], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return sym


# Threads per block of each CUDA C++ kernel at its largest launch (the __launch_bounds__ of csrc/cuda/).
CUDA_BLOCK_THREADS = {"append_kernel": 128, "fwd_split_kernel": 128, "fwd_combine_kernel": 128,
                      "bwd_delta_kernel": 256, "bwd_dkdv_kernel": 256, "bwd_dq_kernel": 256,
                      "latent_feedback_fwd_kernel": 1024, "latent_feedback_bwd_kernel": 1024}


def cuda_kernel_name(demangled: str) -> str:
    """`append_kernel<float>` from `void coconut::(anonymous namespace)::append_kernel<float>(float*, ...)`."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    depth, end = 0, len(name)
    for i, ch in enumerate(name):  # cut the argument list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            end = i
            break
    return name[:end].rsplit("coconut::", 1)[-1]


def cuda_block_warps(name: str) -> int:
    base = name.split("<", 1)[0]
    if base not in CUDA_BLOCK_THREADS:
        raise KeyError(f"no block size known for CUDA kernel {name}: add it to CUDA_BLOCK_THREADS")
    return CUDA_BLOCK_THREADS[base] // 32


# ---- the table ---------------------------------------------------------------------------------------------

COLUMNS = ("commit", "dirty", "date", "triton", "kind", "kernel", "target", "gpu", "config", "scenario", "num_warps",
           "num_stages", "regs", "spill_stores", "spill_loads", "stack", "shared_bytes", "smem_limit",
           "warps_per_sm", "occupancy", "limiter", "grid", "status", "error")


def _git(root, *args):
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every combination of options, not the CI subset")
    ap.add_argument("--cuda", action="store_true", help="add the CUDA C++ kernels (nvcc -Xptxas -v)")
    ap.add_argument("--no-triton", action="store_true", help="only the CUDA C++ kernels")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="python whose torch headers (a CUDA build, for cusparse.h and co.) compile the .cu files")
    ap.add_argument("--append", action="store_true", help="keep the --out rows of the kinds not compiled now")
    ap.add_argument("--targets", default="80,90")
    ap.add_argument("--kernels", default=None, metavar="REGEX",
                    help="compile only the Triton kernels whose module.name matches (with --append, the table's "
                         "other rows are kept)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help="CSV to write (default: print the worst rows only)")
    a = ap.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ccs = [int(c) for c in a.targets.split(",")]
    # The state of the sources being compiled, taken before compiling (edits during a long run do not count).
    stamp = {"commit": _git(root, "rev-parse", "--short=12", "HEAD"),
             "dirty": int(bool(_git(root, "status", "--porcelain", "--untracked-files=no"))),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
             "triton": triton.__version__}
    rows: list[dict] = []
    errors: list[str] = []
    if not a.no_triton:
        for cc in ccs:
            launches = record_all(scenarios(a.full), cc)
            errors += grid_errors(launches)
            if a.kernels:
                launches = [la for la in launches if re.search(a.kernels, la.name)]
            _TODO.extend((la, cc) for la in unique(launches, cc))
        print(f"{len(_TODO)} compilations", flush=True)
        if a.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(a.jobs) as pool:
                results = pool.imap_unordered(_compile_one, range(len(_TODO)))
                rows += [_progress(i, len(_TODO), r) for i, r in enumerate(results)]
        else:
            rows += [_progress(i, len(_TODO), _compile_one(i)) for i in range(len(_TODO))]
    if a.cuda:
        rows += cuda_rows(root, a.torch_python, ccs, a.jobs)
    for r in rows:
        if "commit" not in r:  # rows kept by --append have their own stamp
            r.update(stamp)
        if r["status"] in ("compile error", "over shared-memory limit"):
            errors.append(f"{r['kernel']} [{r.get('config', '')}] {r['target']}: {r['status']} {r.get('error', '')}")
    if a.out:
        if a.append and os.path.exists(a.out):  # keep the rows of the kinds (kernels) this run did not compile
            kinds = {r["kind"] for r in rows}
            with open(a.out, newline="") as f:
                rows += [r for r in csv.DictReader(f) if r["kind"] not in kinds or
                         (a.kernels and r["kind"] == "triton" and not re.search(a.kernels, r["kernel"]))]
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: (r["kind"], r["kernel"], r.get("config", ""), r["target"])))
    ok = [r for r in rows if r.get("regs") not in (None, "")]
    for r in ok:
        for k in ("regs", "spill_stores", "spill_loads", "shared_bytes", "warps_per_sm"):
            r[k] = int(r[k])
    print(f"{len(rows)} compiled kernels; worst by spills, shared memory, occupancy:")
    for key, label in ((lambda r: -(r["spill_stores"] + r["spill_loads"]), "spills"),
                       (lambda r: -r["shared_bytes"], "shared"), (lambda r: r["warps_per_sm"], "occupancy")):
        for r in sorted(ok, key=key)[:3]:
            print(f"  [{label}] {r['kernel']} {r['target']} regs={r['regs']} spill={r['spill_stores']}/"
                  f"{r['spill_loads']} smem={r['shared_bytes']} warps/SM={r['warps_per_sm']} ({r['limiter']}) "
                  f"{r.get('config', '')}")
    for e in errors:
        print("ERROR", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
