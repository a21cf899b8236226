"""The benchmark runner (coconut_kernels.bench): its --quick mode runs and writes a well-formed CSV whose
every row carries its provenance, a machine JSON, stamped PNG plots and the record rendered from that CSV;
the ratios it prints come from the rows it wrote; the CPU memory measurement counts what a step allocates."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coconut_kernels.bench.__main__ import CSV_FIELDS, NOTES, PROVENANCE, format_table, ratio_table, run_scenario
from coconut_kernels.bench.harness import Case, Scenario, cpu_peak_allocated

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    record = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    record.write_text(f"# old record\n\nstale text that must go\n\n{NOTES}\n\nA hand-written note.\n")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    done = subprocess.run([sys.executable, "-m", "coconut_kernels.bench", "--quick", "--threads", "2",
                           "--scenario", "latent_feedback", "--scenario", "train_step", "--scenario", "generate",
                           "--write-results", str(record)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return record, done.stdout, head


def _rows(record: Path) -> list[dict]:
    with open(record.parent / "results" / "results.csv") as f:
        return [dict(r, p20=float(r["p20"]), p50=float(r["p50"]), p80=float(r["p80"])) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_quick_run_writes_csv_json_png_with_provenance(quick_run):
    record, stdout, head = quick_run
    out = record.parent / "results"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0].keys()) == CSV_FIELDS
    assert {r["scenario"] for r in rows} >= {"latent_feedback", "train_step", "train_step_latents", "generate"}
    for r in rows:
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80, r
        assert r["commit"] == head and r["dirty"] in ("0", "1"), r
        assert r["threads"] == "2" and r["dtype"] == "float32" and r["device"].startswith("CPU"), r
        assert r["torch"] == torch.__version__ and re.match(r"\d{4}-\d\d-\d\dT", r["date"]), r
        assert r["command"].startswith("python -m coconut_kernels.bench --quick --threads 2"), r
    machine = json.loads((out / "machine.json").read_text())
    assert machine["torch_threads"] == 2 and machine["commit"] == head and machine["wall_s"] > 0
    for scn in ("train_step", "generate"):
        png = (out / f"{scn}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"commit {head}".encode() in png and b"2 threads" in png  # the stamp is in the PNG's text chunk
    assert "torch.set_num_threads(2)" in stdout and f"commit {head}" in stdout


@pytest.mark.slow
def test_external_floor_and_whole_memory_columns(quick_run):
    """train_step and generate have a plain-transformers row at every point and its ratio columns; the CPU
    memory column is the profiler's peak of everything the step allocates, and says so."""
    record, stdout, _ = quick_run
    rows = _rows(record)
    for scn in ("train_step", "train_step_latents", "generate"):
        sub = [r for r in rows if r["scenario"] == scn]
        points = {r["x_value"] for r in sub}
        assert {r["x_value"] for r in sub if r["provider"] == "transformers" and r["role"] == "external"
                and r["metric"] == "time"} == points, scn
        table = ratio_table(sub)
        assert table[0][-2:] == ["time / transformers", "mem / transformers"]
        line = next(t for t in table[1:] if t[1] == "coconut_kernels")
        t = {r["provider"]: r["p50"] for r in sub if r["metric"] == "time" and r["x_value"] == line[0].split("=")[1]}
        assert float(line[-2]) == pytest.approx(t["coconut_kernels"] / t["transformers"], rel=1e-2)
    mems = [r for r in rows if r["scenario"] == "train_step" and r["metric"].startswith("memory")]
    assert {r["metric"] for r in mems} == {"memory (peak allocated during the step, torch.profiler memory events)"}
    mem = {r["provider"]: r["p50"] for r in mems}
    # transformers holds at least the full-vocabulary logits (B x T x V fp32, here B=2, T>=50); ours less.
    assert mem["transformers"] > max(2 * 50 * 50257 * 4 / MiB, mem["coconut_kernels"]) and mem["coconut_kernels"] > 0
    assert "memory MiB: peak allocated during the step, torch.profiler memory events" in stdout


@pytest.mark.slow
def test_printed_ratios_come_from_the_rows(quick_run):
    record, stdout, _ = quick_run
    rows = _rows(record)
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


@pytest.mark.slow
def test_record_is_rendered_from_the_csv_and_keeps_its_notes(quick_run):
    record, _, _ = quick_run
    text = record.read_text()
    rows = _rows(record)
    assert "stale text that must go" not in text
    assert text.endswith(f"{NOTES}\n\nA hand-written note.\n")
    assert f"`{rows[0]['command']}`" in text and f"commit {rows[0]['commit']}" in text
    for scn in dict.fromkeys(r["scenario"] for r in rows):
        assert f"\n## {scn}\n" in text
        assert format_table(ratio_table([r for r in rows if r["scenario"] == scn])) in text
    # --render-results makes the same record from the CSV alone, running nothing.
    record.write_text(text.replace("## train_step\n", "## edited by hand\n"))
    done = subprocess.run([sys.executable, "-m", "coconut_kernels.bench", "--render-results", str(record)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert record.read_text() == text
    with pytest.raises(SystemExit):  # the record's CSV has its own place: --out would send it elsewhere
        from coconut_kernels.bench.__main__ import main
        main(["--write-results", str(record), "--out", str(record.parent)])


def test_cpu_memory_counts_what_the_step_allocates_and_holds():
    """The peak of what one call allocates and holds at once: a tensor kept past the call counts, one freed
    before the next allocation does not, and gradients the step frees first (zero_grad) do not hide what it
    allocates, whether or not the profiler saw them allocated."""
    kept = []

    def step():
        a = torch.ones(4 * MiB // 4)              # 4 MiB, freed at the end
        kept.append(torch.ones(2 * MiB // 4))     # 2 MiB, kept after the call
        del a
        b = torch.ones(3 * MiB // 4)              # 3 MiB at once with the kept 2
        return float(b[0])

    assert cpu_peak_allocated(step) == pytest.approx(6 * MiB, abs=64 * 1024)
    w = torch.nn.Parameter(torch.randn(MiB // 4))

    def train():
        w.grad = None
        (w * 2).sum().backward()  # the product (1 MiB, freed by the forward: sum saves nothing) and the gradient

    train()
    # The first call frees a gradient allocated before the profiler started, the second one it saw allocated.
    assert [cpu_peak_allocated(train) for _ in range(2)] == pytest.approx([MiB] * 2, abs=64 * 1024)
    assert set(PROVENANCE) <= set(CSV_FIELDS)


def test_external_floor_is_the_plain_transformers_model_on_the_same_batch():
    """The train_step scenario's transformers provider is the same weights on the same batch, one pass with
    labels over the whole vocabulary: its loss is the own-model floor's (latents fed as tokens, no feedback)."""
    from coconut_kernels.bench.bench_train_step import _steps

    providers = _steps("gpt2-tiny", 2, 2, torch.device("cpu"), torch.float32, q_len=(12, 16))
    assert providers["transformers"][0] == "external"
    losses = {name: providers[name][1]()().item() for name in ("transformers", "floor")}
    assert losses["transformers"] == pytest.approx(losses["floor"], rel=1e-5)


def test_reference_cache_trim_in_either_format():
    """The reference hands back the past K/V sliced to the next pass's start, in the format the model gave:
    legacy (k, v) pairs (transformers 4.46's GPT-2) or a Cache object (newer versions)."""
    from transformers import DynamicCache

    from coconut_kernels.bench.reference_coconut import _trim_cache

    layers = [(torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)) for _ in range(3)]
    pairs = _trim_cache(tuple(layers), 6)
    assert isinstance(pairs, list) and all(k.shape[2] == v.shape[2] == 6 for k, v in pairs)
    cache = DynamicCache.from_legacy_cache(tuple(layers)) if hasattr(DynamicCache, "from_legacy_cache") \
        else DynamicCache(ddp_cache_data=layers)
    trimmed = _trim_cache(cache, 6)
    assert isinstance(trimmed, DynamicCache) and trimmed.get_seq_length() == 6
    for (k, v, *_), (k0, v0) in zip(trimmed, layers):
        assert torch.equal(k, k0[:, :, :6]) and torch.equal(v, v0[:, :, :6])


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

    info = {k: "x" for k in ("device", "torch", "triton", "coconut_kernels", "date", "commit", "torch_threads")}
    info["dirty"] = False
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
    from coconut_kernels.bench.bench_train_step import _steps

    (tmp_path / "coconut.py").write_text(
        "from coconut_kernels.bench.reference_coconut import ReferenceCoconut\n\n\n"
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


@pytest.mark.parametrize("argv, flag", [(["--threads", "0"], "--threads"), (["--reps", "-1"], "--reps"),
                                        (["--sizes", "4,x"], "--sizes"), (["--device", "tpu"], "--device")])
def test_bad_flags_are_one_line_errors(argv, flag, capsys):
    from coconut_kernels.bench.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("coconut-bench: error: ") and flag in err
