"""examples/prosqa_cpu/lookup_probe.py: its sequences hold what the docstring says, and a short run trains both
models on the same batches and reports both."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

spec = importlib.util.spec_from_file_location("lookup_probe",
                                              Path(__file__).parents[1] / "examples" / "prosqa_cpu" / "lookup_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_batches_hold_pairs_then_a_query_and_its_value():
    x = next(probe.batches(seed=3, batch=5, pairs=4, symbols=10))
    assert x.shape == (5, 3 * 4 + 3)
    for row in x.tolist():
        body, (q, key, value) = row[:-3], row[-3:]
        pairs = {body[i]: body[i + 1] for i in range(0, len(body), 3)}
        assert q == 11 and body[2::3] == [10] * 4 and len(pairs) == 4 and pairs[key] == value
    assert next(probe.batches(3, 5, 4, 10)).equal(x)


def test_a_short_run_reports_both_models(capsys):
    threads = torch.get_num_threads()  # the probe sets its own
    try:
        probe.main(["--steps", "2", "--every", "1", "--pairs", "3", "--symbols", "8", "--d_model", "16",
                    "--heads", "2"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert "chance 0.125" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["step 1", "step 2"]
    assert all("coconut_kernels loss" in line and "transformers loss" in line for line in lines[1:])
    with pytest.raises(SystemExit):
        probe.main(["--pairs", "9", "--symbols", "8"])
