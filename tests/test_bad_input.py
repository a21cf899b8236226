"""Bad input at every public entry point gets the library's own error (CoconutError) naming the argument: never a
generic exception from inside torch, never a silent result, and a rejected call leaves a KVCache (or an in-place
op's output) as it was. Property-based: hypothesis draws the bad values; a tiny model keeps it fast.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from coconut_kernels import (CheckpointError, CheckpointNotFoundError, CoconutError, KVCache, LatentLM,
                             latent_attention, latent_feedback, latent_feedback_, linear_cross_entropy,
                             soft_embedding)
from coconut_kernels.feedback import ProjectedFeedback, SoftFeedback
from coconut_kernels.models import GPT2, GPT2Config, Llama, LlamaConfig, from_pretrained
from coconut_kernels.validation import MIN_TEMPERATURE

V, MAXPOS = 16, 32
BOT, LAT, EOT, EOS = 12, 13, 14, 15
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

torch.manual_seed(0)
MODEL = GPT2(GPT2Config(vocab_size=V, n_layer=1, n_head=2, d_model=8, max_position=MAXPOS)).eval()
LM = LatentLM(MODEL, LAT, BOT, EOT, EOS)
IDS = torch.tensor([[1, 2, BOT, LAT, LAT, EOT, 3, EOS], [0, 4, 5, BOT, LAT, EOT, 6, EOS]])
LABELS = torch.where((IDS == LAT) | (IDS == BOT), -100, IDS)
PROMPT = torch.tensor([[1, 2, BOT, LAT, LAT, EOT], [4, 5, 6, BOT, LAT, EOT]])


def raises_clear(fn, *names):
    """fn() raises CoconutError whose message names one of `names`."""
    with pytest.raises(CoconutError) as info:
        fn()
    assert any(n in str(info.value) for n in names), f"{info.value!r} does not name {names}"
    return info.value


# ---- strategies: values that are not what an argument expects ---------------------------------------------------

NOT_NUMBERS = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                        st.just(torch.tensor(1)))


def bad_ints(low=None, high=None):
    """Non-ints, and ints outside [low, high]."""
    out = [NOT_NUMBERS, st.floats(allow_nan=True, allow_infinity=True)]
    if low is not None:
        out.append(st.integers(max_value=low - 1))
    if high is not None:
        out.append(st.integers(min_value=high + 1))
    return st.one_of(*out)


def bad_reals(low=None, high=None, low_open=False):
    """Non-numbers, NaN, ±inf, and finite numbers outside the range."""
    out = [NOT_NUMBERS, st.sampled_from([math.nan, math.inf, -math.inf])]
    if low is not None:
        out.append(st.floats(max_value=low, exclude_max=not low_open, allow_nan=False))
    if high is not None:
        out.append(st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
    return st.one_of(*out)


# ---- LatentLM construction --------------------------------------------------------------------------------------

SPECIAL = ("latent_token_id", "start_latent_id", "end_latent_id", "eos_token_id")


@FAST
@given(slot=st.integers(0, 3), data=st.data())
def test_special_ids_outside_the_vocabulary(slot, data):
    ids = [LAT, BOT, EOT, EOS]
    ids[slot] = data.draw(bad_ints(-1 if slot == 3 else 0, V - 1))
    raises_clear(lambda: LatentLM(MODEL, *ids), SPECIAL[slot])


@FAST
@given(pair=st.sampled_from([(a, b) for a in range(4) for b in range(4) if a < b]))
def test_special_ids_must_be_distinct(pair):
    ids = [LAT, BOT, EOT, EOS]
    ids[pair[1]] = ids[pair[0]]
    raises_clear(lambda: LatentLM(MODEL, *ids), SPECIAL[pair[0]], SPECIAL[pair[1]])


@FAST
@given(feedback=st.one_of(st.text(max_size=8).filter(lambda s: s not in ("hidden", "projected", "soft", "mixture",
                                                                          "pause")),
                          st.integers(), st.none(), st.lists(st.text(), max_size=1)))
def test_feedback_name(feedback):
    raises_clear(lambda: LatentLM(MODEL, LAT, BOT, EOT, EOS, feedback=feedback), "feedback")


def test_feedback_module_of_another_size_and_model_type():
    raises_clear(lambda: LatentLM(MODEL, LAT, BOT, EOT, EOS, feedback=ProjectedFeedback(6)), "feedback")
    raises_clear(lambda: LatentLM(torch.nn.Linear(2, 2), LAT, BOT, EOT, EOS), "model")


@FAST
@given(name=st.sampled_from(["temperature", "top_k", "top_p", "noise", "noise_scale"]), data=st.data())
def test_soft_feedback_parameters(name, data):
    bad = {"temperature": bad_reals(0.0, low_open=True), "top_k": bad_ints(0), "top_p": bad_reals(0.0, 1.0, True),
           "noise": st.one_of(st.text(max_size=4), st.integers()), "noise_scale": bad_reals(0.0)}[name]
    raises_clear(lambda: SoftFeedback(**{name: data.draw(bad)}), name)


# ---- LatentLM.forward -------------------------------------------------------------------------------------------


def _corrupt(t: torch.Tensor, data, values) -> torch.Tensor:
    t = t.clone()
    b = data.draw(st.integers(0, t.shape[0] - 1))
    c = data.draw(st.integers(0, t.shape[1] - 1))
    t[b, c] = data.draw(values)
    return t


@FAST
@given(data=st.data())
def test_forward_ids_labels_positions_out_of_range(data):
    which = data.draw(st.sampled_from(["input_ids", "labels", "position_ids"]))
    outside = st.one_of(st.integers(-2 ** 40, -1), st.integers(V if which != "position_ids" else MAXPOS, 2 ** 40))
    if which == "labels":
        outside = outside.filter(lambda x: x != -100)
    args = {"input_ids": IDS, "labels": LABELS, "position_ids": torch.arange(8).expand(2, 8).clone()}
    args[which] = _corrupt(args[which], data, outside)
    raises_clear(lambda: LM(**args), which)


@FAST
@given(which=st.sampled_from(["input_ids", "labels", "position_ids", "attention_mask"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bool, torch.complex64, torch.int16, torch.uint8]))
def test_forward_dtypes(which, dtype):
    assume(not (which == "attention_mask" and (dtype.is_floating_point or dtype in (torch.bool, torch.int16,
                                                                                     torch.uint8))))
    args = {"input_ids": IDS, "labels": LABELS, "position_ids": torch.arange(8).expand(2, 8),
            "attention_mask": torch.ones_like(IDS)}
    args[which] = args[which].to(dtype)
    raises_clear(lambda: LM(**args), which)


@FAST
@given(which=st.sampled_from(["attention_mask", "labels", "position_ids"]),
       shape=st.lists(st.integers(0, 9), min_size=1, max_size=3).filter(lambda s: s != [2, 8]))
def test_forward_shapes(which, shape):
    args = {"input_ids": IDS, which: torch.zeros(shape, dtype=torch.long)}
    raises_clear(lambda: LM(**args), which)


@FAST
@given(shape=st.sampled_from([(0, 8), (2, 0), (0, 0), (8,), (1, 2, 8), ()]))
def test_forward_empty_batches_and_bad_ranks(shape):
    raises_clear(lambda: LM(torch.zeros(shape, dtype=torch.long)), "input_ids")
    raises_clear(lambda: LM.generate(torch.zeros(shape, dtype=torch.long), max_new_tokens=1), "input_ids")


@FAST
@given(data=st.data())
def test_mask_values_other_than_0_and_1(data):
    values = st.one_of(st.integers(2, 100), st.integers(-100, -1))
    mask = _corrupt(torch.ones_like(IDS), data, values)
    raises_clear(lambda: LM(IDS, mask), "attention_mask")
    mask = _corrupt(torch.ones_like(PROMPT), data, values)
    raises_clear(lambda: LM.generate(PROMPT, mask, max_new_tokens=1), "attention_mask")


@FAST
@given(row=st.integers(0, 1), hole=st.integers(1, 4))
def test_zero_length_rows_and_holes(row, hole):
    mask = torch.ones_like(PROMPT)
    mask[row] = 0
    raises_clear(lambda: LM(PROMPT, mask), "attention_mask")
    raises_clear(lambda: LM.generate(PROMPT, mask, max_new_tokens=1), "attention_mask")
    mask = torch.ones_like(PROMPT)
    mask[row, hole] = 0
    raises_clear(lambda: LM(PROMPT, mask), "attention_mask")
    raises_clear(lambda: LM.generate(PROMPT, mask, max_new_tokens=1), "attention_mask")


def _layout_ok(row: list[int]) -> bool:
    """The rule of the docs: a row's block runs from its first <bot> to the first <eot> after it, with no <eot>
    before that <bot> and no second <bot> inside; later markers are ordinary tokens (the official forward's
    meaning); latents contiguous, right after a <bot>, followed by an <eot>."""
    if BOT in row:
        b0 = row.index(BOT)
        e0 = row.index(EOT, b0) if EOT in row[b0:] else len(row)
        if EOT in row[:b0] or BOT in row[b0 + 1:e0]:
            return False
    at = [i for i, t in enumerate(row) if t == LAT]
    if not at:
        return True
    return at == list(range(at[0], at[-1] + 1)) and at[0] > 0 and row[at[0] - 1] == BOT and \
        at[-1] + 1 < len(row) and row[at[-1] + 1] == EOT


@settings(max_examples=40, deadline=None)
@given(row=st.lists(st.sampled_from([1, 2, BOT, LAT, EOT]), min_size=2, max_size=8))
def test_latent_layout_same_rule_in_forward_and_generate(row):
    """Markers in any order: forward and generate both accept exactly the layouts the rule allows."""
    ids = torch.tensor([row])
    labels = torch.where(ids == LAT, -100, ids)
    if _layout_ok(row):
        with torch.no_grad():
            assert torch.isfinite(LM(ids, labels=labels).loss)
        assert LM.generate(ids, max_new_tokens=1).tokens.shape == (1, 1)
    else:
        raises_clear(lambda: LM(ids, labels=labels), "input_ids")
        raises_clear(lambda: LM.generate(ids, max_new_tokens=1), "input_ids")


@pytest.mark.parametrize("row,marker", [
    ([1, BOT, 2, BOT, LAT, EOT, 3], "2 <bot>"),  # a doubled start marker, the second one before the latents
    ([1, BOT, BOT, LAT, EOT, 3], "2 <bot>"),
    ([1, BOT, 2, BOT], "2 <bot>"),  # no <eot> yet: the block runs to the end
    ([1, EOT, 2, BOT, 3], "before its <bot>"),
])
def test_markers_once_per_row_in_forward_and_generate(row, marker):
    """A row's block is one <bot> [<latent>...] <eot>, as the official data writes it: forward and generate refuse
    a second <bot> inside it or an <eot> before it with the same message."""
    ids = torch.tensor([row])
    labels = torch.where(ids == LAT, -100, ids)
    a = raises_clear(lambda: LM(ids, labels=labels), marker)
    b = raises_clear(lambda: LM.generate(ids, max_new_tokens=1), marker)
    assert str(a) == str(b) and "input_ids row 0" in str(a)


@pytest.mark.parametrize("row", [[1, BOT, LAT, EOT, 2, EOT], [1, BOT, EOT, 2, BOT, EOT], [1, BOT, LAT, EOT, BOT, 2],
                                 [1, EOT, 2]])
def test_markers_after_the_block_are_ordinary_tokens(row):
    """After the block's <eot> (or in a row without <bot>) the markers are ordinary tokens, as in the official
    forward: a sampled answer that holds them can be scored. Causal: the logits up to the block's end are those of
    the row cut there."""
    ids = torch.tensor([row])
    cut = row.index(EOT) + 1
    with torch.no_grad():
        full = LM(ids, return_logits=True).logits[0, :cut]
        part = LM(ids[:, :cut], return_logits=True).logits[0]
    torch.testing.assert_close(full, part)
    assert LM.generate(ids, max_new_tokens=1).tokens.shape == (1, 1)


def test_mask_padded_on_both_sides():
    """Padding on both sides is supported (one run of ones per row); a mask whose ones leave out the <eot> is
    reported as the mask's fault, not as a latent layout."""
    row = [1, 2, BOT, LAT, LAT, EOT, 3, 4]
    ids = torch.tensor([row])
    padded = torch.tensor([[0, 0] + row + [0]])
    mask = torch.tensor([[0, 0] + [1] * len(row) + [0]])
    with torch.no_grad():
        ref = LM(ids, labels=torch.where(ids == LAT, -100, ids)).loss
        got = LM(padded, mask, torch.where((mask == 0) | (padded == LAT), -100, padded)).loss
    assert torch.allclose(ref, got)
    prompt = [1, 2, BOT, LAT, LAT, EOT]
    both = LM.generate(torch.tensor([[0] + prompt + [0]]), torch.tensor([[0] + [1] * 6 + [0]]), max_new_tokens=3)
    assert torch.equal(both.tokens, LM.generate(torch.tensor([prompt]), max_new_tokens=3).tokens)
    cut = torch.tensor([[0, 1, 1, 1, 1, 0], [1] * 6])  # row 0's <eot> is padding
    for fn in (lambda: LM(PROMPT, cut), lambda: LM.generate(PROMPT, cut, max_new_tokens=1)):
        err = str(raises_clear(fn, "attention_mask"))
        assert "<eot>" in err and "padded position" in err and "one run of ones" in err and "not between" not in err
    cut = torch.tensor([[0, 1, 1, 1, 0, 0], [1] * 6])  # a latent is padding
    err = str(raises_clear(lambda: LM(PROMPT, cut), "attention_mask"))
    assert "padded positions" in err and "one run of ones" in err


def test_labels_at_latents_and_too_long_rows():
    raises_clear(lambda: LM(IDS, labels=IDS), "labels")
    raises_clear(lambda: LM(torch.ones(1, MAXPOS + 1, dtype=torch.long)), "input_ids")


# ---- LatentLM.generate ------------------------------------------------------------------------------------------

GENERATE_BAD = {
    "max_new_tokens": bad_ints(1),
    "temperature": bad_reals(MIN_TEMPERATURE),  # below it logits / temperature overflow float32
    "top_p": bad_reals(0.0, 1.0, low_open=True),
    "top_k": bad_ints(0),
    "do_sample": st.one_of(st.integers(), st.text(max_size=2), st.none()),
    "return_latents": st.one_of(st.integers(), st.text(max_size=2)),
    "use_cuda_graph": st.one_of(st.integers(), st.text(max_size=2)),
    "eos_token_id": bad_ints(-1, V - 1).filter(lambda x: x is not None),
    "pad_token_id": st.one_of(st.floats(), st.text(max_size=2), st.booleans()),
    "generator": st.one_of(st.integers(), st.text(max_size=2)),
}


@FAST
@given(name=st.sampled_from(sorted(GENERATE_BAD)), data=st.data())
def test_generate_scalars(name, data):
    kwargs = {"max_new_tokens": 2, "do_sample": True, name: data.draw(GENERATE_BAD[name])}
    raises_clear(lambda: LM.generate(PROMPT, **kwargs), name)


@FAST
@given(iters=bad_ints(1), generate=st.booleans())
def test_jacobi_iters(iters, generate):
    kwargs = {"latent_schedule": "jacobi", "jacobi_iters": iters}
    raises_clear(lambda: LM.generate(PROMPT, max_new_tokens=1, **kwargs) if generate else LM(PROMPT, **kwargs),
                 "jacobi_iters")


@FAST
@given(schedule=st.one_of(st.text(max_size=6).filter(lambda s: s not in ("sequential", "jacobi")), st.integers(),
                          st.none()), generate=st.booleans())
def test_latent_schedule_names(schedule, generate):
    kwargs = {"latent_schedule": schedule}
    raises_clear(lambda: LM.generate(PROMPT, max_new_tokens=1, **kwargs) if generate else LM(PROMPT, **kwargs),
                 "latent_schedule")


@pytest.mark.parametrize("stop", ["eot", ("eot", 4), "entropy", ("entropy", 0.5, 2), {"kind": "fixed", "max_latents": 5}])
def test_jacobi_needs_the_prompts_latent_count(stop):
    raises_clear(lambda: LM.generate(PROMPT, max_new_tokens=1, stop=stop, latent_schedule="jacobi", jacobi_iters=2),
                 "stop")


STOP_BAD = st.one_of(
    st.text(max_size=6).filter(lambda s: s not in ("fixed", "eot", "entropy")),
    st.integers(), st.floats(),
    st.tuples(st.just("eot"), bad_ints(1).filter(lambda x: x is not None)),
    st.tuples(st.just("eot"), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.just("entropy"), bad_reals(0.0)),
    st.tuples(st.just("entropy"), st.floats(0, 1), bad_ints(1)),
    st.tuples(st.just("entropy"), st.floats(0, 1), st.integers(1, 3), bad_ints(1).filter(lambda x: x is not None)),
    st.tuples(st.sampled_from(["x", "fixed", ""]), st.integers()),
    st.dictionaries(st.text(max_size=4).filter(lambda k: k not in ("kind", "threshold", "patience", "max_latents")),
                    st.integers(), min_size=1, max_size=2),
    st.fixed_dictionaries({"kind": st.one_of(st.text(max_size=4), st.integers(), st.none())}).filter(
        lambda d: d["kind"] not in ("fixed", "eot", "entropy")),
    st.fixed_dictionaries({"kind": st.just("entropy"), "threshold": bad_reals(0.0)}),
    st.fixed_dictionaries({"kind": st.just("eot"), "max_latents": bad_ints(1).filter(lambda x: x is not None)}),
)


@FAST
@given(stop=STOP_BAD)
def test_generate_stop_rules(stop):
    raises_clear(lambda: LM.generate(PROMPT, max_new_tokens=1, stop=stop), "stop")


def test_generate_positions_and_stop_needing_latents():
    raises_clear(lambda: LM.generate(PROMPT, max_new_tokens=MAXPOS), "max_new_tokens")
    raises_clear(lambda: LM.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, stop="eot"), "stop")
    raises_clear(lambda: LM.generate(PROMPT, max_new_tokens=1, feedback="nope"), "feedback")


# ---- models, checkpoints ----------------------------------------------------------------------------------------

GPT2_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "max_position", "d_ff")
LLAMA_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "n_kv_head", "head_dim", "max_position")


@FAST
@given(family=st.sampled_from(["gpt2", "llama"]), data=st.data())
def test_model_config_sizes(family, data):
    cls, fields = (GPT2Config, GPT2_FIELDS) if family == "gpt2" else (LlamaConfig, LLAMA_FIELDS)
    field = data.draw(st.sampled_from(fields))
    value = data.draw(bad_ints(1).filter(lambda x: x is not None))
    raises_clear(lambda: cls(**{field: value}), field)


@FAST
@given(family=st.sampled_from(["gpt2", "llama"]), field=st.sampled_from(["norm_eps", "initializer_range"]),
       data=st.data())
def test_model_config_reals(family, field, data):
    cls = GPT2Config if family == "gpt2" else LlamaConfig
    raises_clear(lambda: cls(**{field: data.draw(bad_reals(0.0))}), field)


def test_model_classes_take_their_config():
    raises_clear(lambda: GPT2({"vocab_size": 4}), "config")
    raises_clear(lambda: Llama(GPT2Config()), "config")


def test_model_config_relations():
    raises_clear(lambda: GPT2Config(d_model=10, n_head=3), "d_model")
    raises_clear(lambda: LlamaConfig(n_head=4, n_kv_head=3, d_model=16), "n_kv_head")
    raises_clear(lambda: LlamaConfig(rope_theta=-1.0), "rope_theta")


@FAST
@given(device=st.one_of(st.sampled_from(["gpu", "cuda:99", "cpu:x", "", "tpu"]), st.integers(max_value=-1),
                        st.integers(min_value=64), st.booleans(), st.floats()),
       dtype=st.one_of(st.sampled_from(["float32", torch.int64, torch.bool]), st.integers()))
def test_devices_and_dtypes(device, dtype):
    raises_clear(lambda: MODEL.new_cache(1, 4, device=device), "device")
    raises_clear(lambda: MODEL.new_cache(1, 4, dtype=dtype), "dtype")
    raises_clear(lambda: KVCache(1, 1, 4, 1, 4, device=device), "device")


@FAST
@given(path=st.one_of(st.integers(), st.floats(), st.none(), st.lists(st.text(max_size=2), max_size=2),
                      st.just(b"folder"), st.just(MODEL)))
def test_from_pretrained_path_type(path):
    err = raises_clear(lambda: LatentLM.from_pretrained(path), "path")
    assert "folder" in str(err) and "os.PathLike" in str(err)


def test_tokenizer_without_eos_names_the_file(tmp_path):
    from tokenizers import Tokenizer, models

    from coconut_kernels.data import HFTokenizer, load_tokenizer
    from coconut_kernels.markers import load_folder_tokenizer

    file = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(file))
    for load in (lambda: HFTokenizer.load(file), lambda: load_tokenizer(file), lambda: HFTokenizer.load(tmp_path),
                 lambda: load_folder_tokenizer(tmp_path)):
        err = raises_clear(load, str(file))
        assert "eos_token" in str(err)
    raises_clear(lambda: HFTokenizer.load(file, eos_token="<eos>"), str(file))
    (tmp_path / "tokenizer_config.json").write_text("{")
    raises_clear(lambda: HFTokenizer.load(file), str(tmp_path / "tokenizer_config.json"))
    file.write_text("{")
    raises_clear(lambda: HFTokenizer.load(file, eos_token="a"), str(file))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A GPT-2 checkpoint folder in Hugging Face's layout, written from MODEL's tensors."""
    folder = tmp_path_factory.mktemp("ckpt")
    ours = MODEL.state_dict()
    tensors = {}
    for name, (hf_names, fn) in GPT2.hf_tensor_plan(MODEL.config).items():
        tensors[GPT2.hf_prefix + hf_names[0]] = (fn(ours[name]) if fn else ours[name]).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    c = MODEL.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_embd": c.d_model, "n_positions": c.max_position}))
    assert torch.equal(from_pretrained(folder).embed_tokens.weight, MODEL.embed_tokens.weight)
    return folder


@FAST
@given(name=st.text(st.characters(whitelist_categories=("Ll",)), min_size=1, max_size=8))
def test_missing_folder_is_named(checkpoint, name):
    missing = checkpoint.parent / f"missing-{name}"
    err = raises_clear(lambda: from_pretrained(missing), str(missing))
    assert isinstance(err, CheckpointNotFoundError) and "does not exist" in str(err)
    raises_clear(lambda: LatentLM.from_pretrained(missing, latent_token_id=LAT, start_latent_id=BOT,
                                                  end_latent_id=EOT, eos_token_id=EOS), str(missing))


@FAST
@given(file=st.sampled_from(["config.json", "model.safetensors"]), cut=st.floats(0, 0.999))
def test_truncated_files_are_named(checkpoint, tmp_path_factory, file, cut):
    folder = tmp_path_factory.mktemp("cut")
    for f in ("config.json", "model.safetensors"):
        data = (checkpoint / f).read_bytes()
        (folder / f).write_bytes(data[:int(len(data) * cut)] if f == file else data)
    err = raises_clear(lambda: from_pretrained(folder), file)
    assert isinstance(err, CheckpointError)


def test_invalid_config_values_are_named(checkpoint, tmp_path):
    for key, value in (("n_layer", 0), ("n_head", "two"), ("vocab_size", None)):
        hf = json.loads((checkpoint / "config.json").read_text())
        hf[key] = value
        (tmp_path / "config.json").write_text(json.dumps(hf))
        (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
        raises_clear(lambda: from_pretrained(tmp_path), "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    raises_clear(lambda: from_pretrained(tmp_path), "config.json")


# ---- KVCache: rejected calls leave it unchanged ----------------------------------------------------------------


def _cache():
    cache = KVCache(2, 2, 6, 1, 4, leftpad=[1, 0])
    q = torch.randn(2, 3, 1, 4)
    cache.attend(0, q, q, q)
    cache.advance(torch.tensor([3, 2], dtype=torch.int32))
    return cache, q


def _state(cache):
    return cache.k.clone(), cache.v.clone(), cache.seqlens.clone(), cache.leftpad.clone()


def _unchanged(cache, before):
    return all(torch.equal(a, b) for a, b in zip(_state(cache), before))


LENGTHS_BAD = st.one_of(
    st.integers(-50, -1), st.integers(7, 50),
    st.lists(st.integers(-5, 10), min_size=2, max_size=2).filter(lambda x: min(x) < 0 or max(x) > 6),
    st.lists(st.integers(0, 3), min_size=1, max_size=4).filter(lambda x: len(x) != 2),
    st.floats(), st.text(max_size=2), st.booleans(), st.just(torch.tensor([1.5, 1.0])),
    st.just(torch.tensor([1, 1], device="meta")))


@FAST
@given(method=st.sampled_from(["advance", "reset", "crop"]), value=LENGTHS_BAD)
def test_cache_lengths(method, value):
    cache, _ = _cache()
    before = _state(cache)
    name = {"advance": "n_new", "reset": "leftpad", "crop": "lengths"}[method]
    raises_clear(lambda: getattr(cache, method)(value), name)
    assert _unchanged(cache, before)


@FAST
@given(n=st.lists(st.integers(0, 6), min_size=2, max_size=2).filter(lambda n: n[0] > 3 or n[1] > 4))
def test_cache_advance_past_capacity(n):
    cache, _ = _cache()
    before = _state(cache)
    raises_clear(lambda: cache.advance(torch.tensor(n)), "n_new")
    assert _unchanged(cache, before)


@FAST
@given(layer=st.one_of(st.integers(-10, -1), st.integers(2, 10), st.floats(), st.text(max_size=2), st.none(),
                       st.booleans()))
def test_cache_layer_index(layer):
    cache, q = _cache()
    before = _state(cache)
    raises_clear(lambda: cache.attend(layer, q[:, :1], q[:, :1], q[:, :1]), "layer")
    assert _unchanged(cache, before)


@FAST
@given(n=st.integers(4, 9))
def test_cache_attend_past_capacity_leaves_cache_unchanged(n):
    cache, _ = _cache()
    before = _state(cache)
    q = torch.randn(2, n, 1, 4)
    raises_clear(lambda: cache.attend(1, q, q, q), "cache")
    assert _unchanged(cache, before)


@FAST
@given(which=st.sampled_from(["q", "k_new", "v_new", "cache"]), meta_first=st.booleans())
def test_cache_attend_device_mix_with_meta(which, meta_first):
    """A mix with the meta device is a device mismatch like any other (it would run the shape-only kernel)."""
    cache = KVCache(1, 2, 6, 1, 4) if which != "cache" else KVCache(1, 2, 6, 1, 4, device="meta")
    before = _state(cache) if which != "cache" else None
    args = {n: torch.randn(2, 1, 1, 4) for n in ("q", "k_new", "v_new")}
    if which != "cache":
        args[which] = args[which].to("meta")
    err = raises_clear(lambda: cache.attend(0, **args), "the cache's device")
    assert "meta" in str(err)
    if before is not None:
        assert _unchanged(cache, before)


def test_cache_attend_argument_types():
    cache, q = _cache()
    before = _state(cache)
    for name in ("q", "k_new", "v_new"):
        args = {"q": q[:, :1], "k_new": q[:, :1], "v_new": q[:, :1], name: "x"}
        raises_clear(lambda: cache.attend(0, **args), name)
    raises_clear(lambda: cache.attend(0, q[:, :1], q[:, :1], q[:, :1], new_seqlens=[1, 1]), "new_seqlens")
    assert _unchanged(cache, before)


@FAST
@given(head_dim=st.integers(257, 4096))
def test_head_dims_past_the_kernels_limit(head_dim):
    """latent_attention's kernels take head dims up to 256: a larger one fails when the cache or model is built."""
    raises_clear(lambda: KVCache(1, 1, 4, 1, head_dim), "head_dim")
    raises_clear(lambda: LlamaConfig(n_head=1, n_kv_head=1, d_model=head_dim, head_dim=head_dim), "head_dim")
    raises_clear(lambda: GPT2Config(n_head=1, d_model=head_dim), "head dim")


def test_head_dim_256_is_accepted():
    assert KVCache(1, 1, 4, 1, 256).k.shape[-1] == 256
    assert GPT2Config(n_head=1, d_model=256).head_dim == 256


@FAST
@given(name=st.sampled_from(["n_layers", "batch", "max_len", "n_kv_heads", "head_dim"]), data=st.data())
def test_cache_construction(name, data):
    sizes = dict(n_layers=1, batch=1, max_len=4, n_kv_heads=1, head_dim=4)
    sizes[name] = data.draw(bad_ints(1).filter(lambda x: x is not None))
    raises_clear(lambda: KVCache(**sizes), name)


# ---- ops --------------------------------------------------------------------------------------------------------


@FAST
@given(which=st.sampled_from(["batch_idx", "dst_pos", "src_pos"]), value=st.one_of(st.integers(-9, -1),
                                                                                    st.integers(3, 9)),
       inplace=st.booleans())
def test_latent_feedback_indices(which, value, inplace):
    embeds, hidden = torch.randn(3, 3, 4), torch.randn(3, 3, 4)
    idx = {"batch_idx": torch.tensor([0, 1]), "dst_pos": torch.tensor([1, 2]), "src_pos": torch.tensor([0, 1])}
    idx[which][1] = value
    before = embeds.clone()
    fn = latent_feedback_ if inplace else latent_feedback
    raises_clear(lambda: fn(embeds, hidden, idx["batch_idx"], idx["dst_pos"], idx["src_pos"]), which)
    assert torch.equal(embeds, before)


@pytest.mark.parametrize("layout", ["same", "shifted_view", "prefix_view", "transposed_batch"])
def test_latent_feedback_inplace_refuses_overlapping_embeds_and_hidden(layout):
    """latent_feedback_ reads hidden while it writes embeds: sharing elements would make the result depend on the
    order of the writes, so it is refused, naming both; the out-of-place form takes such inputs."""
    buf = torch.randn(2, 4, 4)
    embeds, hidden = {"same": (buf, buf), "shifted_view": (buf[:, 1:], buf[:, :3]),
                      "prefix_view": (buf, buf[:, :2]), "transposed_batch": (buf, buf.transpose(0, 1)[:2, :2])}[layout]
    before = buf.clone()
    idx = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 1]))
    err = str(raises_clear(lambda: latent_feedback_(embeds, hidden, *idx), "embeds"))
    assert "hidden" in err and "share memory" in err
    assert torch.equal(buf, before)
    out = latent_feedback(embeds, hidden, *idx)
    assert torch.equal(out, latent_feedback(embeds.clone(), hidden.clone(), *idx))


def test_latent_feedback_inplace_takes_disjoint_views_of_one_buffer():
    buf = torch.randn(2, 3, 8)
    embeds, hidden = buf[..., :4], buf[..., 4:]  # interleaved in memory, no element shared
    want = latent_feedback(embeds.clone(), hidden.clone(), torch.tensor([0, 1]), torch.tensor([1, 2]),
                           torch.tensor([0, 1]), norm="rmsnorm")
    latent_feedback_(embeds, hidden, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 1]),
                     norm="rmsnorm")
    assert torch.equal(embeds, want)


@FAST
@given(name=st.sampled_from(["eps", "norm", "embeds", "hidden", "dst_pos"]), data=st.data())
def test_latent_feedback_arguments(name, data):
    args = {"embeds": torch.randn(2, 3, 4), "hidden": torch.randn(2, 3, 4), "batch_idx": torch.tensor([0]),
            "dst_pos": torch.tensor([1]), "src_pos": torch.tensor([0]), "norm": "layernorm", "eps": 1e-5}
    args[name] = data.draw({"eps": bad_reals(0.0), "norm": st.one_of(st.text(max_size=5), st.integers(), st.none()),
                            "embeds": NOT_NUMBERS, "hidden": st.just(torch.randn(2, 3, 5)),
                            "dst_pos": st.just(torch.tensor([1.0]))}[name])
    assume(name != "norm" or args["norm"] not in ("none", "layernorm", "rmsnorm"))
    raises_clear(lambda: latent_feedback(**args), name)


@FAST
@given(which=st.sampled_from(["cache_seqlens", "new_seqlens", "cache_leftpad", "softmax_scale", "causal"]),
       data=st.data())
def test_latent_attention_arguments(which, data):
    q = torch.randn(2, 2, 2, 4)
    k_cache, v_cache = torch.zeros(2, 5, 1, 4), torch.zeros(2, 5, 1, 4)
    kw = {"cache_seqlens": torch.tensor([1, 0], dtype=torch.int32)}
    kw[which] = data.draw({
        "cache_seqlens": st.sampled_from([torch.tensor([-1, 0]), torch.tensor([4, 0]), torch.tensor([1.0, 0.0]),
                                          torch.tensor([0, 0, 0])]).map(lambda t: t.to(torch.int32)
                                                                        if not t.is_floating_point() else t),
        "new_seqlens": st.integers(-3, 8).filter(lambda n: not 0 <= n <= 2).map(
            lambda n: torch.tensor([n, 0], dtype=torch.int32)),
        "cache_leftpad": st.integers(4, 9).map(lambda n: torch.tensor([n, 0], dtype=torch.int32)),
        "softmax_scale": bad_reals(0.0, low_open=True).filter(lambda x: x is not None),
        "causal": st.one_of(st.integers(), st.text(max_size=2), st.none()),
    }[which])
    before = k_cache.clone()
    raises_clear(lambda: latent_attention(q, q[:, :, :1], q[:, :, :1], k_cache, v_cache, **kw), which)
    assert torch.equal(k_cache, before)


@FAST
@given(which=st.sampled_from(["q", "k_new", "v_new", "k_cache", "v_cache", "cache_seqlens", "cache_leftpad",
                              "new_seqlens"]))
def test_latent_attention_device_mix_with_meta(which):
    """The meta device mixed with CPU tensors is refused like any device mismatch, naming the argument (the C++
    checks would never run: such a call dispatches to the shape-only fake kernel)."""
    q = torch.randn(2, 1, 2, 4)
    kw = dict(q=q, k_new=q[:, :, :1], v_new=q[:, :, :1], k_cache=torch.zeros(2, 5, 1, 4),
              v_cache=torch.zeros(2, 5, 1, 4), cache_seqlens=torch.tensor([1, 0], dtype=torch.int32),
              cache_leftpad=torch.zeros(2, dtype=torch.int32), new_seqlens=torch.ones(2, dtype=torch.int32))
    kw[which] = kw[which].to("meta")
    err = str(raises_clear(lambda: latent_attention(**kw), "k_cache's device"))
    assert err.startswith(which if which != "k_cache" else "q") and "meta" in err


@FAST
@given(name=st.sampled_from(["temperature", "top_k", "top_p", "return_probs", "logits", "weight"]), data=st.data())
def test_soft_embedding_arguments(name, data):
    args = {"logits": torch.randn(3, 10), "weight": torch.randn(10, 4)}
    kw = {}
    value = data.draw({"temperature": bad_reals(0.0, low_open=True), "top_k": bad_ints(0, 10),
                       "top_p": bad_reals(0.0, 1.0, True), "return_probs": st.one_of(st.integers(), st.text()),
                       "logits": st.one_of(NOT_NUMBERS, st.just(torch.randn(3, 9)), st.just(torch.ones(3, 10).long())),
                       "weight": st.one_of(NOT_NUMBERS, st.just(torch.randn(9, 4)))}[name])
    (args if name in args else kw)[name] = value
    raises_clear(lambda: soft_embedding(args["logits"], args["weight"], **kw), name)


@FAST
@given(name=st.sampled_from(["targets", "chunk_size", "bias", "reduction", "hidden"]), data=st.data())
def test_linear_cross_entropy_arguments(name, data):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(10, 8), "targets": torch.tensor([0, 1, -100, 9])}
    kw = {}
    if name == "targets":
        bad = data.draw(st.one_of(st.integers(10, 2 ** 40), st.integers(-2 ** 40, -1).filter(lambda x: x != -100)))
        args["targets"] = torch.tensor([0, 1, bad, 9])
    elif name == "hidden":
        args["hidden"] = data.draw(st.sampled_from([torch.randn(4, 8).double(), torch.ones(4, 8).long()]))
    else:
        kw[name] = data.draw({"chunk_size": bad_ints(1).filter(lambda x: x is not None),
                              "bias": st.sampled_from([torch.zeros(3), torch.zeros(10).long(), "b"]),
                              "reduction": st.one_of(st.text(max_size=4), st.integers())}[name])
    raises_clear(lambda: linear_cross_entropy(args["hidden"], args["weight"], args["targets"], **kw), name)


# ---- LatentEngine: its own argument names ---------------------------------------------------------------------


@FAST
@given(lm=st.one_of(st.text(max_size=5), st.integers(), st.none(), st.just(MODEL)))
def test_engine_needs_a_latent_lm(lm):
    from coconut_kernels.engine import LatentEngine

    err = raises_clear(lambda: LatentEngine(lm, 2), "lm must be a LatentLM")
    assert type(lm).__name__ in str(err)


@pytest.mark.parametrize("prompt,params,name", [
    ([1, 2, 99], None, "prompt_ids[2] = 99"),
    ([1, -1], None, "prompt_ids[1] = -1"),
    ([1, LAT, 2], None, "prompt_ids must read"),
    ([1, BOT, BOT, LAT, EOT], None, "prompt_ids has 2 <bot>"),
    ([1, 2, BOT, LAT, EOT], {"max_tokens": 0}, "max_tokens must be"),
    ([1, 2, BOT, LAT, EOT], {"max_tokens": MAXPOS}, "params.max_tokens: prompt + latents + params.max_tokens"),
    ([1, 2, 3], {"stop": "eot"}, "prompt_ids has no latent tokens"),
])
def test_engine_errors_use_its_own_argument_names(prompt, params, name):
    from coconut_kernels.engine import LatentEngine

    engine = LatentEngine(LM, 2, use_cuda_graph=False)
    err = str(raises_clear(lambda: engine.add(prompt, params), name))
    assert "input_ids" not in err and "max_new_tokens" not in err
    assert not engine.has_unfinished()
    raises_clear(lambda: engine.generate(5), "prompts")


def test_from_pretrained_unknown_keyword(tmp_path):
    raises_clear(lambda: LatentLM.from_pretrained(tmp_path, flash_attention=True), "flash_attention")
