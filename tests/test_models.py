"""The model layer against `transformers` with random weights: same logits (fp32 to 1e-5, fp64 tighter),
with left padding, from single-file and sharded checkpoints and from model objects; incremental decoding
through the cache equals the full forward; gradients equal transformers'; bad checkpoints raise.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from coconut_kernels.models import GPT2, Llama, LlamaConfig, from_pretrained, load_config  # noqa: E402
from tests.helpers import HF_GPT2_EAGER, assert_within_torch_error, transformers_version  # noqa: E402

V = 101


def _hf_config(case):
    gpt2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **HF_GPT2_EAGER)
    llama = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    scaled = lambda kind, **kw: dict(llama, rope_theta=1000.0, rope_scaling={"rope_type": kind, **kw})  # noqa: E731
    return {
        "gpt2": (transformers.GPT2Config, gpt2),
        "gpt2-untied": (transformers.GPT2Config, dict(gpt2, tie_word_embeddings=False, activation_function="gelu",
                                                     scale_attn_by_inverse_layer_idx=True)),
        "llama-linear": (transformers.LlamaConfig, scaled("linear", factor=2.0)),
        "llama-llama3": (transformers.LlamaConfig, dict(
            scaled("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
            attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
        "llama-yarn": (transformers.LlamaConfig, scaled("yarn", factor=4.0, original_max_position_embeddings=16)),
        "llama-dynamic": (transformers.LlamaConfig, scaled("dynamic", factor=2.0)),
        "qwen2": (transformers.Qwen2Config, dict(llama, rope_theta=10000.0)),
        "qwen2-mqa-tied": (transformers.Qwen2Config, dict(llama, num_key_value_heads=1, tie_word_embeddings=True)),
        "mistral": (transformers.MistralConfig, dict(llama, head_dim=32, sliding_window=48)),
    }[case]


def _hf_model(case, seed=0):
    config_cls, kw = _hf_config(case)
    cls = {transformers.GPT2Config: transformers.GPT2LMHeadModel,
           transformers.LlamaConfig: transformers.LlamaForCausalLM,
           transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
           transformers.MistralConfig: transformers.MistralForCausalLM}[config_cls]
    torch.manual_seed(seed)
    model = cls(config_cls(**kw)).eval()
    # transformers initialises norms to 1 and biases to 0: randomise everything so that each is tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def _batch(B, T, leftpad, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] >= torch.tensor(leftpad)[:, None]).long()
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _hf_logits(hf, ids, mask, pos):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _assert_logits_close(ours, ref, mask, tol):
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=tol, rtol=tol)


CASES = ["gpt2", "gpt2-untied", "llama-linear", "llama-llama3", "llama-yarn", "llama-dynamic", "qwen2",
         "qwen2-mqa-tied", "mistral"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, checkpoint folder), built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            hf = _hf_model(case)
            folder = tmp_path_factory.mktemp(case)
            hf.save_pretrained(folder)
            cache[case] = hf, folder
        return cache[case]

    return get


@pytest.mark.parametrize("case", [c if c != "llama-yarn" else pytest.param(c, marks=pytest.mark.skipif(
    transformers_version() < (4, 51), reason="transformers < 4.51 computes YaRN from max_position_embeddings, "
    "ignoring rope_scaling['original_max_position_embeddings'] (16 here)")) for c in CASES])
def test_logits_match_transformers_fp32(saved, case):
    hf, folder = saved(case)
    model = from_pretrained(folder)
    assert type(model) is (GPT2 if case.startswith("gpt2") else Llama)
    assert model.lm_head_weight.dtype == torch.float32
    for B, T, leftpad in [(2, 11, [0, 0]), (3, 13, [0, 4, 9])]:
        ids, mask, pos = _batch(B, T, leftpad)
        with torch.no_grad():
            ours = model(ids, attention_mask=mask, position_ids=pos)
        _assert_logits_close(ours, _hf_logits(hf, ids, mask, pos), mask, 1e-5)


@pytest.mark.parametrize("case", ["gpt2", "llama-llama3", "qwen2"])
def test_logits_match_transformers_fp64(saved, case):
    hf, folder = saved(case)
    model = from_pretrained(folder, dtype=torch.float64)
    hf64 = _hf_model(case).double()
    ids, mask, pos = _batch(3, 13, [0, 4, 9])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    # transformers' RMSNorm and rotary tables compute in fp32 even for fp64 models: Llama agrees to ~1e-7
    tol = 1e-12 if case == "gpt2" else 1e-6
    _assert_logits_close(ours, _hf_logits(hf64, ids, mask, pos), mask, tol)


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
@pytest.mark.parametrize("case", ["gpt2", "qwen2"])
def test_low_precision_within_twice_transformers_error(saved, case, mode):
    """bf16 weights, or fp32 weights under bf16 autocast (the cache then holds bf16): error against fp64
    no more than 2x transformers' error in the same mode."""
    hf, folder = saved(case)
    ids, mask, pos = _batch(3, 13, [0, 4, 9])
    ref64 = _hf_logits(_hf_model(case).double(), ids, mask, pos)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model, hf_lowp = from_pretrained(folder, dtype=dtype), _hf_model(case).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        ours, theirs = model(ids, attention_mask=mask), _hf_logits(hf_lowp, ids, mask, pos)
    keep = mask.bool()
    assert_within_torch_error(ours[keep], ref64[keep], theirs[keep], factor=2.0, name=f"{case} {mode} logits")


@pytest.mark.parametrize("case", ["gpt2", "qwen2"])
def test_sharded_checkpoint_and_model_object(saved, tmp_path, case):
    hf, _ = saved(case)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids, mask, pos = _batch(2, 9, [0, 3])
    ref = _hf_logits(hf, ids, mask, pos)
    for source in (tmp_path, hf):
        model = from_pretrained(source)
        with torch.no_grad():
            _assert_logits_close(model(ids, attention_mask=mask, position_ids=pos), ref, mask, 1e-5)
    with torch.no_grad():  # the model object's tensors were copied, not shared
        model.embed_tokens.weight.add_(1.0)
    torch.testing.assert_close(_hf_logits(hf, ids, mask, pos), ref)


@pytest.mark.parametrize("case", ["gpt2", "llama-yarn"])
def test_incremental_decoding_matches_full_forward(saved, case):
    """Ragged chunks per row (new_seqlens) through forward_embeds + advance give the full forward's logits."""
    model = from_pretrained(saved(case)[1])
    B, T, leftpad = 3, 14, [0, 3, 6]
    ids, mask, _ = _batch(B, T, leftpad)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
    cache = model.new_cache(B, T, leftpad=torch.tensor(leftpad, dtype=torch.int32))
    done = torch.zeros(B, dtype=torch.long)
    g = torch.Generator().manual_seed(2)
    checked = 0
    # the first chunk is a ragged prefill past each row's pads (the kernel refuses chunks ending inside
    # the padding), then ragged chunks of 0..n tokens per row
    take = torch.tensor(leftpad) + torch.randint(1, 3, (B,), generator=g)
    while bool((done < T).any()):
        n = int(take.max())
        if n == 0:
            take = torch.minimum(torch.randint(0, 5, (B,), generator=g), T - done)
            continue
        padded = torch.nn.functional.pad(ids, (0, n))
        chunk = torch.stack([padded[b, done[b]:done[b] + n] for b in range(B)])
        with torch.no_grad():
            logits = model.logits(model.forward_embeds(model.embed(chunk), cache, new_seqlens=take.to(torch.int32)))
        for b in range(B):
            for t in range(int(take[b])):
                if done[b] + t >= leftpad[b]:
                    torch.testing.assert_close(logits[b, t], full[b, done[b] + t], atol=1e-5, rtol=1e-5)
                    checked += 1
        cache.advance(take.to(torch.int32))
        done += take
        take = torch.minimum(torch.randint(0, 5, (B,), generator=g), T - done)
    assert checked == T * B - sum(leftpad)


@pytest.mark.parametrize("case", ["gpt2-untied", "qwen2"])
def test_gradients_match_transformers(saved, case):
    """Backward through the cache: parameter gradients equal transformers' (fp64)."""
    hf, folder = saved(case)
    hf64 = _hf_model(case).double()
    model = from_pretrained(folder, dtype=torch.float64)
    ids, mask, pos = _batch(2, 10, [0, 3])
    w = torch.randn(2, 10, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * mask[..., None]
    (model(ids, attention_mask=mask, position_ids=pos) * w).sum().backward()
    (hf64(input_ids=ids, attention_mask=mask, position_ids=pos).logits * w).sum().backward()
    # relative to each gradient's scale; transformers' RMSNorm computes in fp32 even in an fp64 model
    tol = 1e-12 if case.startswith("gpt2") else 1e-6
    if case.startswith("gpt2"):
        h = hf64.transformer
        grads = [(model.embed_tokens.weight.grad, h.wte.weight.grad), (model.wpe.weight.grad, h.wpe.weight.grad),
                 (model.layers[0].c_attn.weight.grad, h.h[0].attn.c_attn.weight.grad.t()),
                 (model.layers[1].mlp_proj.bias.grad, h.h[1].mlp.c_proj.bias.grad),
                 (model.lm_head.weight.grad, hf64.lm_head.weight.grad)]
    else:
        attn = hf64.model.layers[0].self_attn
        grads = [(model.embed_tokens.weight.grad, hf64.model.embed_tokens.weight.grad),
                 (model.layers[0].qkv_proj.weight.grad, torch.cat([attn.q_proj.weight.grad, attn.k_proj.weight.grad,
                                                                   attn.v_proj.weight.grad])),
                 (model.layers[0].qkv_proj.bias.grad, torch.cat([attn.q_proj.bias.grad, attn.k_proj.bias.grad,
                                                                 attn.v_proj.bias.grad])),
                 (model.final_norm.weight.grad, hf64.model.norm.weight.grad)]
    for ours, ref in grads:
        assert (ours - ref).abs().max() <= tol * ref.abs().max()


def test_interface_attributes(saved):
    gpt2 = from_pretrained(saved("gpt2")[1])
    assert gpt2.norm_kind == "layernorm" and gpt2.final_norm.bias is not None and gpt2.final_norm.eps == 1e-5
    assert gpt2.lm_head_weight is gpt2.embed_tokens.weight and gpt2.lm_head_bias is None
    c = gpt2.config
    shape = (c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.d_model, c.head_dim, c.max_position)
    assert shape == (V, 2, 4, 4, 64, 16, 64)
    mistral = from_pretrained(saved("mistral")[1])
    c = mistral.config
    assert mistral.norm_kind == "rmsnorm" and mistral.final_norm.bias is None and mistral.final_norm.eps == 1e-6
    assert (c.n_head, c.n_kv_head, c.head_dim, c.sliding_window, c.tie_embeddings) == (4, 2, 32, 48, False)
    assert mistral.lm_head_weight is mistral.lm_head.weight
    ids = torch.randint(0, V, (2, 5))
    assert mistral.embed(ids).shape == (2, 5, 64)
    cache = mistral.new_cache(2, 8, dtype=torch.float64)
    assert cache.seqlens.dtype == torch.int32 and cache.leftpad.dtype == torch.int32
    # the config round-trips through its transformers dict
    assert load_config(saved("llama-llama3")[0].config) == load_config(saved("llama-llama3")[1])
    fresh = Llama(LlamaConfig(vocab_size=V, n_layer=1, n_head=4, d_model=32, d_ff=48, n_kv_head=2, max_position=16))
    assert fresh(ids).shape == (2, 5, V)


def _rewrite_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = load_file(src / "model.safetensors")
    save_file(edit_tensors(tensors) if edit_tensors else tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_legacy_checkpoint_layouts(saved, tmp_path):
    """The original GPT-2 upload (no "transformer." prefix, causal-mask buffers) and a base-model Llama
    checkpoint (no "model." prefix) load the same weights."""
    for case, prefix, extra in [("gpt2", "transformer.", "h.0.attn.bias"), ("llama-linear", "model.", None)]:
        hf, folder = saved(case)

        def edit(t):
            t = {k.removeprefix(prefix): v for k, v in t.items()}
            return {**t, extra: torch.ones(1, 1, 64, 64)} if extra else t

        model = from_pretrained(_rewrite_checkpoint(folder, tmp_path / case, edit_tensors=edit))
        ids, mask, pos = _batch(2, 9, [0, 3])
        with torch.no_grad():
            _assert_logits_close(model(ids, attention_mask=mask, position_ids=pos), _hf_logits(hf, ids, mask, pos),
                                 mask, 1e-5)


def test_bad_checkpoints_raise_clear_errors(saved, tmp_path):
    _, llama = saved("llama-linear")
    _, gpt2 = saved("gpt2")
    drop = lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}  # noqa: E731
    with pytest.raises(ValueError, match=r"lacks tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(_rewrite_checkpoint(llama, tmp_path / "missing", edit_tensors=drop))
    extra = lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}  # noqa: E731
    with pytest.raises(ValueError, match=r"does not use.*q_norm"):
        from_pretrained(_rewrite_checkpoint(llama, tmp_path / "extra", edit_tensors=extra))
    untied = lambda c: {**c, "tie_word_embeddings": False}  # noqa: E731
    with pytest.raises(ValueError, match=r"lacks tensors.*lm_head\.weight"):
        from_pretrained(_rewrite_checkpoint(gpt2, tmp_path / "untied", edit_config=untied))
    bert = lambda c: {**c, "model_type": "bert", "architectures": ["BertForMaskedLM"]}  # noqa: E731
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*BertForMaskedLM"):
        from_pretrained(_rewrite_checkpoint(gpt2, tmp_path / "bert", edit_config=bert))
    head = lambda c: {**c, "architectures": ["LlamaForSequenceClassification"]}  # noqa: E731
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification"):
        load_config(_rewrite_checkpoint(llama, tmp_path / "head", edit_config=head))
    longrope = lambda c: {**c, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}  # noqa: E731
    with pytest.raises(ValueError, match=r"longrope"):
        load_config(_rewrite_checkpoint(llama, tmp_path / "longrope", edit_config=longrope))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((gpt2 / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path / "empty")


def test_unsupported_lengths_and_masks_raise(saved):
    gpt2 = from_pretrained(saved("gpt2")[1])
    with pytest.raises(ValueError, match="learned positions"):
        gpt2.new_cache(1, 65)
    mistral = from_pretrained(saved("mistral")[1])
    with pytest.raises(ValueError, match="sliding_window=48"):
        mistral.new_cache(1, 49)
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="left padding"):
        gpt2(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))


def test_legacy_rope_scaling_config():
    """transformers 4.x configs: rope_theta at the top and rope_scaling with "type"."""
    hf = json.loads(json.dumps(_hf_config("llama-linear")[1]))
    hf.update(model_type="llama", rope_theta=500.0, rope_scaling={"type": "linear", "factor": 3.0})
    c = load_config(hf)
    assert c.rope_theta == 500.0 and c.rope_scaling == {"rope_type": "linear", "factor": 3.0}


# ---- dropout ------------------------------------------------------------------------------------------------


def _dropout_gpt2(embd, resid, attn):
    hf = _hf_model("gpt2").double()
    hf.config.embd_pdrop, hf.config.resid_pdrop, hf.config.attn_pdrop = embd, resid, attn
    hf.transformer.drop.p = embd  # the modules were built with the config's 0.0
    for block in hf.transformer.h:
        block.attn.resid_dropout.p = block.mlp.dropout.p = resid
        block.attn.attn_dropout.p = attn
    return hf


def test_gpt2_dropout_is_read_from_the_checkpoint_and_off_in_eval():
    hf = _dropout_gpt2(0.1, 0.2, 0.3)
    ours = from_pretrained(hf)
    c = ours.config
    assert (c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) == (0.1, 0.2, 0.3)
    assert not ours.training  # as transformers' from_pretrained
    ids, mask, pos = _batch(2, 12, [0, 3])
    with torch.no_grad():
        eval_logits = ours(ids, pos, mask)
        _assert_logits_close(eval_logits, _hf_logits(hf, ids, mask, pos), mask, 1e-10)  # no dropout in eval
        ours.train()
        torch.manual_seed(0)
        a = ours(ids, pos, mask)
        torch.manual_seed(0)
        b = ours(ids, pos, mask)
        torch.manual_seed(1)
        c1 = ours(ids, pos, mask)
    assert torch.equal(a, b) and not torch.allclose(a, c1) and not torch.allclose(a, eval_logits)
    # a config without the keys gets transformers' defaults: 0.1 each
    cfg = {k: v for k, v in hf.config.to_dict().items() if not k.endswith("_pdrop")}
    assert {getattr(load_config(cfg), n) for n in GPT2.dropout_fields} == {0.1}


def test_gpt2_embedding_and_residual_dropout_equal_transformers_in_train_mode():
    """With the same torch seed, HF GPT-2 and ours draw the same embedding and residual dropout masks (the same
    calls, shapes and order), so their train-mode logits agree: the dropout sits where transformers has it."""
    hf = _dropout_gpt2(0.15, 0.25, 0.0).train()
    ours = from_pretrained(hf).train()
    ids, _, _ = _batch(2, 16, [0, 0])
    with torch.no_grad():
        torch.manual_seed(5)
        want = hf(input_ids=ids).logits
        torch.manual_seed(5)
        got = ours(ids)
        torch.manual_seed(6)
        other = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, other)


def test_attention_dropout_of_both_families_in_train_mode_only():
    for case, field in (("gpt2", "attn_pdrop"), ("llama-linear", "attention_dropout")):
        ours = from_pretrained(_hf_model(case)).double()
        ours.set_dropout(0.0)
        setattr(ours.config, field, 0.4)
        ids, mask, pos = _batch(2, 10, [0, 2])
        with torch.no_grad():
            plain = ours(ids, pos, mask)
            ours.train()
            torch.manual_seed(2)
            dropped = ours(ids, pos, mask)
            torch.manual_seed(2)
            again = ours(ids, pos, mask)
            ours.eval()
            torch.testing.assert_close(ours(ids, pos, mask), plain, rtol=0, atol=0)
        assert torch.equal(dropped, again) and not torch.allclose(dropped, plain), case
    with pytest.raises(ValueError, match="dropout must be in"):
        ours.set_dropout(1.0)
    with pytest.raises(ValueError, match="attention_dropout"):
        LlamaConfig(n_layer=1, n_head=2, d_model=8, d_ff=16, attention_dropout=-0.5)
