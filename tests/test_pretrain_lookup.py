"""examples/prosqa_cpu/pretrain_lookup.py: its lookups and walks hold what its docstring says, and a tiny run
writes a checkpoint that coconut-train starts from (given as the save folder)."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
import yaml

from coconut_kernels.train import run
from coconut_kernels.training import TrainConfig
from coconut_kernels.training.checkpoint import is_checkpoint, latest_checkpoint

spec = importlib.util.spec_from_file_location(
    "pretrain_lookup", Path(__file__).parents[1] / "examples" / "prosqa_cpu" / "pretrain_lookup.py")
pre = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pre)

TINY_MODEL = {"family": "llama", "n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32, "max_position": 512}


def test_lookups_ask_every_key_for_its_value():
    tok = pre.tokenizer_for("small")
    ids, targets = pre.lookup_example(random.Random(0), tok, keys=5)
    words = tok.decode(ids).replace(",", " ,").replace(".", " .").replace("?", " ?").split()
    pairs = {}
    body = words[:words.index(".")]
    for i in range(0, len(body), 3):  # k v ,
        pairs[body[i]] = body[i + 1]
    assert len(pairs) == 5
    asked = []
    for pos, ok in targets:
        key, value = tok.decode([ids[pos - 1]]), tok.decode([ids[pos]])
        assert tok.decode([ids[pos - 2]]) == "?" and ok == {ids[pos]} and pairs[key] == value
        asked.append(key)
    assert sorted(asked) == sorted(pairs)


def test_backward_lookups_ask_every_value_for_its_keys():
    tok = pre.tokenizer_for("small")
    for seed in range(4):
        ids, targets = pre.lookup_example(random.Random(seed), tok, keys=40, direction="backward")
        words = tok.decode(ids).replace(",", " ,").replace(".", " .").replace("?", " ?").split()
        body = words[:words.index(".")]
        pairs = [(body[i], body[i + 1]) for i in range(0, len(body), 3)]  # k v ,
        assert len(targets) == 40
        for pos, ok in targets:
            value, key = tok.decode([ids[pos - 1]]), tok.decode([ids[pos]])
            assert tok.decode([ids[pos - 2]]) == "?" and (key, value) in pairs
            assert ok == {tok.encode(k)[0] for k, v in pairs if v == value}  # any key of that value counts


@pytest.mark.parametrize("direction", ["forward", "backward", "both"])
def test_walks_follow_the_questions_edges(direction):
    """Each step of a walk goes along an edge (forward) or against one (backward), any child / parent counts;
    "both" has walks of each kind."""
    tok = pre.tokenizer_for("small")
    (nl,) = tok.encode("\n")
    kinds = set()
    for seed in range(8):
        ids, targets = pre.walk_example(random.Random(seed), tok, "small", walks=3, direction=direction)
        question = tok.decode(ids[:ids.index(nl)])
        edges = {tuple(e.split()) for e in question.split(".")[0].split(", ")}
        nodes = [(pos, ok) for pos, ok in targets if ok != {nl}]
        assert nodes and all(ids[pos + 1] == nl for pos, _ in nodes)
        for pos, ok in nodes:
            prev, here = tok.decode([ids[pos - 2]]), tok.decode([ids[pos]])
            kind = "forward" if (prev, here) in edges else "backward"
            assert (prev, here) in edges or (here, prev) in edges  # the walk steps along an edge or against it
            nexts = {b for a, b in edges if a == prev} if kind == "forward" else {a for a, b in edges if b == prev}
            assert ok == {tok.encode(n)[0] for n in nexts}  # ... and any next node counts
            kinds.add(kind)
        assert [pos for pos, ok in targets if ok == {nl}] == [i for i, t in enumerate(ids) if t == nl][1:]
    assert kinds == ({"forward", "backward"} if direction == "both" else {direction})


def test_a_tiny_run_seeds_a_method_run(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"method": "cot", "model": TINY_MODEL, "seed": 0}))
    threads = torch.get_num_threads()
    try:
        folder = pre.main(["--config", str(config), "--out", str(tmp_path / "lookup"), "--lookup_steps", "2",
                           "--walk_steps", "2", "--batch", "4", "--every", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[1:5]] == ["step 1 (lookup)", "step 2 (lookup)", "step 3 (walks)",
                                                             "step 4 (walks)"]
    assert is_checkpoint(folder) and latest_checkpoint(tmp_path / "lookup") == folder
    out = run(TrainConfig(init_from=str(tmp_path / "lookup"), method="cot", generate_train=8, generate_val=4,
                          generate_render="edges", generate_size="small", num_epochs=1, batch_size=4,
                          eval_batch_size=4, max_new_tokens=4, save_dir=str(tmp_path / "cot"), progress=False,
                          tensorboard=False))
    assert out["losses"] and (out["checkpoint"] / "tokenizer.json").read_text() == \
        (folder / "tokenizer.json").read_text()
    for bad in (["--keys", "0"], ["--walk_steps", "-1"]):
        with pytest.raises(SystemExit):
            pre.main(bad)
