"""Tests of coconut_kernels.data: records, tokenizers, stages, collators, the ProsQA generator, eval.

Real data: the ProsQA validation split at <repo>/../shared/data (or $COCONUT_DATA_DIR); tests that need
it skip with a message where it is absent. Hand-counted token numbers below refer to record 0 of it.
"""
from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coconut_kernels.data import (
    IGNORE_INDEX,
    AlignedCollator,
    Example,
    HFTokenizer,
    RaggedCollator,
    StageConfig,
    WordTokenizer,
    build_example,
    build_prompt,
    concept_nouns,
    exact_match_accuracy,
    extract_answer,
    extract_cot,
    generate_dataset,
    load_records,
    load_tokenizer,
    person_names,
    save_records,
    tokenize_record,
    tokenize_records,
    validate_records,
)
from coconut_kernels.data import cli
from coconut_kernels.data.prosqa import reachable
from coconut_kernels.errors import CoconutError

DATA_DIR = Path(os.environ.get("COCONUT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
VALID = DATA_DIR / "prosqa_valid.json"
needs_data = pytest.mark.skipif(
    not VALID.is_file(), reason=f"ProsQA split not found at {VALID} (set COCONUT_DATA_DIR to the shared/data folder)"
)


@pytest.fixture(scope="module")
def records():
    if not VALID.is_file():
        pytest.skip(f"ProsQA split not found at {VALID} (set COCONUT_DATA_DIR to the shared/data folder)")
    return load_records(VALID)


@pytest.fixture(scope="module")
def tok(records):
    return WordTokenizer.from_records(records)


@pytest.fixture(scope="module")
def rec0(records, tok):
    return tokenize_record(records[0], tok, 0)


# record 0, counted by hand: 18 "Every X is a Y." (6 tokens) + 5 "Name is a Y." (5) + "Is Tom a lempus or
# scrompus?" (7) + "\n" = 141; steps "Tom is a terpus.\n" 6, then 7 and 7; "### Tom is a lempus." + eos = 7.
Q0, STEPS0, A0 = 141, (6, 7, 7), 7


# ---------------------------------------------------------------------------------------------- records


@needs_data
def test_every_validation_record_parses(records):
    assert len(records) == 300
    for r in records:
        assert 3 <= len(r["steps"]) <= 6 and r["answer"].endswith(".")


def _write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


GOOD = {"question": "Is Tom a wumpus or yumpus?", "steps": ["Tom is a wumpus."], "answer": "Tom is a wumpus."}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"steps": [], "answer": "x"}, "record 1: missing field 'question'"),
        ({"question": "q", "answer": "x"}, "record 1: missing field 'steps'"),
        ({"question": "q", "steps": []}, "record 1: missing field 'answer'"),
        ({"question": 3, "steps": [], "answer": "x"}, "record 1: field 'question' must be a string, got int"),
        ({"question": "q", "steps": "a. b.", "answer": "x"}, "record 1: field 'steps' must be a list of strings, got str"),
        ({"question": "q", "steps": ["a", 2], "answer": "x"}, "record 1: field 'steps' item 1 must be a string, got int"),
        ({"question": "q", "steps": [], "answer": None}, "record 1: field 'answer' must be a string, got NoneType"),
        ({**GOOD, "root": "1"}, "record 1: field 'root' must be int, got str"),
        ({**GOOD, "edges": {"0": 1}}, "record 1: field 'edges' must be list, got dict"),
        (["q", [], "a"], "record 1: expected a JSON object, got list"),
    ],
)
def test_bad_records_name_file_index_and_field(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(ValueError) as e:
        load_records(path)
    assert str(e.value) == f"{path}: {message}"
    with pytest.raises(ValueError) as e:
        validate_records([GOOD, bad])
    assert str(e.value) == message


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="records: expected a JSON list of records, got dict"):
        load_records(_write(tmp_path, GOOD))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(_write(tmp_path, "[{"))
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(CoconutError, match="max_records"):
            load_records(_write(tmp_path, [GOOD]), bad)
    with pytest.raises(ValueError, match="record 0: missing field 'steps'"):
        save_records([{"question": "q", "answer": "a"}], tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()
    assert validate_records([GOOD]) == [GOOD]


# ------------------------------------------------------------------------------------------- tokenizers


@needs_data
def test_word_tokenizer_round_trips_the_split(records, tok):
    for r in records:
        for text in (r["question"], *r["steps"], r["answer"], "### " + r["answer"]):
            assert tok.decode(tok.encode(text)) == text
        # the official get_dataset check: pieces tokenized apart == the whole text tokenized at once
        whole = r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"]
        pieces = tok.encode(r["question"] + "\n") + [t for s in r["steps"] for t in tok.encode(s + "\n")]
        assert pieces + tok.encode("### " + r["answer"]) == tok.encode(whole)
    assert tok.unk_token_id not in tok.encode(records[0]["question"])


@needs_data
def test_word_tokenizer_vocabulary_is_deterministic_and_saved(records, tok, tmp_path):
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert WordTokenizer.from_records(shuffled).vocab == tok.vocab
    assert tok.vocab[:8] == ["<pad>", "<unk>", "<eos>", "<|start-latent|>", "<|latent|>", "<|end-latent|>", "\n", "###"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bot_id, tok.latent_id, tok.eot_id) == (0, 2, 3, 4, 5)
    tok.save(tmp_path / "tok.json")
    for loaded in (WordTokenizer.load(tmp_path / "tok.json"), load_tokenizer(tmp_path / "tok.json")):
        assert isinstance(loaded, WordTokenizer) and loaded.vocab == tok.vocab
        assert loaded.encode(records[5]["question"]) == tok.encode(records[5]["question"])


def test_word_tokenizer_specials_unknowns_and_errors(tmp_path):
    t = WordTokenizer.from_texts(["Tom is a wumpus.", "Is Tom a wumpus?"])
    ids = t.encode("Tom is a <|start-latent|><|latent|><|latent|><|end-latent|>### Tom is a zorpus.<eos>")
    assert ids.count(t.latent_id) == 2 and t.bot_id in ids and t.eot_id in ids and ids[-1] == t.eos_token_id
    assert ids[-3] == t.unk_token_id  # "zorpus" was never seen
    # skipped markers decode as if absent
    assert t.decode(ids, skip_special_tokens=True) == "Tom is a ### Tom is a <unk>."
    assert t.decode(ids[:5]) == "Tom is a<|start-latent|><|latent|>"  # markers glue
    assert t.decode(t.encode("Tom is a wumpus.\nIs Tom a wumpus?")) == "Tom is a wumpus.\nIs Tom a wumpus?"
    with pytest.raises(ValueError, match=r"ids: token id 99 outside the vocabulary \[0, 15\)"):
        t.decode([1, 99])
    with pytest.raises(ValueError, match="not a WordTokenizer file"):
        WordTokenizer.load(_write(tmp_path, {"vocab": []}))
    with pytest.raises(ValueError, match="vocab: must start with"):
        WordTokenizer(["a", "b"])


def _bpe_tokenizer_json(path, texts, with_eos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if with_eos else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.save(str(path))
    return path


@needs_data
def test_hf_tokenizer_adds_markers_and_round_trips(records, tmp_path):
    texts = [r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"] for r in records[:100]]
    path = _bpe_tokenizer_json(tmp_path / "tokenizer.json", texts)
    t = HFTokenizer.load(path)
    base = t.vocab_size - 3
    # added in the official order: start, end, latent
    assert (t.bot_id, t.eot_id, t.latent_id) == (base, base + 1, base + 2)
    assert t.eos_token_id == t.pad_token_id == 0  # <|endoftext|>, pad defaults to eos as the official code
    for r in records[:50]:
        assert t.decode(t.encode(r["question"] + "\n")) == r["question"] + "\n"
        assert t.decode(t.encode("### " + r["answer"])) == "### " + r["answer"]
    assert t.encode("a<|latent|><|end-latent|>") [-2:] == [t.latent_id, t.eot_id]
    prompt = t.encode("Is Tom a lempus?\n") + [t.bot_id, t.latent_id, t.eot_id] + t.encode("### Tom is a lempus.") + [t.eos_token_id]
    assert t.decode(prompt, skip_special_tokens=True) == "Is Tom a lempus?\n### Tom is a lempus."
    t.save(tmp_path / "saved.json")
    for again in (HFTokenizer.load(tmp_path / "saved.json"), load_tokenizer(tmp_path / "saved.json")):
        assert isinstance(again, HFTokenizer) and again.vocab_size == t.vocab_size
        assert (again.bot_id, again.latent_id, again.eot_id) == (t.bot_id, t.latent_id, t.eot_id)
        assert again.encode(texts[3]) == t.encode(texts[3])
    # a folder works too, and tokenizer_config.json's eos_token is honoured
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|latent|>"}}))
    assert HFTokenizer.load(tmp_path).eos_token_id == t.latent_id


def test_hf_tokenizer_without_eos_is_refused(tmp_path):
    path = _bpe_tokenizer_json(tmp_path / "tokenizer.json", ["Tom is a wumpus."] * 3, with_eos=False)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": eos_token: none of .* is in the vocabulary .*; "
                                         "pass eos_token"):
        HFTokenizer.load(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": eos_token: '<eos>' is not in the vocabulary"):
        HFTokenizer.load(path, eos_token="<eos>")
    with pytest.raises(ValueError, match="path: no tokenizer.json at"):
        HFTokenizer.load(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- stages


def _layout(ex: Example, q: int, n_markers: int, n_latents: int):
    """The example's length and where labels start being real, checked against the hand counts."""
    n_ignored = q + n_markers + n_latents
    assert ex.labels[:n_ignored] == [IGNORE_INDEX] * n_ignored
    assert ex.labels[n_ignored:] == ex.input_ids[n_ignored:] and IGNORE_INDEX not in ex.labels[n_ignored:]
    return len(ex.input_ids)


@needs_data
def test_record_tokenization_hand_counts(rec0, tok):
    assert len(rec0.question) == Q0 and tuple(map(len, rec0.steps)) == STEPS0 and len(rec0.answer) == A0
    assert rec0.answer[-1] == tok.eos_token_id and rec0.expected_answer == "Tom is a lempus."


@needs_data
def test_stage_layouts_hand_computed(rec0, tok):
    cfg = StageConfig(max_latent_stage=6, pad_latent_to_max=False)
    s0 = build_example(rec0, 0, cfg, tok)
    assert _layout(s0, Q0, 2, 0) == Q0 + 2 + 20 + A0 == 170
    assert s0.input_ids[Q0 : Q0 + 2] == [tok.bot_id, tok.eot_id]
    s1 = build_example(rec0, 1, cfg, tok)
    assert _layout(s1, Q0, 2, 1) == Q0 + 3 + 14 + A0 == 165
    text1 = tok.decode(s1.input_ids)
    assert text1.endswith("?\n<|start-latent|><|latent|><|end-latent|>Every terpus is a brimpus.\n"
                          "Every brimpus is a lempus.\n### Tom is a lempus.<eos>")
    assert s1.input_ids == rec0.question + tok.encode("<|start-latent|><|latent|><|end-latent|>"
                                                      "Every terpus is a brimpus.\nEvery brimpus is a lempus.\n"
                                                      "### Tom is a lempus.<eos>")
    s2c2 = build_example(rec0, 2, StageConfig(c_thought=2, max_latent_stage=6), tok)
    assert _layout(s2c2, Q0, 2, 4) == Q0 + 2 + 4 + 7 + A0 == 161 and s2c2.n_latents == 4
    # past max_latent_stage: every step skipped; latents = min(steps, max) or max with pad_latent_to_max
    assert _layout(build_example(rec0, 3, StageConfig(max_latent_stage=2, pad_latent_to_max=False), tok), Q0, 2, 2) == 152
    assert _layout(build_example(rec0, 7, StageConfig(max_latent_stage=6, pad_latent_to_max=False), tok), Q0, 2, 3) == 153
    assert _layout(build_example(rec0, 7, StageConfig(max_latent_stage=6, pad_latent_to_max=True), tok), Q0, 2, 6) == 156
    # official behaviour at a stage <= max_latent_stage beyond this record's 3 steps: all skipped, 4 latents
    s4 = build_example(rec0, 4, cfg, tok)
    assert _layout(s4, Q0, 2, 4) == Q0 + 6 + A0 and s4.n_latents == 4


@needs_data
def test_methods_hand_computed(rec0, tok):
    no_cot = build_example(rec0, 3, StageConfig(method="no_cot"), tok)
    assert _layout(no_cot, Q0, 0, 0) == Q0 + A0 and no_cot.input_ids == rec0.question + rec0.answer
    cot = build_example(rec0, 5, StageConfig(method="cot"), tok)
    assert _layout(cot, Q0, 0, 0) == Q0 + 20 + A0 and cot.stage == 0
    nt = build_example(rec0, 2, StageConfig(method="no_thoughts"), tok)
    assert _layout(nt, Q0, 0, 0) == Q0 + 7 + A0 and tok.bot_id not in nt.input_ids
    pause = build_example(rec0, 1, StageConfig(method="pause_as_thought"), tok)
    assert pause == build_example(rec0, 1, StageConfig(), tok)


@needs_data
def test_uniform_prob_reproducible(records, tok):
    recs = tokenize_records(records[:40], tok)
    cfg = StageConfig(uniform_prob=0.5, max_latent_stage=6)
    run = lambda seed: [build_example(r, 6, cfg, tok, random.Random(seed * 1000 + r.idx)).stage for r in recs]
    a, b = run(1), run(1)
    assert a == b and run(2) != a
    drawn = [s for s in a if s != 6]
    assert 5 < len(drawn) < 35 and min(drawn) == 0  # about half drawn, from 0..len(steps)
    for r, s in zip(recs, a):
        assert s == 6 or s <= len(r.steps)
    one = random.Random(7)
    stages = [build_example(recs[0], 6, StageConfig(uniform_prob=1.0), tok, one).stage for _ in range(60)]
    assert set(stages) == {0, 1, 2, 3}


@needs_data
def test_prompts(rec0, tok):
    p1 = build_prompt(rec0, 1, StageConfig(), tok)
    assert p1.labels is None and p1.input_ids == rec0.question + [tok.bot_id, tok.latent_id, tok.eot_id]
    assert build_prompt(rec0, 9, StageConfig(pad_latent_to_max=True), tok).n_latents == 6
    # without padding the prompt never holds more latents than the record has steps (official)
    assert build_prompt(rec0, 4, StageConfig(pad_latent_to_max=False), tok).n_latents == 3
    assert build_prompt(rec0, 2, StageConfig(c_thought=2), tok).n_latents == 4
    assert build_prompt(rec0, 3, StageConfig(method="no_cot"), tok).input_ids == rec0.question
    assert build_prompt(rec0, 3, StageConfig(method="no_thoughts"), tok).input_ids == rec0.question


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="coconut2"), "method: expected one of"),
        (dict(c_thought=-1), "c_thought: expected an int >= 0, got -1"),
        (dict(c_thought=0), "c_thought: must be >= 1 for method 'coconut'"),
        (dict(max_latent_stage=1.5), "max_latent_stage: expected an int >= 0, got 1.5"),
        (dict(uniform_prob=1.5), r"uniform_prob: expected a probability in \[0, 1\], got 1.5"),
        (dict(pad_latent_to_max=1), "pad_latent_to_max: expected a bool, got 1"),
    ],
)
def test_bad_stage_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StageConfig(**kwargs)


@needs_data
def test_bad_stage_arguments(rec0, tok):
    with pytest.raises(ValueError, match="stage: expected an int >= 0, got -1"):
        build_example(rec0, -1, StageConfig(), tok)
    with pytest.raises(ValueError, match="stage: expected an int >= 0, got 1.0"):
        build_prompt(rec0, 1.0, StageConfig(), tok)
    with pytest.raises(ValueError, match="rng: a random.Random is required when uniform_prob > 0"):
        build_example(rec0, 1, StageConfig(uniform_prob=0.1), tok)


# ---------------------------------------------------------------------------------------------- collate


@pytest.fixture(scope="module")
def batch_examples(records, tok):
    recs = tokenize_records(records[:6], tok)
    stages = [2, 2, 0, 3, 1, 2]  # record 2 at stage 0: markers but no latent
    return [build_example(r, s, StageConfig(), tok) for r, s in zip(recs, stages)]


def _check_rows(batch, examples, left_pads):
    for b, (ex, n) in enumerate(zip(examples, left_pads)):
        L = len(ex.input_ids)
        ids, mask, pos, lab = (batch[k][b] for k in ("input_ids", "attention_mask", "position_ids", "labels"))
        assert ids[n : n + L].tolist() == ex.input_ids and lab[n : n + L].tolist() == ex.labels
        assert pos[n : n + L].tolist() == list(range(L)) and mask[n : n + L].all()
        pads = torch.ones_like(mask, dtype=torch.bool)
        pads[n : n + L] = False
        assert (mask[pads] == 0).all() and (pos[pads] == 0).all() and (lab[pads] == IGNORE_INDEX).all()
        assert (ids[pads] == 0).all()  # <pad>


@needs_data
def test_aligned_collator_on_a_real_batch(batch_examples, tok):
    batch = AlignedCollator.from_tokenizer(tok)(batch_examples)
    assert all(v.dtype == torch.int64 for v in batch.values())
    assert batch["idx"].tolist() == [0, 1, 2, 3, 4, 5]
    first = [ex.input_ids.index(tok.latent_id) if tok.latent_id in ex.input_ids else None for ex in batch_examples]
    col = max(f for f in first if f is not None)
    left = [0 if f is None else col - f for f in first]
    assert left[2] == 0 and sorted(set(left)) != [0]  # the question lengths differ in this batch
    _check_rows(batch, batch_examples, left)
    for b, f in enumerate(first):
        if f is not None:  # every first latent in one column, each at its own position id
            assert batch["input_ids"][b, col] == tok.latent_id and batch["input_ids"][b, col - 1] == tok.bot_id
            assert batch["position_ids"][b, col] == f
    assert batch["input_ids"].shape[1] == max(n + len(ex.input_ids) for n, ex in zip(left, batch_examples))


@needs_data
def test_ragged_collator_on_a_real_batch(batch_examples, tok):
    batch = RaggedCollator.from_tokenizer(tok, pad_to_multiple_of=64)(batch_examples)
    assert batch["input_ids"].shape[1] % 64 == 0
    assert batch["input_ids"].shape[1] - 64 < max(len(ex.input_ids) for ex in batch_examples)
    _check_rows(batch, batch_examples, [0] * len(batch_examples))
    assert batch["latent_counts"].tolist() == [2, 2, 0, 3, 1, 2] == [ex.n_latents for ex in batch_examples]


@needs_data
def test_collators_without_latents_and_for_prompts(records, tok):
    recs = tokenize_records(records[:4], tok)
    cot = [build_example(r, 0, StageConfig(method="cot"), tok) for r in recs]
    aligned = AlignedCollator.from_tokenizer(tok, pad_to_multiple_of=8)(cot)
    ragged = RaggedCollator.from_tokenizer(tok, pad_to_multiple_of=8)(cot)
    assert all(torch.equal(aligned[k], ragged[k]) for k in aligned)  # no latents: no alignment padding
    assert aligned["input_ids"].shape[1] % 8 == 0 and ragged["latent_counts"].tolist() == [0, 0, 0, 0]
    prompts = [build_prompt(r, 2, StageConfig(), tok) for r in recs]
    batch = AlignedCollator.from_tokenizer(tok)(prompts)
    assert "labels" not in batch and (batch["input_ids"][:, -1] == tok.eot_id).all()  # same length after alignment
    # plain mappings work too
    as_dicts = [{"input_ids": e.input_ids, "labels": e.labels} for e in cot]
    assert torch.equal(RaggedCollator(0, tok.latent_id)(as_dicts)["labels"], ragged["labels"][:, : max(len(e.input_ids) for e in cot)])


def test_collator_bad_inputs():
    c = RaggedCollator(pad_token_id=0, latent_id=4)
    with pytest.raises(ValueError, match="examples: empty batch"):
        c([])
    with pytest.raises(ValueError, match="examples: either every example has labels or none does"):
        c([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1]}])
    with pytest.raises(ValueError, match=r"examples\[1\]: labels length 1 != input_ids length 2"):
        c([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [2]}])
    with pytest.raises(ValueError, match=r"examples\[0\]: empty input_ids"):
        c([{"input_ids": []}])
    with pytest.raises(ValueError, match="examples: expected stages.Example or a mapping"):
        c([[1, 2, 3]])
    with pytest.raises(ValueError, match="pad_to_multiple_of: expected None or an int >= 1, got 0"):
        AlignedCollator(0, 4, pad_to_multiple_of=0)


# -------------------------------------------------------------------------------------------- generator


def _stats(recs):
    return {
        "nodes": statistics.mean(len(r["idx_to_symbol"]) for r in recs),
        "edges": statistics.mean(len(r["edges"]) for r in recs),
        "steps": statistics.mean(len(r["steps"]) for r in recs),
        "words": statistics.mean(len(r["question"].split()) for r in recs),
    }


@pytest.fixture(scope="module")
def generated():
    return generate_dataset(300, seed=0)


@pytest.fixture(scope="module")
def generated_small():
    return generate_dataset(300, seed=0, size="small")


@needs_data
def test_generator_matches_split_statistics(records, generated):
    ref, gen = _stats(records), _stats(generated)
    tolerance = {"nodes": 1.0, "edges": 2.0, "steps": 0.2, "words": 10.0}
    for k, tol in tolerance.items():
        assert abs(gen[k] - ref[k]) <= tol, f"{k}: generated mean {gen[k]:.2f} vs split {ref[k]:.2f}"
    assert {len(r["steps"]) for r in generated} == {3, 4, 5, 6}


@pytest.mark.parametrize("size", ["prosqa", "small"])
def test_generator_problems_are_well_formed(size, generated, generated_small):
    generated = {"prosqa": generated, "small": generated_small}[size]
    validate_records(generated)
    for r in generated:
        sym, edges, root = r["idx_to_symbol"], r["edges"], r["root"]
        dist = reachable(len(sym), edges, root)
        # exactly one candidate reachable from the root, and the steps are a shortest path to it
        assert r["target"] in dist and r["neg_target"] not in dist
        assert dist[r["target"]] == len(r["steps"])
        name, tgt, neg = sym[root], sym[r["target"]], sym[r["neg_target"]]
        assert r["question"].endswith((f"Is {name} a {tgt} or {neg}?", f"Is {name} a {neg} or {tgt}?"))
        assert r["answer"] == f"{name} is a {tgt}."
        people = {i for i in range(len(sym)) if all(b != i for _, b in edges)}
        said = lambda a, b: f"{sym[a]} is a {sym[b]}." if a in people else f"Every {sym[a]} is a {sym[b]}."
        listed = re.findall(r"[^.]+\.", r["question"].rsplit(" Is ", 1)[0])
        assert sorted(s.strip() for s in listed) == sorted(said(a, b) for a, b in edges)
        path = [root]
        for step in r["steps"]:
            nxt = next(b for a, b in edges if a == path[-1] and step == said(a, b))
            path.append(nxt)
        assert path[-1] == r["target"] and all(a < b for a, b in edges) and len(set(sym)) == len(sym)
        assert all(not sym[p].endswith("pus") for p in people) and root in people


@needs_data
def test_generator_vocabulary_covers_the_split(records):
    nouns, names = set(concept_nouns()), set(person_names())
    for r in records:
        for s in r["idx_to_symbol"]:
            assert s in (names if not s.endswith("pus") else nouns), s


def test_generator_is_deterministic_and_cli_writes_it(generated, tmp_path):
    assert generate_dataset(300, seed=0) == generated and generate_dataset(5, seed=1) != generated[:5]
    out = tmp_path / "train.json"
    assert cli.main(["prosqa", "--n", "20", "--seed", "3", "--out", str(out)]) == 0
    assert load_records(out) == generate_dataset(20, seed=3)
    with pytest.raises(ValueError, match="n: expected an int >= 0, got -1"):
        generate_dataset(-1)


def test_generator_small_size(generated, generated_small, tmp_path):
    """The small size: the same construction with about half the nodes and a third of the words, depth 3-4;
    deterministic per (seed, size), and the default size is unchanged by the knob."""
    small, full = _stats(generated_small), _stats(generated)
    assert small["nodes"] < 0.7 * full["nodes"] and small["words"] < 0.5 * full["words"]
    assert {len(r["steps"]) for r in generated_small} == {3, 4}
    assert generate_dataset(300, seed=0, size="small") == generated_small != generated
    assert generate_dataset(300, seed=0, size="prosqa") == generated
    out = tmp_path / "small.json"
    assert cli.main(["prosqa", "--n", "6", "--seed", "2", "--size", "small", "--out", str(out)]) == 0
    assert load_records(out) == generate_dataset(6, seed=2, size="small")
    edges = ["prosqa", "--n", "6", "--seed", "2", "--size", "small", "--render", "edges", "--out", str(out)]
    assert cli.main(edges) == 0
    assert load_records(out) == generate_dataset(6, seed=2, size="small", render="edges")
    with pytest.raises(ValueError, match=r"size: expected one of \['prosqa', 'small'\], got 'huge'"):
        generate_dataset(3, size="huge")


def test_generator_edges_render(generated_small):
    """The edges render: the same graphs as the text render, the question lists each edge once as `X Y`, then
    the two options and the root; the steps walk a shortest path node by node; the answer is the target; the
    word tokenizer reads it back whole."""
    edges = generate_dataset(300, seed=0, size="small", render="edges")
    graph = ("idx_to_symbol", "edges", "root", "target", "neg_target")
    assert [[r[k] for k in graph] for r in edges] == [[r[k] for k in graph] for r in generated_small]
    validate_records(edges)
    tok = WordTokenizer.from_records(edges)
    for r in edges:
        sym, root = r["idx_to_symbol"], r["root"]
        listed, tail = r["question"].rsplit(". ", 1)
        assert sorted(listed.split(", ")) == sorted(f"{sym[a]} {sym[b]}" for a, b in r["edges"])
        tgt, neg = sym[r["target"]], sym[r["neg_target"]]
        assert tail in (f"{tgt} or {neg}? {sym[root]}", f"{neg} or {tgt}? {sym[root]}")
        path = [sym[root], *r["steps"]]
        assert all([a, b] in [[sym[x], sym[y]] for x, y in r["edges"]] for a, b in zip(path, path[1:]))
        assert r["answer"] == path[-1] == tgt
        assert reachable(len(sym), r["edges"], root)[r["target"]] == len(r["steps"])
        assert tok.decode(tok.encode(r["question"])) == r["question"]
    with pytest.raises(ValueError, match=r"render: expected one of \['text', 'edges'\], got 'graph'"):
        generate_dataset(2, render="graph")


def test_generator_backward_chain(tmp_path):
    """The backward chain: the forward records' graphs and questions; step i is `x y`, the i-th ancestor of each
    option (step 0 the options themselves; then along an edge into the node before, or the person repeated once
    a walk has ended); the right option's walk is the shortest path reversed and ends at the asked person, the wrong
    one's at another person; no other field changes."""
    forward = generate_dataset(300, seed=0, size="small", render="edges")
    backward = generate_dataset(300, seed=0, size="small", render="edges", chain="backward")
    assert generate_dataset(300, seed=0, size="small", render="edges", chain="forward") == forward
    assert generate_dataset(300, seed=0, size="small", render="edges", chain="backward") == backward
    validate_records(backward)
    for f, r in zip(forward, backward):
        assert {k: v for k, v in f.items() if k != "steps"} == {k: v for k, v in r.items() if k != "steps"}
        sym, edges = r["idx_to_symbol"], {(r["idx_to_symbol"][a], r["idx_to_symbol"][b]) for a, b in r["edges"]}
        people = set(person_names())
        a, b = r["question"].rsplit(". ", 1)[1].split("? ")[0].split(" or ")
        walks = {a: [a], b: [b]}
        assert r["steps"][0] == f"{a} {b}"  # the candidates first
        for step in r["steps"][1:]:
            x, y = step.split(" ")
            for start, node in ((a, x), (b, y)):
                prev = walks[start][-1]
                assert (node, prev) in edges or (node == prev and prev in people), (step, r["question"])
                walks[start].append(node)
        tgt, neg = sym[r["target"]], sym[r["neg_target"]]
        assert walks[tgt][-1] == sym[r["root"]] and walks[neg][-1] != sym[r["root"]]
        assert walks[tgt][:len(f["steps"]) + 1][::-1] == [sym[r["root"]], *f["steps"]]
        assert max(len(walks[tgt]), len(walks[neg])) == len(r["steps"])
        assert not (walks[tgt][-2] == walks[tgt][-1] and walks[neg][-2] == walks[neg][-1])  # no idle last step
    out = tmp_path / "backward.json"
    args = ["prosqa", "--n", "6", "--seed", "2", "--size", "small", "--render", "edges", "--chain", "backward"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert load_records(out) == generate_dataset(6, seed=2, size="small", render="edges", chain="backward")
    with pytest.raises(ValueError, match=r"chain: expected one of \['forward', 'backward'\], got 'up'"):
        generate_dataset(2, render="edges", chain="up")
    with pytest.raises(ValueError, match="chain: 'backward' is written in the edges render only, got render 'text'"):
        generate_dataset(2, chain="backward")
    with pytest.raises(SystemExit):
        cli.main(["prosqa", "--n", "2", "--chain", "backward", "--out", str(out)])


def test_cli_as_a_module(tmp_path):
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "coconut_kernels.data.cli", "prosqa", "--n", "4", "--seed", "5", "--out", str(out)]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 4 problems" in done.stderr and load_records(out) == generate_dataset(4, seed=5)


# ------------------------------------------------------------------------------------------------- eval


def test_answer_extraction_and_accuracy():
    out = "Every a is a b. Is Tom a b or c?\nTom is a b.\n### Tom is a b."
    assert extract_answer(out) == "Tom is a b." and extract_cot(out) == "Tom is a b."
    assert extract_answer("### 1,234") == "1234"  # GSM8k numbers: commas removed on both sides
    texts = [out, "Q?\n### Tom is a c.", "Q?\n### Tom is a b. "]
    assert exact_match_accuracy(texts, ["Tom is a b.", "Tom is a b.", " Tom is a b."]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"texts/answers: lengths differ \(3 vs 1\)"):
        exact_match_accuracy(texts, ["x"])
    with pytest.raises(ValueError, match="texts: empty"):
        exact_match_accuracy([], [])


@needs_data
def test_end_to_end_decode_of_a_correct_output(records, tok):
    """A prompt followed by the right answer tokens, decoded as the official eval does, scores 1."""
    recs = tokenize_records(records[:10], tok)
    texts = []
    for r in recs:
        p = build_prompt(r, 3, StageConfig(), tok)
        texts.append(tok.decode(p.input_ids + r.answer, skip_special_tokens=True))
    assert exact_match_accuracy(texts, [r["answer"] for r in records[:10]]) == 1.0
