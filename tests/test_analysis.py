"""coconut-analyze: the thought analysis' numbers on a hand-made graph whose read-out probabilities are set by
construction, the graph checks, and the command end to end on a tiny checkpoint."""
import copy
import csv
import json
import math

import numpy as np
import pytest
import torch

from coconut_kernels.analysis import aggregate_steps, graph_info, main, step_node_sets, thought_rows
from coconut_kernels.analysis.thoughts import node_token_ids
from coconut_kernels.data import WordTokenizer, generate_dataset
from coconut_kernels.errors import CoconutError

# Tom -> wumpus -> zumpus (answer); Tom -> yumpus -> rempus; Tom -> dumpus (a leaf); Amy -> gorpus (wrong option)
SYMBOLS = ["Tom", "Amy", "wumpus", "yumpus", "zumpus", "rempus", "gorpus", "dumpus"]
EDGES = [[0, 2], [0, 3], [2, 4], [3, 5], [1, 6], [0, 7]]


def _record():
    sentences = ["Tom is a wumpus.", "Tom is a yumpus.", "Every wumpus is a zumpus.", "Every yumpus is a rempus.",
                 "Amy is a gorpus.", "Tom is a dumpus."]
    return {"question": " ".join(sentences) + " Is Tom a zumpus or gorpus?",
            "steps": ["Tom is a wumpus.", "Every wumpus is a zumpus."], "answer": "Tom is a zumpus.",
            "idx_to_symbol": list(SYMBOLS), "edges": copy.deepcopy(EDGES), "root": 0, "target": 4, "neg_target": 6}


def test_graph_values():
    g = graph_info(_record(), "hand.json: record 0")
    assert g.depth == {0: 0, 2: 1, 3: 1, 7: 1, 4: 2, 5: 2}
    assert g.frontier(1) == [2, 3, 7] and g.frontier(2) == [4, 5] and g.frontier(3) == []
    # height = shortest distance to a leaf (zumpus, rempus, gorpus, dumpus are leaves)
    assert g.height == [1, 1, 1, 1, 0, 0, 0, 0]
    assert g.to_target == [2, None, 1, None, 0, None, None, None]


def test_numbers_on_a_hand_made_head():
    """LM head = identity and thought i = log p_i, so the read-out is exactly the chosen p_i."""
    rec = _record()
    tok = WordTokenizer.from_records([rec])
    g = graph_info(rec, "hand.json: record 0")
    ids = node_token_ids(g, tok, "hand.json: record 0")
    assert all(len(i) == 1 for i in ids)
    V = tok.vocab_size
    tid = {s: ids[v][0] for v, s in enumerate(SYMBOLS)}
    chosen = [{"wumpus": 0.5, "yumpus": 0.3, "dumpus": 0.05, "zumpus": 0.02},
              {"zumpus": 0.6, "rempus": 0.1, "wumpus": 0.1, "gorpus": 0.05}]
    probs = torch.zeros(2, V, dtype=torch.float64)
    for i, c in enumerate(chosen):
        rest = (1.0 - sum(c.values())) / (V - len(c))
        probs[i] = rest
        for s, p in c.items():
            probs[i, tid[s]] = p
    latents = probs.log() + torch.tensor([[3.0], [-1.5]], dtype=torch.float64)  # softmax ignores a shift
    eye = torch.eye(V, dtype=torch.float64)
    step_nodes = step_node_sets(rec, g)
    assert step_nodes == [{0, 2}, {2, 4}]  # Tom, wumpus; wumpus, zumpus
    nodes, thoughts = thought_rows(latents, eye, None, eye, g, ids, c_thought=1, vocab=tok.vocab, record=0,
                                   step_nodes=step_nodes)
    assert len(nodes) == 2 * len(SYMBOLS) and len(thoughts) == 2

    def p(step, sym):
        return next(r["prob"] for r in nodes if r["step"] == step and r["symbol"] == sym)

    for i, c in enumerate(chosen):
        for s in SYMBOLS:
            assert p(i + 1, s) == pytest.approx(c.get(s, float(probs[i, 0])), rel=1e-12)
    rest0, rest1 = float(probs[0, 0]), float(probs[1, 0])
    t1, t2 = thoughts
    # step 1: frontier = wumpus, yumpus, dumpus; others = Tom, Amy, zumpus, rempus, gorpus
    assert t1["frontier_mass"] == pytest.approx(0.5 + 0.3 + 0.05)
    assert t1["nonfrontier_mass"] == pytest.approx(0.02 + 4 * rest0)
    # step 2: frontier = zumpus, rempus
    assert t2["frontier_mass"] == pytest.approx(0.7)
    assert t2["nonfrontier_mass"] == pytest.approx(0.1 + 0.05 + 4 * rest1)  # Tom, Amy, yumpus, dumpus at rest
    assert t1["top1_token"] == "wumpus" and t1["top1_prob"] == pytest.approx(0.5)
    # the replaced language steps' nodes: Tom (at rest) and wumpus; wumpus and zumpus
    assert t1["step_mass"] == pytest.approx(0.5 + float(probs[0, 0])) and t1["n_step_nodes"] == 2
    assert t2["step_mass"] == pytest.approx(0.1 + 0.6)
    assert [r["symbol"] for r in nodes if r["step"] == 2 and r["in_step"]] == ["wumpus", "zumpus"]
    # identity embeddings: the nearest token by cosine is the largest coordinate of log p
    for t, lat in zip(thoughts, latents):
        assert t["norm"] == pytest.approx(float(lat.norm()))
        assert t["nearest_cosine"] == pytest.approx(float(lat.max() / lat.norm()))
    assert t2["nearest_token"] == "zumpus"

    steps = aggregate_steps(nodes, thoughts)
    assert [s["step"] for s in steps] == [1, 2]
    s1, s2 = steps
    assert s1["frontier_mass"] == pytest.approx(0.85) and s1["n_frontier_nodes"] == 3
    assert s1["step_mass"] == pytest.approx(t1["step_mass"]) and s2["step_mass"] == pytest.approx(0.7)
    assert s1["frontier_node_prob"] == pytest.approx(0.85 / 3)
    assert s1["nonfrontier_node_prob"] == pytest.approx((0.02 + 4 * rest0) / 5)
    # frontier of step 1: heights 1, 1, 0 and reaches-target 1, 0, 0 against p 0.5, 0.3, 0.05
    assert s1["corr_prob_height"] == pytest.approx(np.corrcoef([0.5, 0.3, 0.05], [1, 1, 0])[0, 1])
    assert s1["corr_prob_reaches_target"] == pytest.approx(np.corrcoef([0.5, 0.3, 0.05], [1, 0, 0])[0, 1])
    # frontier of step 2: both leaves (height constant -> undefined), zumpus reaches the target
    assert math.isnan(s2["corr_prob_height"])
    assert s2["corr_prob_reaches_target"] == pytest.approx(1.0)


def test_read_out_comes_from_the_states_and_geometry_from_the_fed_vectors():
    """A soft thought is an embedding mix; its read-out is the state it was made from, its norm and nearest
    embedding are the fed vector's."""
    rec = _record()
    tok = WordTokenizer.from_records([rec])
    g = graph_info(rec, "r")
    ids = node_token_ids(g, tok, "r")
    V = tok.vocab_size
    eye = torch.eye(V, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    states = torch.randn(2, V, generator=gen, dtype=torch.float64)
    fed = torch.randn(2, V, generator=gen, dtype=torch.float64)
    nodes, thoughts = thought_rows(fed, eye, None, eye, g, ids, c_thought=1, states=states)
    p = states.softmax(-1)
    for r in nodes:
        assert r["prob"] == pytest.approx(float(p[r["step"] - 1, ids[r["node"]][0]]), rel=1e-12)
    for t, f, pr in zip(thoughts, fed, p):
        assert t["norm"] == pytest.approx(float(f.norm()))
        assert t["nearest_token_id"] == int(f.argmax()) and t["top1_token_id"] == int(pr.argmax())
    with pytest.raises(ValueError, match="states"):
        thought_rows(fed, eye, None, eye, g, ids, c_thought=1, states=states[:1])


def test_two_thoughts_per_step_share_a_frontier():
    rec = _record()
    tok = WordTokenizer.from_records([rec])
    g = graph_info(rec, "r")
    ids = node_token_ids(g, tok, "r")
    eye = torch.eye(tok.vocab_size, dtype=torch.float64)
    nodes, thoughts = thought_rows(torch.randn(4, tok.vocab_size, dtype=torch.float64), eye, None, eye, g, ids,
                                   c_thought=2)
    assert [t["depth_of_step"] for t in thoughts] == [1, 1, 2, 2]
    assert [t["n_frontier"] for t in thoughts] == [3, 3, 2, 2]


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r.pop("edges"), "edges", "missing"),
    (lambda r: r["edges"].append([4, 0]), "edges", "cycle"),
    (lambda r: r["edges"].append([2, 9]), "edges[6]", "node 9 is unknown"),
    (lambda r: r.update(target=12), "target", "node 12 is unknown"),
    (lambda r: r.update(question=r["question"].replace("gorpus?", "borpus?")), "question", "'borpus'"),
    (lambda r: r.update(neg_target=5), "question", "root/target/neg_target"),
    (lambda r: r.update(idx_to_symbol="Tom"), "idx_to_symbol", "list of node names"),
])
def test_bad_graphs_name_file_record_and_field(change, field, words):
    rec = _record()
    change(rec)
    with pytest.raises(CoconutError, match=r"hand\.json: record 3") as e:
        graph_info(rec, "hand.json: record 3")
    assert f"field {field!r}" in str(e.value) and words in str(e.value)


# --- the command end to end ---------------------------------------------------------------------------------

def _checkpoint(tmp_path, method="coconut"):
    from coconut_kernels.latent import LatentLM
    from coconut_kernels.models import GPT2, GPT2Config
    from coconut_kernels.training.checkpoint import save_checkpoint

    records = generate_dataset(6, seed=3)
    tok = WordTokenizer.from_records(records)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_position=512)
    lm = LatentLM(GPT2(cfg), tok.latent_id, tok.bot_id, tok.eot_id, tok.eos_token_id)
    path = save_checkpoint(tmp_path / "run", 1, lm.state_dict(), cfg, "gpt2", tok, None,
                           {"method": method, "c_thought": 1, "max_latent_stage": 3, "pad_latent_to_max": True,
                            "feedback": "hidden"}, keep=1)
    data = tmp_path / "valid.json"
    data.write_text(json.dumps(records))
    return path, data, lm, tok, records


def test_cli_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt, data, lm, tok, records = _checkpoint(tmp_path)
    out = tmp_path / "analysis"
    assert main([str(tmp_path / "run"), "--data", str(data), "--out", str(out), "--plots", "2"]) == 0
    for name in ("nodes.csv", "thoughts.csv", "questions.csv", "steps.csv", "aggregate.png", "question_0.png",
                 "question_1.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "question_2.png").exists()
    nodes = list(csv.DictReader(open(out / "nodes.csv")))
    thoughts = list(csv.DictReader(open(out / "thoughts.csv")))
    n_nodes = sum(len(r["idx_to_symbol"]) for r in records)
    assert len(nodes) == 3 * n_nodes and len(thoughts) == 3 * len(records)
    # the read-out agrees with generate's own top-1 read-out of the same thoughts
    from coconut_kernels.data import RaggedCollator, StageConfig, build_prompt, tokenize_record

    prompts = [build_prompt(tokenize_record(r, tok, i), 3, StageConfig(max_latent_stage=3), tok)
               for i, r in enumerate(records)]
    batch = RaggedCollator.from_tokenizer(tok)(prompts)
    res = lm.eval().generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=4, return_latents=True)
    for t in thoughts:
        b, s = int(t["record"]), int(t["step"]) - 1
        assert float(t["top1_prob"]) == pytest.approx(float(res.latent_topk_probs[b, s, 0]), rel=1e-4)
        assert int(t["top1_token_id"]) == int(res.latent_topk_ids[b, s, 0])
        assert float(t["norm"]) == pytest.approx(float(res.latents[b, s].norm()), rel=1e-5)
    # frontier flags follow the graph
    g = graph_info(records[0], "r")
    fr = {(int(r["step"]), int(r["node"])) for r in nodes if r["record"] == "0" and r["frontier"] == "1"}
    assert fr == {(t, v) for t in (1, 2, 3) for v in g.frontier(t)}
    assert "per latent step" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    ckpt, data, *_ , records = _checkpoint(tmp_path)
    bad = [dict(r) for r in records]
    del bad[2]["root"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main([str(ckpt), "--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.json: record 2: field 'root': missing" in err
    assert main([str(ckpt), "--data", str(tmp_path / "none.json")]) == 2
    assert "none.json: file not found" in capsys.readouterr().err
    cot, data2, *_ = _checkpoint(tmp_path / "cot", method="cot")
    assert main([str(cot), "--data", str(data2)]) == 2
    assert "config.yaml: field 'method' is 'cot'" in capsys.readouterr().err
