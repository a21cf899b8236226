"""The benchmark suite's runner: `python -m coconut_kernels.bench` (console script `coconut-bench`).

Runs every registered scenario (or --scenario NAME) at its embedded default (CPU: a small GPT-2-shaped
model and ProsQA-shaped batches, a few minutes on 2 cores; the GPU when there is one), prints a table per
scenario with each provider's median time (p20/p80), memory and the ratios that matter, and writes a CSV
(one row per measurement, each stamped with the commit, versions, device, threads, date and command), a JSON
of the machine and PNG plots to --out (default benchmarks/out/ under the current directory).
`--write-results` also renders the record, benchmarks/RESULTS.md, from the CSV it wrote (its plots and CSV
in benchmarks/results/); `--render-results` renders it again from the CSVs without running anything.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import harness
from .. import backend, host_memory
from ..ops import skinny_linear
from .harness import SCENARIOS
from ..errors import CoconutError
from ..validation import check_device

PROVENANCE = ["commit", "dirty", "torch", "triton", "coconut_kernels", "device", "threads", "dtype", "date",
              "command"]
CSV_FIELDS = ["scenario", "provider", "role", "x_name", "x_value", "metric", "unit", "p20", "p50", "p80"] + PROVENANCE
RECORD = Path("benchmarks") / "RESULTS.md"   # the record, relative to the repository root (the current directory)
NOTES = "## Notes"  # the record's one hand-written section: --write-results keeps it as it is

# The order scenarios run and print in; a bench module registers its scenario when imported.
ORDER = ("latent_feedback", "latent_attention", "soft_embedding", "skinny_linear", "gelu", "argmax", "train_step",
         "generate", "latent_scaling", "engine")


def _load_scenarios() -> None:
    import importlib
    for name in ORDER:
        importlib.import_module(f"{__package__}.bench_{name}")


def git_commit(root: Path, exclude: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(commit, dirty) of the checkout this package runs from: ("unknown", False) for an installed copy.
    Dirty means tracked files differ from the commit, outside `exclude` (the record the run itself rewrites)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return "unknown", False
        head = git("rev-parse", "--short=12", "HEAD").stdout.strip()
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     *(f":(exclude){e}" for e in exclude)).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return head or "unknown", bool(status.strip())


def machine_info(device: torch.device) -> dict:
    import coconut_kernels
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cpu = backend.cpu_info("model name") or platform.processor() or ""
    root = Path(coconut_kernels.__file__).resolve().parent.parent
    commit, dirty = git_commit(root, exclude=(str(RECORD), str(RECORD.parent / "results")))
    return {
        "commit": commit, "dirty": dirty,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "coconut_kernels": coconut_kernels.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "backend": coconut_kernels.get_backend(device),
        "malloc": "freed blocks kept (host_memory)" if host_memory.kept() else "default",
        "skinny_linear": "on" if skinny_linear.enabled() else "off",  # the model layer's default on this CPU
        "cpu_isa": coconut_kernels.cpu_isa(),  # the instruction set the CPU kernels run
    }


def _points(cases):
    """Consecutive cases at the same point (scenario, x) form one group, timed side by side."""
    group = []
    for case in cases:
        if group and (case.scenario, case.x_value) != (group[0].scenario, group[0].x_value):
            yield group
            group = []
        group.append(case)
    if group:
        yield group


def run_scenario(scn, settings: dict, info: dict, progress) -> list[dict]:
    """Time every case of a scenario. The providers of one point run interleaved, one repetition each in
    turn, so that a load change on a shared machine hits each of them alike and the ratios stay fair; the
    order reverses every repetition, so that no provider always inherits the caches and memory state of the
    same predecessor."""
    device = settings["device"]
    rows = []
    for group in _points(scn.cases(settings)):
        steps = {}
        for case in group:
            if settings.get("reps"):
                case.reps = settings["reps"]
            progress(f"{scn.name}: {case.provider} {case.x_name}={case.x_value}: setup and warm-up ...")
            step = _optional(case, scn, progress, case.setup)
            if step is not None and _optional(case, scn, progress, harness.time_step, step, 0, case.warmup,
                                              device) is not None:
                steps[id(case)] = step
        group = [c for c in group if id(c) in steps]
        times = {id(c): [] for c in group}
        for r in range(max((c.reps for c in group), default=0)):
            progress(f"{scn.name}: {group[0].x_name}={group[0].x_value}: repetition {r + 1}")
            for case in (group if r % 2 == 0 else group[::-1]):
                if r < case.reps and id(case) in steps:
                    t = _optional(case, scn, progress, harness.time_step, steps[id(case)], 1, 0, device)
                    if t is None:
                        del steps[id(case)]
                    else:
                        times[id(case)] += t
        for case in group:
            step = steps.pop(id(case), None)  # None: an optional provider that failed
            if step is None:
                continue
            mem = (None, "")
            if case.extra.get("memory", True):
                mem = _optional(case, scn, progress, harness.peak_memory, step, device)
            calls = None
            if case.extra.get("aten_calls"):  # the operator calls of one step (not timed: the mode slows it)
                calls = _optional(case, scn, progress, harness.count_aten_calls, step)
            del step
            if mem is not None:
                rows += _case_rows(case, times[id(case)], *mem, info, device)
                if calls is not None:
                    rows.append({**rows[-1], "metric": "aten calls per step", "unit": "calls",
                                 **dict.fromkeys(("p20", "p50", "p80"), sum(calls.values()))})
            progress(f"{scn.name}: {case.provider} {case.x_name}={case.x_value}: "
                     f"{harness.quantiles(times[id(case)])[1] * 1e3:.2f} ms")
    return rows


def _optional(case, scn, progress, fn, *args):
    """fn(*args); for an optional provider (role "other", e.g. the official checkout, which may not run here)
    a failure is reported and gives None instead of ending the run."""
    try:
        return fn(*args)
    except Exception as e:
        if case.role != "other":
            raise
        progress(f"{scn.name}: {case.provider} failed: {type(e).__name__}: {e}")
        return None


def provenance(info: dict) -> dict:
    """The columns every CSV row carries: what was run, where and when."""
    return {"commit": info["commit"], "dirty": int(info["dirty"]), "torch": info["torch"], "triton": info["triton"],
            "coconut_kernels": info["coconut_kernels"], "device": info["device"], "threads": info["torch_threads"],
            "dtype": info.get("dtype", ""), "date": info["date"], "command": info.get("command", "")}


def _case_rows(case, times: list[float], mem, mem_kind: str, info: dict, device) -> list[dict]:
    """The CSV rows of one case: time quantiles, memory, and any derived per-case metric."""
    if mem is not None and device.type != "cuda":
        mem += case.extra.get("memory_extra_bytes", 0)  # buffers the step uses but setup built (a preallocated cache)
    base = {"scenario": case.scenario, "provider": case.provider, "role": case.role, "x_name": case.x_name,
            "x_value": case.x_value, **provenance(info)}
    p20, p50, p80 = harness.quantiles(times)
    rows = [{**base, "metric": "time", "unit": "s", "p20": p20, "p50": p50, "p80": p80}]
    if case.extra.get("max"):  # the slowest repetition, beside the median: rare slow steps show here
        rows.append({**base, "metric": "time max", "unit": "s", **dict.fromkeys(("p20", "p50", "p80"), max(times))})
    if mem is not None:
        rows.append({**base, "metric": f"memory ({mem_kind})", "unit": "MiB", "p20": mem / 2**20,
                     "p50": mem / 2**20, "p80": mem / 2**20})
    for key, value in case.extra.items():
        if key.startswith("metric:"):  # a derived per-case figure (e.g. tokens per step)
            rows.append({**base, "metric": key[7:], "unit": value[1], "p20": value[0] / p80,
                         "p50": value[0] / p50, "p80": value[0] / p20})
    for metric, (unit, value) in case.extra.get("observed", {}).items():  # e.g. a request latency quantile
        rows.append({**base, "metric": metric, "unit": unit, **dict.fromkeys(("p20", "p50", "p80"), value())})
    return rows


def ratio_table(rows: list[dict]) -> list[list[str]]:
    """One line per (provider, x): median time, p20-p80, memory, and ratios vs the reference, the floor and,
    where the scenario has one, the external floor (a plain `transformers` model) at the same x, computed
    from these rows."""
    def key(r):
        return r["scenario"], r["x_name"], str(r["x_value"])

    times = {(r["provider"],) + key(r): r for r in rows if r["metric"] == "time"}
    mems = {(r["provider"],) + key(r): r for r in rows if r["metric"].startswith("memory")}
    rates = {(r["provider"],) + key(r): r for r in rows if r["unit"].endswith("/s")}
    roles = {r["provider"]: r["role"] for r in rows}
    external = [p for p in roles if roles[p] == "external"]
    head = ["case", "provider", "median", "p20-p80", "memory MiB", "rate", "rate / reference", "time / reference",
            "time / floor", "mem / floor"]
    if external:
        head += [f"time / {external[0]}", f"mem / {external[0]}"]
    out = [head]

    def of(table, role, k):
        return [table[(p,) + k] for p in roles if roles[p] == role and (p,) + k in table]

    def ratio(a, b):
        return f"{a['p50'] / b[0]['p50']:.3g}" if a and b and b[0]["p50"] else "-"

    for (prov, *k), r in times.items():
        k = tuple(k)
        mem, rate = mems.get((prov,) + k), rates.get((prov,) + k)
        line = [f"{k[0]} {k[1]}={k[2]}", prov, _fmt_t(r["p50"]), f"{_fmt_t(r['p20'])}-{_fmt_t(r['p80'])}",
                f"{mem['p50']:.1f}" if mem else "-", f"{rate['p50']:.4g} {rate['unit']}" if rate else "-",
                ratio(rate, of(rates, "reference", k)), ratio(r, of(times, "reference", k)),
                ratio(r, of(times, "floor", k)), ratio(mem, of(mems, "floor", k))]
        if external:
            line += [ratio(r, of(times, "external", k)), ratio(mem, of(mems, "external", k))]
        out.append(line)
    return out


def memory_note(rows: list[dict]) -> str:
    """How the memory column was taken, as the rows say."""
    kinds = sorted({r["metric"][len("memory ("):-1] for r in rows if r["metric"].startswith("memory (")})
    return f"memory MiB: {'; '.join(kinds)}" if kinds else ""


def _fmt_t(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def format_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(rows: list[dict], info: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    (out / "machine.json").write_text(json.dumps(info, indent=2))
    return plot(rows, out)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(r, p20=float(r["p20"]), p50=float(r["p50"]), p80=float(r["p80"])) for r in csv.DictReader(f)]


def stamp(r: dict) -> str:
    """One line of provenance from a row: commit, versions, device, threads, dtype, date."""
    return (f"commit {r['commit']}{' (dirty)' if str(r['dirty']) == '1' else ''} | torch {r['torch']} | "
            f"triton {r['triton']} | {r['device']} | {r['threads']} threads | {r['dtype']} | {r['date']}")


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for scn in sorted({r["scenario"] for r in rows}):
        sub = [r for r in rows if r["scenario"] == scn]
        metrics = [m for m in ("time",) + tuple(sorted({r["metric"] for r in sub if r["metric"].startswith("memory")}))]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for prov in sorted({r["provider"] for r in sub}):
                pts = [r for r in sub if r["provider"] == prov and r["metric"] == metric]
                if not pts:
                    continue
                xs = [str(r["x_value"]) for r in pts]
                ax.errorbar(xs, [r["p50"] for r in pts],
                            yerr=[[r["p50"] - r["p20"] for r in pts], [r["p80"] - r["p50"] for r in pts]],
                            marker="o", capsize=3, label=prov)
            ax.set_title(f"{scn}: {metric}".replace(" (", "\n("), fontsize=9)
            ax.set_xlabel(sub[0]["x_name"])
            ax.set_ylabel("s" if metric == "time" else "MiB")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        # The provenance travels with the picture: a footer of the commit, versions, device, threads and date.
        fig.text(0.01, 0.01, f"{stamp(sub[0])}\n{sub[0]['command']}", fontsize=6.5, va="bottom", ha="left",
                 color="0.3")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = out / f"{scn}.png"
        fig.savefig(path, dpi=110, metadata={"Description": f"{stamp(sub[0])} | {sub[0]['command']}"})
        plt.close(fig)
        paths.append(path)
    return paths


def render_record(record: Path) -> str:
    """The text of the record (benchmarks/RESULTS.md) from results/results.csv beside it: the command, the
    commit and the machine, then one table per benchmark with its plot. The record's Notes section, its one
    hand-written part, is kept as it is."""
    results = record.parent / "results"
    if not (results / "results.csv").exists():
        raise FileNotFoundError(f"{record}: no {results / 'results.csv'} to render; run --write-results first")
    rows = read_rows(results / "results.csv")
    if not rows:
        raise ValueError(f"{results / 'results.csv'} has no rows")
    notes = f"{NOTES}\n"
    if record.exists() and f"\n{NOTES}\n" in record.read_text():
        text = record.read_text()
        notes = text[text.index(f"\n{NOTES}\n") + 1:]
    machine = results / "machine.json"
    info = json.loads(machine.read_text()) if machine.exists() else {}
    wall, malloc, skinny = info.get("wall_s"), info.get("malloc"), info.get("skinny_linear")
    isa = info.get("cpu_isa")
    descriptions = {s.name: s.description for s in SCENARIOS.values()}
    summaries = [s.summary_table for s in SCENARIOS.values() if s.summary_table is not None]
    first = rows[0]
    lines = ["# Benchmark results", "",
             "<!-- Written by `python -m coconut_kernels.bench --write-results` (or `--render-results`, from the",
             f"     CSV alone) from results/results.csv; edit only the {NOTES[3:]} section, which it keeps. -->", "",
             textwrap.fill(
                 "The current record of the benchmark suite: every table below is rendered from "
                 "`results/results.csv`, whose rows carry the commit, versions, device, threads and date they were "
                 "measured at; the history is this file's git log. Times are medians (p20-p80) of repetitions run "
                 "side by side in one process, the providers of a point interleaved: on a shared machine only the "
                 "ratios of one run compare. Roles: `reference` = the reference COCONUT algorithm (on a "
                 "`transformers` GPT-2 with the same weights), `floor` = the same work without the sequential "
                 "structure on this library's model, `transformers` (the external floor) = a plain `transformers` "
                 "model of the same shape and weights on the same batch, as users run it today.", 115), "",
             f"Command: `{first['command']}`" + (f" ({wall:.0f} s of measurement)." if wall else "."), "",
             f"Provenance: {stamp(first)}" + (f"; host malloc: {malloc}" if malloc else "")
             + (f"; skinny_linear in the model layer: {skinny}" if skinny else "")
             + (f"; CPU kernels: {isa}" if isa else "") + ".", ""]
    note = memory_note(rows)
    if note:
        lines += [f"{note[0].upper()}{note[1:]}.", ""]
    for scn in dict.fromkeys(r["scenario"] for r in rows):
        sub = [r for r in rows if r["scenario"] == scn]
        lines += [f"## {scn}", ""]
        if scn in descriptions:
            lines += [f"{descriptions[scn]}.", ""]
        lines += ["```", format_table(ratio_table(sub)), "```", ""]
        for summary in summaries:  # derived rows (e.g. latent_scaling's fits): their table under the times
            table = summary(sub)
            if len(table) > 1:
                lines += ["```", format_table(table), "```", ""]
        if (results / f"{scn}.png").exists():
            lines += [f"![{scn}](results/{scn}.png)", ""]
    lines.append(notes.rstrip())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="coconut-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of every scenario (tiny model, short prompts, 2-3 repetitions; seconds on a CPU)")
    ap.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--sizes", default=None, help="comma-separated x values (batch sizes) overriding the default")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2 or the core count)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default: per scenario)")
    ap.add_argument("--model", default=None, choices=["gpt2-tiny", "gpt2-4x256", "gpt2-small"],
                    help="model of the train_step and generate scenarios (default gpt2-4x256; --quick: gpt2-tiny)")
    ap.add_argument("--official", default=None, metavar="PATH",
                    help="also run a checkout of the reference repository (its coconut.py, with the transformers "
                         "version it was written for)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out)")
    ap.add_argument("--write-results", nargs="?", const=str(RECORD), default=None, metavar="RECORD",
                    help=f"write the CSV, JSON and plots to the results/ folder beside RECORD (default {RECORD}) "
                         "and render RECORD from them, keeping its Notes section")
    ap.add_argument("--render-results", nargs="?", const=str(RECORD), default=None, metavar="RECORD",
                    help="render RECORD again from the CSVs in the results/ folder beside it, running nothing")
    ap.add_argument("--full", action="store_true",
                    help="the whole workload of the scenarios that run a reduced one by default (latent_scaling, "
                         "engine)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    for flag in ("threads", "reps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag} must be an int >= 1, got {getattr(args, flag)}")
    if args.sizes and not all(s.strip().isdigit() and int(s) >= 1 for s in args.sizes.split(",")):
        ap.error(f"--sizes must be comma-separated ints >= 1, got {args.sizes!r}")
    if args.device is not None:
        try:
            check_device(args.device, "--device", meta=False)
        except CoconutError as e:
            ap.error(str(e))

    _load_scenarios()
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:16s} {s.description}")
        return 0
    if args.render_results:
        record = Path(args.render_results)
        record.write_text(render_record(record))
        print(f"wrote {record}")
        return 0
    if args.write_results and args.out:
        ap.error("--out and --write-results exclude each other: the record's CSV goes to the results/ folder "
                 "beside it")
    out = Path(args.write_results).parent / "results" if args.write_results else Path(args.out or "benchmarks/out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    host_memory.keep_unless_disabled()  # every provider of this process alike: large freed blocks stay in the heap
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    settings = {"device": device, "dtype": dtype, "quick": args.quick, "official": args.official,
                "sizes": [int(s) for s in args.sizes.split(",")] if args.sizes else None, "model": args.model,
                "reps": args.reps, "full": args.full}
    info = machine_info(device)
    info.update(dtype=str(dtype).removeprefix("torch."), command=shlex.join(["python", "-m", __package__, *argv]))
    print(f"coconut_kernels {info['coconut_kernels']} | commit {info['commit']}{' (dirty)' if info['dirty'] else ''}"
          f" | torch {info['torch']} | triton {info['triton']} | {info['device']} | "
          f"torch.set_num_threads({threads}) | dtype {info['dtype']} | malloc {info['malloc']} | skinny_linear "
          f"{info['skinny_linear']} | CPU kernels {info['cpu_isa']}"
          f"{' | quick' if args.quick else ''}", flush=True)

    def progress(msg):
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    all_rows = []
    for name in names:
        scn = SCENARIOS[name]
        rows = run_scenario(scn, settings, info, progress)
        print(f"\n## {name}: {scn.description}\n")
        print(format_table(ratio_table(rows)), flush=True)
        if memory_note(rows):
            print(memory_note(rows), flush=True)
        if scn.summarize is not None:
            rows += scn.summarize(rows)
            if scn.summary_table is not None:
                print("\n" + format_table(scn.summary_table(rows)), flush=True)
        all_rows.extend(rows)
    info["wall_s"] = time.perf_counter() - t0
    paths = write_outputs(all_rows, info, out)
    print(f"\nwrote {out / 'results.csv'}, {out / 'machine.json'}, " + ", ".join(str(p) for p in paths))
    if args.write_results:
        record = Path(args.write_results)
        record.write_text(render_record(record))
        print(f"wrote {record} ({info['wall_s']:.0f} s of measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
