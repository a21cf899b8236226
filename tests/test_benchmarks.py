"""The benchmark runner's --quick mode: it runs, writes a well-formed CSV, a machine JSON and PNG plots, and
the ratios it prints are computed from the rows it wrote."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import CSV_FIELDS, format_table, ratio_table, run_scenario
from benchmarks.harness import Case, Scenario

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--scenario", "latent_feedback",
                           "--scenario", "train_step", "--scenario", "generate", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout


@pytest.mark.slow
def test_quick_run_writes_csv_json_png(quick_run):
    out, stdout = quick_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0].keys()) == CSV_FIELDS
    assert {r["scenario"] for r in rows} >= {"latent_feedback", "train_step", "train_step_latents", "generate"}
    for r in rows:
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80, r
        assert r["date"] and r["torch"] and r["device"]
    machine = json.loads((out / "machine.json").read_text())
    assert machine["torch_threads"] >= 1 and "torch" in machine
    for scn in ("train_step", "generate"):
        png = out / f"{scn}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torch.set_num_threads(" in stdout


@pytest.mark.slow
def test_printed_ratios_come_from_the_rows(quick_run):
    out, stdout = quick_run
    with open(out / "results.csv") as f:
        rows = [dict(r, p20=float(r["p20"]), p50=float(r["p50"]), p80=float(r["p80"])) for r in csv.DictReader(f)]
    for scn in ("train_step", "generate"):
        table = ratio_table([r for r in rows if r["scenario"].startswith(scn)])
        for line in format_table(table).splitlines()[2:]:
            assert line in stdout
    # And the ratio itself: the library's time over the reference's at the same point.
    t = {(r["provider"], r["x_value"]): r["p50"] for r in rows if r["scenario"] == "train_step" and r["metric"] == "time"}
    x = next(x for p, x in t if p == "coconut_kernels")
    table = ratio_table([r for r in rows if r["scenario"] == "train_step"])
    row = next(r for r in table[1:] if r[1] == "coconut_kernels" and r[0].endswith(f"={x}"))
    assert float(row[7]) == pytest.approx(t[("coconut_kernels", x)] / t[("reference", x)], rel=1e-2)


def test_interleaved_run_drops_a_failing_optional_provider_only():
    """Providers of one point are timed in turn; an optional provider (role "other") that fails in setup,
    warm-up or timing is reported and left out, while a failing required provider ends the run."""
    calls = []

    def provider(name, fail_at=None):
        def setup():
            if fail_at == "setup":
                raise RuntimeError("no checkout")
            n = {"k": 0}

            def step():
                n["k"] += 1
                calls.append(name)
                if fail_at == "warmup" or (fail_at == "timing" and n["k"] > 2):
                    raise RuntimeError("broken")
            return step
        return setup

    def cases(settings):
        yield Case("s", "ours", "B", 1, provider("ours"), reps=3, extra={"memory": False})
        yield Case("s", "floor", "B", 1, provider("floor"), role="floor", reps=3, extra={"memory": False})
        for where in ("setup", "warmup", "timing"):
            yield Case("s", f"other-{where}", "B", 1, provider(f"other-{where}", where), role="other", reps=3,
                       extra={"memory": False})

    info = {k: "x" for k in ("device", "torch", "triton", "coconut_kernels", "date")}
    settings = {"device": torch.device("cpu"), "reps": None}
    messages = []
    rows = run_scenario(Scenario("s", "test", cases), settings, info, messages.append)
    assert {r["provider"] for r in rows} == {"ours", "floor"}
    assert sum("failed" in m for m in messages) == 3
    # interleaved after the warm-ups, one repetition each in turn, the order reversed every repetition
    timed = [c for c in calls if c in ("ours", "floor")][2:]
    assert timed[:6] == ["ours", "floor", "floor", "ours", "ours", "floor"]

    def bad(settings):
        yield Case("s", "ours", "B", 1, provider("ours", "warmup"), reps=1, extra={"memory": False})

    with pytest.raises(RuntimeError, match="broken"):
        run_scenario(Scenario("s", "test", bad), settings, info, messages.append)


def test_official_option_loads_a_checkouts_coconut_py(tmp_path):
    """--official PATH runs the `Coconut` class of PATH/coconut.py on the same model and batch as the other
    providers (here a stand-in checkout whose Coconut is the benchmark's re-implementation with its loss doubled,
    so that the figure can only come from the checkout's class)."""
    from benchmarks.bench_train_step import _steps

    (tmp_path / "coconut.py").write_text(
        "from benchmarks.reference_coconut import ReferenceCoconut\n\n\n"
        "class Coconut(ReferenceCoconut):\n"
        "    def forward(self, *args):\n"
        "        loss, logits, embeds = super().forward(*args)\n"
        "        return 2 * loss, logits, embeds\n")
    providers = _steps("gpt2-tiny", 2, 2, torch.device("cpu"), torch.float32, official=str(tmp_path), q_len=(12, 16))
    assert providers["official checkout"][0] == "other"
    losses = {name: providers[name][1]()().item() for name in ("official checkout", "reference", "coconut_kernels")}
    assert losses["official checkout"] == pytest.approx(2 * losses["reference"], rel=1e-6)
    assert abs(losses["coconut_kernels"] - losses["reference"]) < 1e-4 * abs(losses["reference"])
    with pytest.raises(FileNotFoundError, match="no coconut.py"):
        _steps("gpt2-tiny", 2, 2, torch.device("cpu"), torch.float32, official=str(tmp_path / "missing"),
               q_len=(12, 16))["official checkout"][1]()
