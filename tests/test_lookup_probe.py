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
    x, marks = next(probe.batches(seed=3, batch=5, pairs=4, symbols=10))
    assert x.shape == marks.shape == (5, 3 * 4 + 3)
    for row, mark in zip(x.tolist(), marks.tolist()):
        body, (q, key, value) = row[:-3], row[-3:]
        pairs = {body[i]: body[i + 1] for i in range(0, len(body), 3)}
        assert q == 11 and body[2::3] == [10] * 4 and len(pairs) == 4 and pairs[key] == value
        assert mark == [False] * 14 + [True]
    again, _ = next(probe.batches(3, 5, 4, 10))
    assert again.equal(x)


def test_every_knob_builds_the_sequences_it_names():
    pairs, symbols, k = 6, 12, 2
    x, marks = next(probe.batches(seed=1, batch=8, pairs=pairs, symbols=symbols, queries="all", values="keys",
                                  children=k, gap=True))
    sep, query = symbols, symbols + 1
    for row, mark, table in zip(x.tolist(), marks.tolist(), probe.values_of(x, pairs)):
        body, tail = row[:3 * pairs], row[3 * pairs:]
        assert body[2::3] == [sep] * pairs
        assert len(table) == pairs // k and all(len(vs) <= k for vs in table.values())
        assert sum(body[0::3].count(key) for key in table) == pairs  # every pair's key is one of pairs // k
        assert all(v in table and v != key for key, vs in table.items() for v in vs)  # values are other keys
        queries = [tail[i:i + 4] for i in range(0, len(tail), 4)]
        assert sorted(q[1] for q in queries) == sorted(table)  # every key asked once
        for q in queries:
            assert q[0] == query and q[2] == sep and q[3] in table[q[1]]
        assert [i for i, m in enumerate(mark) if m] == [3 * pairs + 4 * j + 3 for j in range(len(queries))]


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
    for bad in (["--pairs", "9", "--symbols", "8"], ["--children", "13"], ["--easy_first", "-1"],
                ["--values", "keys", "--pairs", "4", "--children", "4"]):
        with pytest.raises(SystemExit):
            probe.main(bad)


def test_easy_first_trains_the_easy_task_then_the_asked_one(capsys):
    threads = torch.get_num_threads()
    try:
        probe.main(["--steps", "3", "--every", "1", "--pairs", "4", "--symbols", "8", "--d_model", "16",
                    "--heads", "2", "--queries", "all", "--children", "2", "--gap", "--easy_first", "2"])
    finally:
        torch.set_num_threads(threads)
    steps = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert steps == ["step 1 (easy)", "step 2 (easy)", "step 3"]


def test_accuracy_counts_any_of_a_keys_values():
    # pairs 1->2, 1->3, 2->1 (| is 4, ? is 5), then ? 1 | v and ? 2 | v
    x = torch.tensor([[1, 2, 4, 1, 3, 4, 2, 1, 4, 5, 1, 4, 3, 5, 2, 4, 1]])
    marks = torch.zeros_like(x, dtype=torch.bool)
    marks[0, [12, 16]] = True
    assert probe.accuracy(x, marks, [2, 1], pairs=3, gap=True) == 1.0  # 2 is a value of 1 as well as 3
    assert probe.accuracy(x, marks, [1, 1], pairs=3, gap=True) == 0.5
    assert probe.accuracy(x, marks, [4, 3], pairs=3, gap=True) == 0.0
