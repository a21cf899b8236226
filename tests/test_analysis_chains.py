"""The CoT yardsticks of `coconut_kernels.analysis.chains` on a hand-made graph: the random-walk chain's
chance of reaching the target, the fewer-parents shortcut, and written chains read back step by step."""
from __future__ import annotations

import json

import pytest

from coconut_kernels.analysis.chains import baselines, main, read_backward_chains, read_chains
from coconut_kernels.data import generate_dataset
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


# The same graph in the edges render with the backward chain: zorpus <- wumpus <- Tom, lempus <- Ann.
BACKWARD = dict(RECORD, question="Tom wumpus, Tom yumpus, wumpus zorpus, yumpus gorpus, yumpus zorpus, Ann lempus, "
                                 "Ann gorpus. zorpus or lempus? Tom",
                steps=["zorpus lempus", "wumpus Ann", "Tom Ann"], answer="zorpus")


def test_backward_chains_read_back(tmp_path, capsys):
    outputs = [
        {"idx": 0, "output": "zorpus lempus\nwumpus Ann\nTom Ann\n### zorpus"},  # right walks, right answer
        {"idx": 0, "output": "zorpus lempus\nyumpus Ann\nTom Ann\n### lempus"},  # right walks, the other answer
        {"idx": 0, "output": "zorpus lempus\nyumpus Ann\ngorpus Ann\n### zorpus"},  # against an edge's direction
        {"idx": 0, "output": "zorpus lempus\nwumpus Ann\nTom Tom\n### zorpus"},  # both walks end at Tom
        {"idx": 0, "output": "zorpus lempus\nwumpus\n### zorpus"},  # not two names per line
    ]
    c = read_backward_chains([BACKWARD], outputs, "outs")
    assert c["n"] == 5 and c["on_edges"] == pytest.approx(2 / 5)  # the 4th: Ann -> Tom is no edge
    assert c["target_walk"] == pytest.approx(2 / 5) and c["answer_follows"] == pytest.approx(1 / 2)
    # the generator's own chains read back whole, and the command prints the backward line for such records
    records = generate_dataset(20, seed=3, size="small", render="edges", chain="backward")
    reference = [{"idx": i, "output": "\n".join(r["steps"]) + "\n### " + r["answer"]} for i, r in enumerate(records)]
    assert read_backward_chains(records, reference, "ref") == {"n": 20, "on_edges": 1.0, "target_walk": 1.0,
                                                               "answer_follows": 1.0}
    data, outs = tmp_path / "d.json", tmp_path / "o.json"
    data.write_text(json.dumps(records))
    outs.write_text(json.dumps({"examples": reference}))
    assert main(["--data", str(data), "--outputs", str(outs)]) == 0
    assert "(20 backward chains): both walks against edges only 100.0%" in capsys.readouterr().out
