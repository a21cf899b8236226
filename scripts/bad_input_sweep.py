"""A sweep of hand-picked bad inputs across the public surface of coconut_kernels (LatentLM construction, forward,
generate, from_pretrained, model configs and calls, KVCache, the ops, feedback modules), independent of the
property-based tests in tests/test_bad_input.py.

Each case runs in a forked child with a timeout and is classified as
  clear      CoconutError whose message names the argument (or file),
  unclear    any other exception, or a CoconutError that does not name it,
  silent     the call returned: bad input accepted,
  corrupted  rejected, but the KVCache / output tensor it was given changed,
  crash      the child died or hung past the timeout.
Prints the counts and every case that is not clear; exits 1 when any case is silent, corrupted or a crash.

    PYTHONPATH=. python scripts/bad_input_sweep.py [--timeout 60] [--verbose]
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

import coconut_kernels as ck
from coconut_kernels import CoconutError, KVCache, LatentLM
from coconut_kernels.feedback import ProjectedFeedback, SoftFeedback
from coconut_kernels.models import GPT2, GPT2Config, Llama, LlamaConfig, from_pretrained

torch.set_num_threads(1)
V, P = 20, 24  # vocabulary, positions
BOT, LAT, EOT, EOS = 16, 17, 18, 19
torch.manual_seed(0)
GPT = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=8, max_position=P)).eval()
LLAMA = Llama(LlamaConfig(vocab_size=V, n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=16, max_position=P)).eval()
LM = LatentLM(GPT, LAT, BOT, EOT, EOS)
BATCH = torch.tensor([[3, 4, 5, BOT, LAT, LAT, EOT, 6, EOS], [0, 0, 7, BOT, LAT, EOT, 8, 9, EOS]])
MASK = torch.tensor([[1] * 9, [0, 0] + [1] * 7])
LABELS = torch.where((BATCH == LAT) | (MASK == 0), -100, BATCH)
PROMPT = torch.tensor([[3, 4, BOT, LAT, LAT, EOT], [5, 6, BOT, LAT, EOT, 7]])


class Changed(Exception):
    """A rejected call left the state it was given changed."""


def keeps(state: list[torch.Tensor], call):
    """Run call(); when it raises, check the tensors in `state` are as they were before."""
    before = [t.clone() for t in state]
    try:
        call()
    except Exception as e:
        if not all(torch.equal(a, b) for a, b in zip(before, state)):
            raise Changed(f"{type(e).__name__}: {e}") from None
        raise


def cache():
    c = KVCache(2, 2, 8, 1, 4)
    q = torch.randn(2, 3, 1, 4)
    c.attend(0, q, q, q)
    c.advance(3)
    return c


def cache_call(method, *args, **kwargs):
    c = cache()
    return lambda: keeps([c.k, c.v, c.seqlens, c.leftpad], lambda: getattr(c, method)(*args, **kwargs))


def row(*tokens):
    return torch.tensor([list(tokens)])


def with_(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# ---- the checkpoint folders -----------------------------------------------------------------------------------


def write_checkpoint(folder: Path, config_edit=None, tensors_edit=None) -> Path:
    """GPT's weights in Hugging Face's GPT-2 layout (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    ours = GPT.state_dict()
    hf = {GPT2.hf_prefix + names[0]: (fn(ours[k]) if fn else ours[k]).contiguous().clone()
          for k, (names, fn) in GPT2.hf_tensor_plan(GPT.config).items()}
    save_file(tensors_edit(hf) if tensors_edit else hf, str(folder / "model.safetensors"))
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_layer": 2,
              "n_head": 2, "n_embd": 8, "n_positions": P}
    (folder / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config))
    return folder


def truncated(folder: Path, name: str, keep: float) -> Path:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:int(len(data) * keep)])
    return folder


ROOT = Path(tempfile.mkdtemp(prefix="coconut-sweep-"))
GOOD = write_checkpoint(ROOT / "good")


def ckpt(name, **edits) -> Path:
    return write_checkpoint(ROOT / name, **edits)


def folder_with(name: str, files: dict[str, bytes]) -> Path:
    f = ROOT / name
    f.mkdir()
    for k, v in files.items():
        (f / k).write_bytes(v)
    return f


# ---- the cases: (entry point, expected name(s) in the message, description, call) -----------------------------

CASES: list[tuple[str, tuple[str, ...], str, object]] = []


def add(entry: str, names, description: str, call) -> None:
    CASES.append((entry, (names,) if isinstance(names, str) else tuple(names), description, call))


def construction_cases():
    e = "LatentLM()"
    for name, slot, values in (("latent_token_id", 0, [V, -1, 2.5, "17", None, True]),
                               ("start_latent_id", 1, [V + 5, -3, 16.0]),
                               ("end_latent_id", 2, [100, -100]),
                               ("eos_token_id", 3, [V, -2, 1.5, "eos"])):
        for v in values:
            ids = [LAT, BOT, EOT, EOS]
            ids[slot] = v
            add(e, name, f"{name}={v!r}", lambda ids=ids: LatentLM(GPT, *ids))
    add(e, ("latent_token_id", "start_latent_id"), "latent == start", lambda: LatentLM(GPT, BOT, BOT, EOT, EOS))
    add(e, ("start_latent_id", "end_latent_id"), "start == end", lambda: LatentLM(GPT, LAT, EOT, EOT, EOS))
    add(e, "eos_token_id", "eos == latent", lambda: LatentLM(GPT, LAT, BOT, EOT, LAT))
    for fb in ("nope", 3, ["hidden"], None):
        add(e, "feedback", f"feedback={fb!r}", lambda fb=fb: LatentLM(GPT, LAT, BOT, EOT, EOS, feedback=fb))
    add(e, "feedback", "ProjectedFeedback of another d_model",
        lambda: LatentLM(GPT, LAT, BOT, EOT, EOS, feedback=ProjectedFeedback(6)))
    add(e, "model", "model='gpt2'", lambda: LatentLM("gpt2", LAT, BOT, EOT, EOS))
    add(e, "model", "model=nn.Linear", lambda: LatentLM(torch.nn.Linear(2, 2), LAT, BOT, EOT, EOS))


def forward_cases():
    e = "LatentLM.forward"
    add(e, "input_ids", "float ids", lambda: LM(BATCH.float()))
    add(e, "input_ids", "bool ids", lambda: LM(BATCH.bool()))
    add(e, "input_ids", "list of lists", lambda: LM(BATCH.tolist()))
    add(e, "input_ids", "1-D ids", lambda: LM(BATCH[0]))
    add(e, "input_ids", "3-D ids", lambda: LM(BATCH[None]))
    add(e, "input_ids", "empty batch (0, 9)", lambda: LM(BATCH[:0]))
    add(e, "input_ids", "zero-length rows (2, 0)", lambda: LM(BATCH[:, :0]))
    add(e, "input_ids", "id == vocab size", lambda: LM(with_(BATCH, (0, 1), V)))
    add(e, "input_ids", "id -1", lambda: LM(with_(BATCH, (1, 8), -1)))
    add(e, "input_ids", "id 10**6", lambda: LM(with_(BATCH, (0, 0), 10 ** 6)))
    add(e, "input_ids", "id out of range under the mask's padding", lambda: LM(with_(BATCH, (1, 0), V + 3), MASK))
    add(e, "input_ids", "more tokens than positions", lambda: LM(torch.ones(1, P + 1, dtype=torch.long)))
    add(e, "attention_mask", "mask shape (2, 5)", lambda: LM(BATCH, MASK[:, :5]))
    add(e, "attention_mask", "mask value 2", lambda: LM(BATCH, with_(MASK, (0, 3), 2)))
    add(e, "attention_mask", "mask value -1", lambda: LM(BATCH, with_(MASK, (0, 0), -1)))
    add(e, "attention_mask", "float mask 0.5", lambda: LM(BATCH, with_(MASK.float(), (0, 4), 0.5)))
    add(e, "attention_mask", "all-zero row", lambda: LM(BATCH, with_(MASK, 1, 0)))
    add(e, "attention_mask", "hole in the ones", lambda: LM(BATCH, with_(MASK, (0, 4), 0)))
    add(e, "attention_mask", "mask as a list", lambda: LM(BATCH, MASK.tolist()))
    add(e, "attention_mask", "complex mask", lambda: LM(BATCH, MASK.to(torch.complex64)))
    add(e, "labels", "label == vocab size", lambda: LM(BATCH, MASK, with_(LABELS, (0, 8), V)))
    add(e, "labels", "label -5", lambda: LM(BATCH, MASK, with_(LABELS, (0, 8), -5)))
    add(e, "labels", "float labels", lambda: LM(BATCH, MASK, LABELS.float()))
    add(e, "labels", "labels shape (2, 8)", lambda: LM(BATCH, MASK, LABELS[:, :8]))
    add(e, "labels", "label at a latent", lambda: LM(BATCH, MASK, with_(LABELS, (0, 4), 3)))
    add(e, "position_ids", "position == max_position", lambda: LM(BATCH, position_ids=torch.full_like(BATCH, P)))
    add(e, "position_ids", "position -1", lambda: LM(BATCH, position_ids=torch.full_like(BATCH, -1)))
    add(e, "position_ids", "float positions", lambda: LM(BATCH, position_ids=torch.zeros(2, 9)))
    add(e, "position_ids", "positions shape (9,)", lambda: LM(BATCH, position_ids=torch.arange(9)))
    add(e, "return_logits", "return_logits='yes'", lambda: LM(BATCH, return_logits="yes"))
    add(e, "input_ids", "ids on another device than the model", lambda: LM(BATCH.to("meta")))
    add(e, "labels", "labels on another device than input_ids", lambda: LM(BATCH, labels=LABELS.to("meta")))
    add(e, "input_ids", "numpy ids", lambda: LM(BATCH.numpy()))
    layouts = {
        "latent before <bot>": row(3, LAT, BOT, EOT, 4),
        "<eot> <latent> <bot> (reversed markers)": row(3, EOT, LAT, BOT, 4),
        "latent without <bot>": row(3, 4, LAT, EOT, 5),
        "latent without <eot>": row(3, BOT, LAT, 4, 5),
        "latent at the end of the row": row(3, 4, BOT, LAT),
        "latent first": row(LAT, BOT, EOT, 3),
        "latents not contiguous": row(3, BOT, LAT, 4, LAT, EOT),
        "<eot> only in the right padding": (row(3, BOT, LAT, EOT), torch.tensor([[1, 1, 1, 0]])),
        "latent in the padding": (row(LAT, 3, BOT, LAT, EOT), torch.tensor([[0, 1, 1, 1, 1]])),
    }
    for name, ids in layouts.items():
        ids, mask = ids if isinstance(ids, tuple) else (ids, None)
        add(e, "input_ids", f"layout: {name}", lambda ids=ids, mask=mask: LM(ids, mask))


def generate_cases():
    e = "LatentLM.generate"

    def gen(ids=PROMPT, mask=None, **kw):
        kw.setdefault("max_new_tokens", 2)
        return lambda: LM.generate(ids, mask, **kw)

    for v in (0, -1, 2.0, "3", None, True, 10 ** 9):
        add(e, "max_new_tokens", f"max_new_tokens={v!r}", gen(max_new_tokens=v))
    for v in (0, -1.0, math.nan, math.inf, "hot", None):
        add(e, "temperature", f"temperature={v!r}", gen(do_sample=True, temperature=v))
    for v in (0, 1.5, math.nan, -0.1, "x"):
        add(e, "top_p", f"top_p={v!r}", gen(do_sample=True, top_p=v))
    for v in (-1, 2.5, "5", None):
        add(e, "top_k", f"top_k={v!r}", gen(do_sample=True, top_k=v))
    for v in ("yes", 1, None):
        add(e, "do_sample", f"do_sample={v!r}", gen(do_sample=v))
    for v in (V, -5, 1.5):
        add(e, "eos_token_id", f"eos_token_id={v!r}", gen(eos_token_id=v))
    for v in (1.5, "pad"):
        add(e, "pad_token_id", f"pad_token_id={v!r}", gen(pad_token_id=v))
    for v in (42, "seed"):
        add(e, "generator", f"generator={v!r}", gen(generator=v))
    add(e, "return_latents", "return_latents='yes'", gen(return_latents="yes"))
    add(e, "temperature", "temperature=1e-45 (a denormal: logits / T overflow)", gen(do_sample=True, temperature=1e-45))
    add(e, "stop", "stop=('eot', 10**9): a latent budget past the positions", gen(stop=("eot", 10 ** 9)))
    add(e, "use_cuda_graph", "use_cuda_graph='no'", gen(use_cuda_graph="no"))
    for v in ("telepathy", 7):
        add(e, "feedback", f"feedback={v!r}", gen(feedback=v))
    add(e, "feedback", "ProjectedFeedback of another d_model", gen(feedback=ProjectedFeedback(6)))
    stops = ["whenever", 5, ("eot", 0), ("eot", "x"), ("eot", 1, 2), ("entropy",), ("entropy", math.nan),
             ("entropy", -1.0), ("entropy", 0.1, 0), ("entropy", 0.1, 1.5), ("entropy", 0.1, 2, 0), ("fixed", 3),
             {"kind": "x"}, {"kind": "eot", "foo": 1}, {"kind": "entropy", "threshold": "a"},
             {"kind": "eot", "max_latents": -1}, {}, ["entropy", math.inf, 2]]
    for v in stops:
        add(e, "stop", f"stop={v!r}", gen(stop=v))
    add(e, "stop", "stop='eot' with a prompt without latents", gen(row(3, 4, 5), stop="eot"))
    add(e, "attention_mask", "all-zero mask row", gen(mask=with_(torch.ones_like(PROMPT), 0, 0)))
    add(e, "attention_mask", "mask value 3", gen(mask=with_(torch.ones_like(PROMPT), (1, 1), 3)))
    add(e, "attention_mask", "hole in the mask", gen(mask=with_(torch.ones_like(PROMPT), (1, 2), 0)))
    add(e, "attention_mask", "mask shape (2, 3)", gen(mask=torch.ones(2, 3, dtype=torch.long)))
    add(e, "input_ids", "id == vocab size", gen(with_(PROMPT, (0, 0), V)))
    add(e, "input_ids", "negative id", gen(with_(PROMPT, (1, 5), -7)))
    add(e, "input_ids", "empty batch", gen(PROMPT[:0]))
    add(e, "input_ids", "float prompt", gen(PROMPT.float()))
    add(e, "input_ids", "prompt as a list", gen(PROMPT.tolist()))
    add(e, "input_ids", "latents without <bot>", gen(row(3, 4, LAT, LAT, EOT)))
    add(e, "input_ids", "<eot> <latent> <bot>", gen(row(3, EOT, LAT, BOT, 4)))
    add(e, "input_ids", "latents not contiguous", gen(row(3, BOT, LAT, 4, LAT, EOT)))


def pretrained_cases():
    e = "from_pretrained"
    add(e, "no-such-folder", "missing folder", lambda: from_pretrained(ROOT / "no-such-folder"))
    add(e, "no-such-folder", "LatentLM.from_pretrained, missing folder",
        lambda: LatentLM.from_pretrained(ROOT / "no-such-folder", latent_token_id=LAT, start_latent_id=BOT,
                                         end_latent_id=EOT, eos_token_id=EOS))
    add(e, "config.json", "a file instead of the folder", lambda: from_pretrained(GOOD / "config.json"))
    add(e, "config.json", "folder without config.json",
        lambda: from_pretrained(folder_with("noconfig", {"model.safetensors": (GOOD / "model.safetensors")
                                                         .read_bytes()})))
    add(e, "model.safetensors", "folder without model.safetensors",
        lambda: from_pretrained(folder_with("noweights", {"config.json": (GOOD / "config.json").read_bytes()})))
    for keep in (0.0, 0.3, 0.9):
        add(e, "config.json", f"config.json truncated to {keep:.0%}",
            lambda keep=keep: from_pretrained(truncated(ckpt(f"cfg{keep}"), "config.json", keep)))
    for keep in (0.0, 0.001, 0.05, 0.5, 0.99):
        add(e, "model.safetensors", f"model.safetensors truncated to {keep:.1%}",
            lambda keep=keep: from_pretrained(truncated(ckpt(f"st{keep}"), "model.safetensors", keep)))
    add(e, "config.json", "config.json is a list",
        lambda: from_pretrained(folder_with("cfglist", {"config.json": b"[1, 2]",
                                                        "model.safetensors": (GOOD / "model.safetensors")
                                                        .read_bytes()})))
    add(e, "config.json", "config.json is not UTF-8",
        lambda: from_pretrained(folder_with("cfgbin", {"config.json": b"\xff\xfe\x00{"})))
    for key, value in (("n_layer", 0), ("n_head", "two"), ("vocab_size", None), ("n_embd", -8),
                       ("model_type", "bert"), ("n_positions", 1.5)):
        add(e, ("config.json", key), f"config {key}={value!r}",
            lambda key=key, value=value: from_pretrained(ckpt(f"cfg-{key}", config_edit=lambda c: {**c, key: value})))
    add(e, ("config.json", "vocab_size"), "config without vocab_size",
        lambda: from_pretrained(ckpt("cfg-novocab", config_edit=lambda c: {k: v for k, v in c.items()
                                                                           if k != "vocab_size"})))
    add(e, "config.json", "config vocab_size contradicts the tensors",
        lambda: from_pretrained(ckpt("cfg-vocab", config_edit=lambda c: {**c, "vocab_size": V + 1})))
    add(e, "wte", "a tensor missing",
        lambda: from_pretrained(ckpt("drop", tensors_edit=lambda t: {k: v for k, v in t.items() if "wte" not in k})))
    add(e, "model-00002", "index naming a missing shard",
        lambda: from_pretrained(folder_with("shards", {
            "config.json": (GOOD / "config.json").read_bytes(),
            "model.safetensors.index.json": json.dumps({"weight_map": {"transformer.wte.weight":
                                                                       "model-00002.safetensors"}}).encode()})))
    add(e, "model.safetensors.index.json", "index without weight_map",
        lambda: from_pretrained(folder_with("badindex", {"config.json": (GOOD / "config.json").read_bytes(),
                                                         "model.safetensors.index.json": b"{}"})))
    add(e, "dtype", "dtype='float32'", lambda: from_pretrained(GOOD, dtype="float32"))
    add(e, "dtype", "dtype=torch.int64", lambda: from_pretrained(GOOD, dtype=torch.int64))
    add(e, "device", "device='gpu'", lambda: from_pretrained(GOOD, device="gpu"))
    add(e, "device", "device='cuda:7'", lambda: from_pretrained(GOOD, device="cuda:7"))
    add(e, "source", "source=42", lambda: from_pretrained(42))
    add(e, "eos_token_id", "LatentLM.from_pretrained, eos outside the vocabulary",
        lambda: LatentLM.from_pretrained(GOOD, latent_token_id=LAT, start_latent_id=BOT, end_latent_id=EOT,
                                         eos_token_id=V + 1))


def model_cases():
    e = "models"
    for field, value in (("n_layer", -1), ("d_model", 0), ("vocab_size", 2.5), ("max_position", 0),
                         ("n_head", None), ("norm_eps", math.nan), ("d_ff", 0), ("initializer_range", -1.0)):
        add(e, field, f"GPT2Config({field}={value!r})", lambda f=field, v=value: GPT2Config(**{f: v}))
    add(e, ("d_model", "n_head"), "GPT2Config(d_model=8, n_head=3)", lambda: GPT2Config(d_model=8, n_head=3))
    add(e, "activation", "GPT2Config(activation='swish')", lambda: GPT2Config(activation="swish"))
    add(e, "config", "GPT2(a dict)", lambda: GPT2({"vocab_size": V}))
    add(e, "config", "Llama(a GPT2Config)", lambda: Llama(GPT2Config()))
    for kw in ({"n_kv_head": 3, "n_head": 4, "d_model": 16}, {"head_dim": 3}, {"rope_theta": 0.0},
               {"d_ff": -1}, {"sliding_window": 0}, {"n_layer": "2"}):
        add(e, tuple(kw), f"LlamaConfig({kw})", lambda kw=kw: LlamaConfig(**kw))
    ids = torch.tensor([[1, 2, 3]])
    add(e, "input_ids", "model(ids == vocab size)", lambda: GPT(with_(ids, (0, 1), V)))
    add(e, "input_ids", "llama(negative id)", lambda: LLAMA(with_(ids, (0, 0), -1)))
    add(e, "attention_mask", "model(mask value 2)", lambda: GPT(ids, attention_mask=torch.tensor([[0, 2, 1]])))
    add(e, "attention_mask", "model(right padding)", lambda: GPT(ids, attention_mask=torch.tensor([[1, 1, 0]])))
    add(e, "position_ids", "model(position == max_position)", lambda: GPT(ids, position_ids=torch.full_like(ids, P)))
    add(e, "input_ids", "model(float ids)", lambda: GPT(ids.float()))
    add(e, "batch", "new_cache(batch=0)", lambda: GPT.new_cache(0, 4))
    add(e, "max_len", "new_cache(max_len=-2)", lambda: GPT.new_cache(1, -2))
    add(e, "max_len", "new_cache(max_len > positions)", lambda: GPT.new_cache(1, P + 1))
    add(e, "device", "new_cache(device='gpu')", lambda: GPT.new_cache(1, 4, device="gpu"))
    add(e, "dtype", "new_cache(dtype=torch.int32)", lambda: GPT.new_cache(1, 4, dtype=torch.int32))


def cache_cases():
    e = "KVCache"
    for name, value in (("n_layers", 0), ("batch", -1), ("max_len", 2.5), ("n_kv_heads", None), ("head_dim", "4")):
        sizes = dict(n_layers=1, batch=1, max_len=4, n_kv_heads=1, head_dim=4)
        sizes[name] = value
        add(e, name, f"KVCache({name}={value!r})", lambda s=sizes: KVCache(**s))
    add(e, "dtype", "KVCache(dtype=torch.int64)", lambda: KVCache(1, 1, 4, 1, 4, dtype=torch.int64))
    add(e, "device", "KVCache(device='nope')", lambda: KVCache(1, 1, 4, 1, 4, device="nope"))
    add(e, "leftpad", "KVCache(leftpad=100)", lambda: KVCache(1, 1, 4, 1, 4, leftpad=100))
    for v in (-1, 100, [1, 2, 3], 1.5, torch.tensor([1.0, 1.0]), torch.tensor([6, 0]), True, "2"):
        add(e, "n_new", f"advance({v!r})", cache_call("advance", v))
    for v in (-1, 100, [1], "a", [0, 9]):
        add(e, "leftpad", f"reset(leftpad={v!r})", cache_call("reset", v))
    for v in (-1, 100, [1.5, 1.0], None):
        add(e, "lengths", f"crop({v!r})", cache_call("crop", v))
    q = torch.randn(2, 1, 1, 4)
    for v in (5, -1, "0", 1.0, None):
        add(e, "layer", f"attend(layer={v!r})", cache_call("attend", v, q, q, q))
    big = torch.randn(2, 6, 1, 4)
    add(e, "cache", "attend past the capacity", cache_call("attend", 0, big, big, big))
    add(e, "k_new", "attend with k_new of another head count",
        cache_call("attend", 0, q, torch.randn(2, 1, 2, 4), q))


def op_cases():
    e = "latent_feedback"
    emb, hid = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    i0 = torch.tensor([0])

    def lf(inplace=False, embeds=None, hidden=None, b=i0, d=i0, s=i0, **kw):
        embeds = emb.clone() if embeds is None else embeds
        hidden = hid if hidden is None else hidden
        fn = ck.latent_feedback_ if inplace else ck.latent_feedback
        if inplace and isinstance(embeds, torch.Tensor):
            return lambda: keeps([embeds], lambda: fn(embeds, hidden, b, d, s, **kw))
        return lambda: fn(embeds, hidden, b, d, s, **kw)

    for inplace in (False, True):
        n = e + ("_" if inplace else "")
        add(n, "dst_pos", "dst_pos out of range", lf(inplace, d=torch.tensor([3])))
        add(n, "src_pos", "negative src_pos", lf(inplace, s=torch.tensor([-1])))
        add(n, "batch_idx", "batch_idx out of range", lf(inplace, b=torch.tensor([2])))
        add(n, "dst_pos", "float dst_pos", lf(inplace, d=torch.tensor([0.0])))
        add(n, "eps", "eps=nan", lf(inplace, norm="layernorm", eps=math.nan))
        add(n, "eps", "eps='x'", lf(inplace, norm="rmsnorm", eps="x"))
        add(n, "norm", "norm='batch'", lf(inplace, norm="batch"))
        add(n, "norm", "norm=None", lf(inplace, norm=None))
    leaf = emb.clone().requires_grad_()
    add(e + "_", "embeds", "in place into a leaf that requires grad",
        lambda: keeps([leaf.detach()], lambda: ck.latent_feedback_(leaf, hid, i0, i0, i0)))
    add(e + "_", "duplicate", "duplicate destinations",
        lf(True, b=torch.tensor([0, 0]), d=torch.tensor([1, 1]), s=torch.tensor([0, 1])))
    add(e, "embeds", "embeds as a list", lf(embeds=[[1.0]]))
    add(e, "hidden", "integer hidden", lf(embeds=emb.long(), hidden=hid.long()))
    add(e, "weight", "weight of another size", lf(norm="layernorm", weight=torch.ones(5)))
    add(e, "bias", "bias with rmsnorm", lf(norm="rmsnorm", bias=torch.zeros(4)))
    add(e, "hidden", "d mismatch", lf(hidden=torch.randn(2, 3, 5)))

    e = "latent_attention"
    q = torch.randn(1, 2, 2, 8)
    sl = torch.zeros(1, dtype=torch.int32)

    def la(q=q, k=None, seqlens=sl, **kw):
        kc, vc = torch.zeros(1, 6, 2, 8), torch.zeros(1, 6, 2, 8)
        k = q if k is None else k
        return lambda: keeps([kc, vc], lambda: ck.latent_attention(q, k, k, kc, vc, seqlens, **kw))

    add(e, "cache_seqlens", "negative cache_seqlens", la(seqlens=sl - 1))
    add(e, "cache_seqlens", "cache_seqlens past the cache", la(seqlens=sl + 5))
    add(e, "cache_seqlens", "int64 cache_seqlens", la(seqlens=sl.long()))
    add(e, "cache_seqlens", "cache_seqlens as a list", la(seqlens=[0]))
    add(e, "cache_leftpad", "cache_leftpad past the rows", la(cache_leftpad=sl + 9))
    add(e, "new_seqlens", "negative new_seqlens", la(new_seqlens=sl - 1))
    add(e, "new_seqlens", "new_seqlens > Sq", la(new_seqlens=sl + 3))
    add(e, "softmax_scale", "softmax_scale=nan", la(softmax_scale=math.nan))
    add(e, "softmax_scale", "softmax_scale='a'", la(softmax_scale="a"))
    add(e, "softmax_scale", "softmax_scale=-1", la(softmax_scale=-1.0))
    add(e, "causal", "causal='yes'", la(causal="yes"))
    add(e, "q", "3-D q", la(q=q[0], k=q))
    add(e, "q", "q as a list", la(q=[1.0], k=q))
    add(e, "q", "fp64 q with an fp32 cache", la(q=q.double(), k=q))
    add(e, "rotary_cos", "rotary table too short", la(rotary_cos=torch.ones(1, 4), rotary_sin=torch.ones(1, 4)))
    add(e, "rotary_cos", "rotary_cos without rotary_sin", la(rotary_cos=torch.ones(8, 4)))
    add(e, "head", "head count not a multiple", la(q=torch.randn(1, 2, 3, 8), k=q))

    e = "soft_embedding"
    lg, W = torch.randn(3, 10), torch.randn(10, 4)
    for name, value in (("temperature", 0), ("temperature", math.nan), ("temperature", True), ("top_k", 11),
                        ("top_k", -1), ("top_k", 2.5), ("top_p", 0), ("top_p", math.nan), ("top_p", 1.01),
                        ("return_probs", "yes")):
        add(e, name, f"{name}={value!r}", lambda n=name, v=value: ck.soft_embedding(lg, W, **{n: v}))
    add(e, "logits", "integer logits", lambda: ck.soft_embedding(lg.long(), W))
    add(e, "logits", "1-D logits", lambda: ck.soft_embedding(lg[0], W))
    add(e, "logits", "logits as a list", lambda: ck.soft_embedding([1.0], W))
    add(e, "weight", "weight rows != V", lambda: ck.soft_embedding(lg, W[:9]))

    e = "skinny_linear"
    xs, Ws = torch.randn(4, 8), torch.randn(6, 8)
    add(e, "x", "fp64 x", lambda: ck.skinny_linear(xs.double(), Ws))
    add(e, "x", "integer x", lambda: ck.skinny_linear(xs.long(), Ws))
    add(e, "x", "17 rows", lambda: ck.skinny_linear(torch.randn(17, 8), Ws))
    add(e, "x", "x as a list", lambda: ck.skinny_linear([[1.0] * 8], Ws))
    add(e, ("x", "weight"), "K mismatch", lambda: ck.skinny_linear(xs, Ws[:, :7]))
    add(e, "weight", "1-D weight", lambda: ck.skinny_linear(xs, Ws[0]))
    add(e, "weight", "weight on meta", lambda: ck.skinny_linear(xs, Ws.to("meta")))
    add(e, "bias", "bias of 5", lambda: ck.skinny_linear(xs, Ws, torch.zeros(5)))
    add(e, "bias", "fp64 bias", lambda: ck.skinny_linear(xs, Ws, torch.zeros(6, dtype=torch.float64)))

    e = "linear_cross_entropy"
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor([0, 1, -100, 9])
    add(e, "targets", "target == V", lambda: ck.linear_cross_entropy(h, w, with_(t, 0, 10)))
    add(e, "targets", "target -5", lambda: ck.linear_cross_entropy(h, w, with_(t, 1, -5)))
    add(e, "targets", "float targets", lambda: ck.linear_cross_entropy(h, w, t.float()))
    add(e, "targets", "targets shape (3,)", lambda: ck.linear_cross_entropy(h, w, t[:3]))
    add(e, "bias", "bias of 3", lambda: ck.linear_cross_entropy(h, w, t, torch.zeros(3)))
    add(e, "hidden", "fp64 hidden, fp32 weight", lambda: ck.linear_cross_entropy(h.double(), w, t))
    add(e, "hidden", "integer hidden and weight", lambda: ck.linear_cross_entropy(h.long(), w.long(), t))
    add(e, "chunk_size", "chunk_size=0", lambda: ck.linear_cross_entropy(h, w, t, chunk_size=0))
    add(e, "chunk_size", "chunk_size=1.5", lambda: ck.linear_cross_entropy(h, w, t, chunk_size=1.5))
    add(e, "reduction", "reduction='avg'", lambda: ck.linear_cross_entropy(h, w, t, reduction="avg"))
    add(e, "hidden", "hidden as a list", lambda: ck.linear_cross_entropy([[1.0]], w, t))


def feedback_cases():
    e = "feedback modules"
    for kw in ({"temperature": 0}, {"temperature": math.inf}, {"top_k": -1}, {"top_p": 2.0}, {"noise": "pink"},
               {"noise_scale": math.nan}):
        add(e, tuple(kw), f"SoftFeedback({kw})", lambda kw=kw: SoftFeedback(**kw))
    add(e, "d_model", "ProjectedFeedback(0)", lambda: ProjectedFeedback(0))
    add(e, "d_hidden", "ProjectedFeedback(4, d_hidden=-1)", lambda: ProjectedFeedback(4, d_hidden=-1))
    add(e, "backend", "set_backend('cudnn')", lambda: ck.set_backend("cudnn"))


def sharing_cases():
    """Arguments that name one object twice or mix devices: aliasing in-place operands, meta next to CPU, markers
    twice in a row, an engine's own argument names."""
    from coconut_kernels.engine import LatentEngine

    idx = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 1]))
    buf = torch.randn(2, 4, 4)
    add("latent_feedback_", ("embeds", "hidden"), "embeds is hidden",
        lambda: keeps([buf], lambda: ck.latent_feedback_(buf, buf, *idx)))
    add("latent_feedback_", ("embeds", "hidden"), "embeds and hidden overlapping views",
        lambda: keeps([buf], lambda: ck.latent_feedback_(buf[:, 1:], buf[:, :3], *idx)))
    q, kc = torch.randn(2, 1, 1, 4), torch.zeros(2, 5, 1, 4)
    lens = torch.tensor([1, 0], dtype=torch.int32)
    add("latent_attention", "q", "q on meta, caches on CPU",
        lambda: ck.latent_attention(q.to("meta"), q, q, kc, kc.clone(), lens))
    add("latent_attention", "cache_seqlens", "cache_seqlens on meta",
        lambda: keeps([kc], lambda: ck.latent_attention(q, q, q, kc, kc.clone(), lens.to("meta"))))
    add("KVCache", "q", "attend(q on meta)", cache_call("attend", 0, q.to("meta"), q, q))
    add("KVCache", "q", "attend(q as a list)", cache_call("attend", 0, q.tolist(), q, q))
    add("KVCache", "n_new", "advance(a meta tensor)", cache_call("advance", torch.tensor([1, 1], device="meta")))
    add("KVCache", "head_dim", "KVCache(head_dim=512), past the kernels' 256", lambda: KVCache(1, 1, 4, 1, 512))
    add("GPT2Config", "head dim", "d_model 512 with one head", lambda: GPT2Config(d_model=512, n_head=1))
    for ids, what in ((row(3, BOT, 4, BOT, LAT, EOT, 5), "two <bot>"), (row(3, BOT, LAT, EOT, EOT, 5), "two <eot>"),
                      (row(3, EOT, 4, BOT, 5), "<eot> before <bot>")):
        add("LatentLM.forward", "input_ids", what, lambda ids=ids: LM(ids))
        add("LatentLM.generate", "input_ids", what, lambda ids=ids: LM.generate(ids, max_new_tokens=1))
    cut = torch.tensor([[0, 1, 1, 1, 1, 0], [1] * 6])
    add("LatentLM.forward", "attention_mask", "mask padded on both sides leaves out the <eot>",
        lambda: LM(PROMPT, cut))
    add("LatentLM.from_pretrained", "path", "from_pretrained(123)", lambda: LatentLM.from_pretrained(123))
    add("LatentEngine", "lm", "LatentEngine('model', 2)", lambda: LatentEngine("model", 2))
    engine = lambda: LatentEngine(LM, 2, use_cuda_graph=False)  # noqa: E731
    add("LatentEngine.add", "prompt_ids", "prompt id past the vocabulary", lambda: engine().add([3, V]))
    add("LatentEngine.add", "max_tokens", "max_tokens past the positions",
        lambda: engine().add([3, BOT, LAT, EOT], {"max_tokens": P}))


# ---- running ----------------------------------------------------------------------------------------------------


def _child(call, names, conn):
    try:
        call()
        conn.send(("silent", "returned normally"))
    except Changed as e:
        conn.send(("corrupted", str(e)))
    except CoconutError as e:
        named = any(n in str(e) for n in names)
        conn.send(("clear" if named else "unclear", f"{type(e).__name__}: {e}"))
    except BaseException as e:  # noqa: BLE001 - the point is to see every kind
        conn.send(("unclear", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run(timeout: float, verbose: bool) -> int:
    for build in (construction_cases, forward_cases, generate_cases, pretrained_cases, model_cases, cache_cases,
                  op_cases, feedback_cases, sharing_cases):
        build()
    ctx = mp.get_context("fork")
    counts = {k: 0 for k in ("clear", "unclear", "silent", "corrupted", "crash")}
    others = []
    start = time.time()
    for entry, names, description, call in CASES:
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(call, names, send))
        p.start()
        send.close()
        got = recv.poll(timeout)
        result = recv.recv() if got else None
        p.join(5 if got else 0)
        if p.is_alive():
            p.kill()
            p.join()
        if result is None:
            result = ("crash", "hung past the timeout" if not got else f"child died (exit code {p.exitcode})")
        kind, message = result
        counts[kind] += 1
        line = f"[{kind}] {entry} / {names[0]}: {description} -> {message.splitlines()[0][:200]}"
        if kind != "clear":
            others.append(line)
        elif verbose:
            print(line)
    print(f"{len(CASES)} bad inputs across the public surface ({time.time() - start:.0f} s, "
          f"torch {torch.__version__}, coconut_kernels {ck.__version__})")
    print("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if others:
        print("not clear:")
        for line in others:
            print("  " + line)
    return 1 if counts["silent"] or counts["corrupted"] or counts["crash"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--verbose", action="store_true", help="print the clear cases too")
    args = ap.parse_args()
    try:
        return run(args.timeout, args.verbose)
    finally:
        import shutil
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
