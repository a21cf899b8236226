"""The CoT yardsticks of `coconut_kernels.analysis.chains` on a hand-made graph: the random-walk chain's
chance of reaching the target, the fewer-parents shortcut, and written chains read back step by step."""
from __future__ import annotations

import json

import pytest

from coconut_kernels.analysis.chains import baselines, main, read_chains
from coconut_kernels.errors import CoconutError

# Tom -> wumpus -> zorpus (target); Tom -> yumpus -> gorpus, yumpus -> zorpus; Ann -> lempus (wrong option);
# Ann -> gorpus. From Tom, two steps: wumpus (1/2) then zorpus; yumpus (1/2) then zorpus or gorpus (1/2 each).
RECORD = {
    "question": "Tom is a wumpus. Tom is a yumpus. Every wumpus is a zorpus. Every yumpus is a gorpus. Every yumpus "
                "is a zorpus. Ann is a lempus. Ann is a gorpus. Is Tom a zorpus or lempus?",
    "steps": ["Tom is a wumpus.", "Every wumpus is a zorpus."], "answer": "Tom is a zorpus.",
    "idx_to_symbol": ["Tom", "Ann", "wumpus", "yumpus", "zorpus", "gorpus", "lempus"],
    "edges": [[0, 2], [0, 3], [2, 4], [3, 5], [3, 4], [1, 6], [1, 5]],
    "root": 0, "target": 4, "neg_target": 6,
}


def test_baselines_of_a_hand_made_graph():
    b = baselines([RECORD], "hand")
    assert b["random_walk"] == pytest.approx(0.5 + 0.25)
    assert b["fewer_parents"] == 0.0  # zorpus has 2 parents, lempus 1: the shortcut picks the wrong option
    assert b["root_children"] == 2.0
    tie = dict(RECORD, edges=[e for e in RECORD["edges"] if e != [3, 4]])
    assert baselines([tie], "hand")["fewer_parents"] == 0.5 and baselines([tie], "hand")["random_walk"] == 0.5


def test_written_chains_read_back():
    outputs = [
        {"idx": 0, "output": "Tom is a wumpus.\nEvery wumpus is a zorpus.\n### Tom is a zorpus."},  # a walk, right
        {"idx": 0, "output": "Tom is a yumpus.\nEvery yumpus is a yumpus.\n### Tom is a yumpus."},  # a self-loop
        {"idx": 0, "output": "Tom is a shumpus.\nEvery wumpus is a lempus.\n### Tom is a lempus."},  # foreign, no edge
    ]
    c = read_chains([RECORD], outputs, "outs")
    assert c["n"] == 3 and c["steps"] == 6
    assert c["edge_steps"] == pytest.approx(3 / 6)  # Tom-wumpus, wumpus-zorpus, Tom-yumpus
    assert c["foreign_steps"] == pytest.approx(1 / 6) and c["self_loops"] == pytest.approx(1 / 6)
    assert c["root_first"] == pytest.approx(2 / 3) and c["walks"] == pytest.approx(1 / 3)
    assert c["end_target"] == pytest.approx(1 / 3) and c["end_wrong_option"] == pytest.approx(1 / 3)


def test_edges_render_chains_read_back():
    """The generator's edges render: node names one per line, each step from the node before (the root first)."""
    record = dict(RECORD, question="Tom wumpus, Tom yumpus, wumpus zorpus. zorpus or lempus? Tom",
                  steps=["wumpus", "zorpus"], answer="zorpus")
    outputs = [
        {"idx": 0, "output": "wumpus\nzorpus\n### zorpus"},  # a walk to the target
        {"idx": 0, "output": "yumpus\nyumpus\n### yumpus"},  # root edge, then a self-loop
        {"idx": 0, "output": "shumpus\nlempus\n### lempus"},  # foreign, then no edge
    ]
    c = read_chains([record], outputs, "outs")
    assert c["steps"] == 6 and c["edge_steps"] == pytest.approx(3 / 6)
    assert c["foreign_steps"] == pytest.approx(2 / 6) and c["self_loops"] == pytest.approx(1 / 6)
    assert c["root_first"] == pytest.approx(2 / 3) and c["walks"] == pytest.approx(1 / 3)
    assert c["end_target"] == pytest.approx(1 / 3) and c["end_wrong_option"] == pytest.approx(1 / 3)


def test_command_line_and_bad_input(tmp_path, capsys):
    data, outs = tmp_path / "valid.json", tmp_path / "eval.json"
    data.write_text(json.dumps([RECORD]))
    outs.write_text(json.dumps({"examples": [{"idx": 0, "output": "Tom is a wumpus.\n### Tom is a wumpus."}]}))
    assert main(["--data", str(data), "--outputs", str(outs)]) == 0
    out = capsys.readouterr().out
    assert "ends at the target 75.0%" in out and "steps that are edges of the graph 100.0%" in out
    outs.write_text(json.dumps({"examples": [{"idx": 5, "output": ""}]}))
    assert main(["--data", str(data), "--outputs", str(outs)]) == 2
    assert "eval.json: example 0: field 'idx'" in capsys.readouterr().err
    with pytest.raises(CoconutError, match=r"bad.json: record 0: field 'edges\[0\]': node 9 is unknown"):
        baselines([dict(RECORD, edges=[[0, 9]])], "bad.json")
