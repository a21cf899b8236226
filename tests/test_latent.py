"""LatentLM against the reference algorithm (coconut_kernels/bench/reference_coconut.py, the oracle: the reference
code's own passes on a `transformers` model with concatenated caches and full-vocabulary logits).

Training: loss and every parameter gradient, aligned (left-padded) and ragged batches, 0..8 latents with
different counts per example, fp64 and fp32, GPT-2 and Llama. Generation: greedy tokens equal the reference's
one-example no-cache loop; a batch equals its examples one by one; seeded sampling is reproducible; every
feedback mode and stop rule against a plain no-cache loop written here.
"""
from __future__ import annotations

import random

import pytest
import torch

from coconut_kernels.bench.reference_coconut import ReferenceCoconut
from coconut_kernels import LatentLM
from coconut_kernels.data import AlignedCollator, RaggedCollator
from coconut_kernels.feedback import MixtureFeedback, ProjectedFeedback, SoftFeedback, resolve_feedback
from coconut_kernels.models import from_pretrained
from tests.helpers import HF_GPT2_EAGER, assert_within_torch_error

transformers = pytest.importorskip("transformers")

V = 97
EOS, BOT, LAT, EOT, PAD = V - 4, V - 3, V - 2, V - 1, V - 4


def hf_gpt2(dtype, seed=0):
    """transformers' GPT-2; the fp64 reference with eager attention (tests/helpers.py: HF_GPT2_EAGER), the
    low-precision baselines with the default SDPA ones."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=EOS, eos_token_id=EOS, attn_pdrop=0.0, embd_pdrop=0.0,
                                  resid_pdrop=0.0, **(HF_GPT2_EAGER if dtype == torch.float64 else {}))
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def hf_llama(dtype, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=EOS,
                                   eos_token_id=EOS, pad_token_id=PAD)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def examples(n_latents: list[int], seed=0, with_labels=True):
    rng = random.Random(seed)
    out = []
    for k in n_latents:
        q = [rng.randrange(V - 4) for _ in range(rng.randint(3, 12))]
        head = q + [BOT] + [LAT] * k + [EOT]
        if not with_labels:
            out.append({"input_ids": head})
            continue
        tail = [rng.randrange(V - 4) for _ in range(rng.randint(1, 6))] + [EOS]
        out.append({"input_ids": head + tail, "labels": [-100] * len(head) + tail})
    return out


def pair(family, dtype):
    hf = (hf_gpt2 if family == "gpt2" else hf_llama)(dtype)
    ours = from_pretrained(hf)
    return ReferenceCoconut(hf, LAT, BOT, EOT, EOS), LatentLM(ours, LAT, BOT, EOT, EOS)


def grads_by_our_name(ref: ReferenceCoconut, lm: LatentLM) -> dict:
    """Reference gradients mapped onto our parameter names through the loader's tensor plan."""
    model = lm.model
    plan = type(model).hf_tensor_plan(model.config)
    hf_grads = {}
    for name, p in ref.base_causallm.named_parameters():
        hf_grads[name.removeprefix(model.hf_prefix)] = p.grad
    out = {}
    for ours, (names, fn) in plan.items():
        g = [hf_grads[n] for n in names]
        out[ours] = fn(*g) if fn else g[0]
    return out


def check_grads(ref, lm, rtol, atol):
    expected = grads_by_our_name(ref, lm)
    for name, p in lm.model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-9, 1e-11), (torch.float32, 1e-4, 1e-5)])
@pytest.mark.parametrize("layout", ["aligned", "ragged"])
def test_loss_and_grads_match_reference(family, dtype, rtol, atol, layout):
    if family == "llama" and dtype == torch.float64:
        rtol, atol = 1e-5, 1e-7  # transformers' RMSNorm computes in fp32 even in an fp64 model
    ref, lm = pair(family, dtype)
    ex = examples([0, 3, 8, 1, 5], seed=1)
    # The reference needs the aligned layout; ours takes both and must give the same loss.
    ref_batch = AlignedCollator(PAD, LAT)(ex)
    batch = (AlignedCollator if layout == "aligned" else RaggedCollator)(PAD, LAT)(ex)
    ref_loss = ref(ref_batch["input_ids"], ref_batch["attention_mask"], ref_batch["labels"],
                   ref_batch["position_ids"])[0]
    ref_loss.backward()
    out = lm(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss.to(out.loss.dtype), rtol=rtol, atol=atol)
    check_grads(ref, lm, rtol, atol)


@pytest.mark.parametrize("n_latents", [[0, 0], [2, 2], [1, 4, 0]])
def test_loss_matches_reference_latent_counts(n_latents):
    ref, lm = pair("gpt2", torch.float64)
    batch = AlignedCollator(PAD, LAT)(examples(n_latents, seed=len(n_latents)))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    ref_loss = ref(*args)[0]
    ref_loss.backward()
    out = lm(*args)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-12)
    check_grads(ref, lm, 1e-9, 1e-11)


def test_return_logits_match_reference():
    ref, lm = pair("gpt2", torch.float64)
    batch = AlignedCollator(PAD, LAT)(examples([2, 4], seed=3))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    with torch.no_grad():
        ref_logits = ref(*args)[1]
        out = lm(*args, return_logits=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-10, atol=1e-10)


def test_ragged_equals_each_example_alone():
    _, lm = pair("gpt2", torch.float64)
    ex = examples([4, 0, 2], seed=5)
    batch = RaggedCollator(PAD, LAT)(ex)
    with torch.no_grad():
        total = lm(batch["input_ids"], batch["attention_mask"], batch["labels"])
        sums, n = 0.0, 0
        for e in ex:
            one = RaggedCollator(PAD, LAT)([e])
            o = lm(one["input_ids"], one["attention_mask"], one["labels"])
            sums += o.loss * o.n_tokens
            n += o.n_tokens
    assert total.n_tokens == n
    torch.testing.assert_close(total.loss, sums / n, rtol=1e-12, atol=1e-12)


def test_ragged_backward_when_the_longest_example_has_no_thoughts():
    """The longest example, last in the batch and without thoughts, fills its cache rows in the first pass and
    sits out the others' thought passes (as in a batch of mixed curriculum stages, uniform_prob > 0): the
    batch's loss and gradients are those of its examples alone."""
    _, lm = pair("llama", torch.float64)
    ex = examples([3, 1, 0], seed=8)
    ex[2]["input_ids"] = ex[2]["input_ids"][:-1] + [5] * 20 + [EOS]
    ex[2]["labels"] = ex[2]["labels"][:-1] + [5] * 20 + [EOS]
    batch = RaggedCollator(PAD, LAT)(ex)
    assert int(batch["attention_mask"][2].sum()) == batch["input_ids"].shape[1]
    out = lm(batch["input_ids"], batch["attention_mask"], batch["labels"])
    got = torch.autograd.grad(out.loss * out.n_tokens, list(lm.parameters()), allow_unused=True)
    want = [torch.zeros_like(p) for p in lm.parameters()]
    for e in ex:
        one = RaggedCollator(PAD, LAT)([e])
        o = lm(one["input_ids"], one["attention_mask"], one["labels"])
        for w, g in zip(want, torch.autograd.grad(o.loss * o.n_tokens, list(lm.parameters()), allow_unused=True)):
            if g is not None:
                w += g
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, rtol=1e-10, atol=1e-12)


def plain_feedback_loss(hf, fb, ex):
    """The training loss of a batch the plain way, with any feedback mode: per example, every latent re-runs the
    whole `transformers` model over the input embeddings so far (no cache) and feeds fb(its last normed hidden
    state); then one full pass and a summed cross-entropy of the shifted labels; the mean over labelled tokens."""
    E = hf.transformer.wte.weight
    total, n = 0.0, 0
    for e in ex:
        ids, labels = e["input_ids"], e["labels"]
        k = ids.count(LAT)
        s = ids.index(LAT) if k else len(ids)
        embeds = [E[t] for t in ids[:s]]
        for _ in range(k):
            if not fb.sequential:
                embeds.append(E[LAT])
                continue
            normed = hf.transformer(inputs_embeds=torch.stack(embeds)[None]).last_hidden_state[0, -1]
            logits = hf.lm_head(normed)
            token = logits.argmax()[None] if fb.needs_token else None
            embeds.append(fb(normed[None], logits[None] if fb.needs_logits else None, token, E)[0])
        logits = hf(inputs_embeds=torch.stack(embeds + [E[t] for t in ids[s + k:]])[None]).logits[0]
        target = torch.tensor(labels[1:])
        total = total + torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum")
        n += int((target != -100).sum())
    return total / n


@pytest.mark.parametrize("mode,counts", [
    *[(m, [2, 2, 2]) for m in ("hidden", "projected", "soft", "mixture", "pause")],
    *[(m, [2, 0, 3]) for m in ("hidden", "projected", "soft", "mixture", "pause")],
])
def test_feedback_modes_train_like_a_plain_loop(mode, counts):
    """The training forward of every feedback mode: loss and every gradient (model and feedback parameters)
    equal the plain no-cache loop's in fp64; with equal and with different latent counts per example."""
    ref, ours = pair("gpt2", torch.float64)
    torch.manual_seed(0)
    fb = {"projected": lambda: ProjectedFeedback(32).double(), "soft": lambda: SoftFeedback(0.7, top_k=10),
          "mixture": lambda: MixtureFeedback(1.0, top_p=0.8)}.get(mode, lambda: resolve_feedback(mode, 32))()
    lm = LatentLM(ours.model, LAT, BOT, EOT, EOS, feedback=fb)
    ex = examples(counts, seed=37)
    batch = RaggedCollator(PAD, LAT)(ex)
    fb_params = list(fb.parameters())
    loss = lm(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    loss.backward(inputs=list(lm.model.parameters()) + fb_params)
    fb_grads = [p.grad for p in fb_params]
    for p in fb_params:
        p.grad = None
    ref_loss = plain_feedback_loss(ref.base_causallm, fb, ex)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    check_grads(ref, lm, 1e-9, 1e-11)
    for got, p in zip(fb_grads, fb_params):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-11)


def test_bf16_autocast_within_torch_error():
    """Under bf16 autocast the loss and every gradient are within 3x the error of the reference run the same way
    (transformers under bf16 autocast), both against the fp64 reference. 3x, not flash-attention's 2x: two bf16
    pipelines round different intermediates, and per tensor their errors differ by up to ~2x either way."""
    ex = examples([3, 1, 0, 5], seed=7)

    def run(dtype, autocast, ours):
        ref, lm = pair("gpt2", dtype)
        batch = (RaggedCollator if ours else AlignedCollator)(PAD, LAT)(ex)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if ours:
                loss = lm(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
            else:
                loss = ref(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])[0]
        loss.backward()
        return loss, ({n: p.grad for n, p in lm.model.named_parameters()} if ours else grads_by_our_name(ref, lm))

    loss64, g64 = run(torch.float64, False, False)
    loss_torch, g_torch = run(torch.float32, True, False)
    loss, grads = run(torch.float32, True, True)
    assert_within_torch_error(loss, loss64, loss_torch, factor=3.0, name="loss")
    for name, g in grads.items():
        assert_within_torch_error(g, g64[name], g_torch[name], factor=3.0, atol=1e-3 * g64[name].abs().max().item(),
                                  name=name)


def test_bad_input():
    _, lm = pair("gpt2", torch.float32)
    ids = torch.tensor([[5, 6, BOT, LAT, 7, LAT, EOT, 8]])
    with pytest.raises(ValueError, match="not contiguous"):
        lm(ids)
    ids = torch.tensor([[5, 6, BOT, LAT, LAT, EOT, 8]])
    labels = ids.clone()
    with pytest.raises(ValueError, match="labels must be -100 at latent"):
        lm(ids, labels=labels)
    with pytest.raises(ValueError, match="attention_mask must have"):
        lm(ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        lm(torch.full((1, 130), 5))
    with pytest.raises(ValueError, match="input_ids must be"):
        lm(ids[0])
    with pytest.raises(ValueError, match="feedback must be one of"):
        LatentLM(lm.model, LAT, BOT, EOT, EOS, feedback="nope")


# ---------------------------------------------------------------------------------------------------
# Generation


def prompts(n_latents, seed=0, layout="ragged"):
    ex = examples(n_latents, seed=seed, with_labels=False)
    return ex, (AlignedCollator if layout == "aligned" else RaggedCollator)(PAD, LAT)(ex)


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("layout", ["ragged", "aligned"])
def test_greedy_matches_reference_generate(n, layout):
    ref, lm = pair("gpt2", torch.float64)
    ks = [random.Random(n).randint(0, 6) for _ in range(n)]
    ex, batch = prompts(ks, seed=n, layout=layout)
    out = lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8)
    for b, e in enumerate(ex):
        expected = ref.generate(torch.tensor([e["input_ids"]]), max_new_tokens=8).tolist()
        got = out.tokens[b, : out.lengths[b]].tolist()
        if got and got[-1] == EOS and len(got) > 1:
            got = got[:-1]  # the reference does not emit the EOS that stops it
        assert got == expected[: len(got)] and len(got) == len(expected), (b, got, expected)
        assert int(out.n_latents[b]) == ks[b]


def test_batch_equals_one_by_one_llama():
    _, lm = pair("llama", torch.float64)
    ex, batch = prompts([3, 0, 5, 1], seed=11)
    out = lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    for b, e in enumerate(ex):
        one = lm.generate(torch.tensor([e["input_ids"]]), max_new_tokens=6)
        assert out.tokens[b, : out.lengths[b]].tolist() == one.tokens[0, : one.lengths[0]].tolist()


def test_sampling_reproducible_with_generator():
    _, lm = pair("gpt2", torch.float32)
    _, batch = prompts([2, 3, 1], seed=13)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, do_sample=True,
                           temperature=1.3, top_k=20, top_p=0.9, generator=g).tokens

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def plain_loop(lm, ids, fb, max_new_tokens, stop=None, max_latents=None):
    """No-cache reference loop for one prompt (list of ids): every step re-runs the whole model over the
    embeddings so far; latent inputs come from `fb`; then greedy decoding until EOS."""
    model = lm.model
    E = model.embed_tokens.weight
    k = ids.count(LAT)
    s = ids.index(LAT) if k else len(ids)
    budget = k if max_latents is None else max_latents
    embeds = [E[t] for t in ids[:s]]

    def last_hidden(embeds):
        x = torch.stack(embeds)[None]
        cache = model.new_cache(1, len(embeds))
        h = model.forward_embeds(x, cache)
        normed = model.final_norm(h[0, -1])
        return normed, lm._logits(normed[None])[0]

    n_lat, low = 0, 0
    if k:
        while n_lat < budget:
            normed, logits = last_hidden(embeds)
            if fb.sequential:
                tok = logits.argmax()[None] if fb.needs_token else None
                vec = fb(normed[None], logits[None] if fb.needs_logits else None, tok, E)[0]
            else:
                vec = E[LAT]
            embeds.append(vec.to(E.dtype))
            n_lat += 1
            normed, logits = last_hidden(embeds)
            if stop == "eot" and logits.argmax() == EOT:
                break
            if stop == "entropy":
                ent = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum()
                low = low + 1 if ent < 0.5 else 0
                if low >= 2:
                    break
        embeds += [E[t] for t in ids[s + k:]]
    else:
        embeds = [E[t] for t in ids]
    tokens = []
    for _ in range(max_new_tokens):
        _, logits = last_hidden(embeds)
        t = int(logits.argmax())
        tokens.append(t)
        if t == EOS:
            break
        embeds.append(E[t])
    return tokens, n_lat


@pytest.mark.parametrize("mode", ["hidden", "projected", "soft", "mixture", "pause"])
def test_feedback_modes_match_plain_loop(mode):
    _, lm = pair("gpt2", torch.float64)
    torch.manual_seed(0)
    fb = {"projected": lambda: ProjectedFeedback(32).double(), "soft": lambda: SoftFeedback(0.7, top_k=10),
          "mixture": lambda: MixtureFeedback(1.0, top_p=0.8)}.get(mode, lambda: resolve_feedback(mode, 32))()
    ex, batch = prompts([3, 1, 4], seed=17)
    out = lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, feedback=fb)
    with torch.no_grad():
        for b, e in enumerate(ex):
            tokens, _ = plain_loop(lm, e["input_ids"], fb, 6)
            assert out.tokens[b, : out.lengths[b]].tolist() == tokens, (mode, b)


@pytest.mark.parametrize("stop", ["eot", "entropy"])
def test_stop_rules_match_plain_loop(stop):
    _, lm = pair("gpt2", torch.float64)
    # Make <eot> likely at latent steps so the rule fires at different steps per example.
    with torch.no_grad():
        lm.model.embed_tokens.weight[EOT] *= 4.0
    ex, batch = prompts([6, 6, 6, 6], seed=19)
    rule = "eot" if stop == "eot" else ("entropy", 0.5, 2)
    out = lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, stop=rule)
    fb = resolve_feedback("hidden", 32)
    with torch.no_grad():
        for b, e in enumerate(ex):
            tokens, n_lat = plain_loop(lm, e["input_ids"], fb, 5, stop=stop)
            assert int(out.n_latents[b]) == n_lat
            assert out.tokens[b, : out.lengths[b]].tolist() == tokens


def test_return_latents_readout():
    _, lm = pair("gpt2", torch.float64)
    _, batch = prompts([2, 4], seed=23)
    out = lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=3, return_latents=True)
    assert out.latents.shape == (2, 4, 32)
    assert out.latent_topk_ids.shape == (2, 4, 5)
    # Example 0 thinks twice: its later slots are empty.
    assert out.latent_topk_probs[0, 2:].abs().sum() == 0 and (out.latent_topk_probs[0, :2] > 0).all()
    expected = lm._logits(out.latents[1, 0][None]).softmax(-1).topk(5).indices[0]
    assert out.latent_topk_ids[1, 0].tolist() == expected.tolist()


@pytest.mark.parametrize("mode,schedule", [("hidden", "sequential"), ("soft", "sequential"), ("soft", "jacobi")])
def test_return_latents_states_are_what_each_thought_was_made_from(mode, schedule):
    """latents: the fed vectors; latent_states: the normed last hidden state before each thought (a plain loop's),
    whose LM head read-out is latent_topk. For "soft" the fed vector is an embedding mix that the LM head does
    not read; for "hidden" state and fed vector are one. Jacobi with as many iterations as thoughts gives the
    sequential states."""
    _, lm = pair("gpt2", torch.float64)
    fb = resolve_feedback(mode, 32)
    ex, batch = prompts([2, 4], seed=23)
    kw = dict(latent_schedule="jacobi", jacobi_iters=4) if schedule == "jacobi" else {}
    out = lm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=2, feedback=fb,
                      return_latents=True, **kw)
    model, E = lm.model, lm.model.embed_tokens.weight
    with torch.no_grad():
        for b, e in enumerate(ex):
            ids = e["input_ids"]
            embeds = [E[t] for t in ids[:ids.index(LAT)]]
            for i in range(ids.count(LAT)):
                h = model.forward_embeds(torch.stack(embeds)[None], model.new_cache(1, len(embeds)))
                normed = model.final_norm(h[0, -1])
                logits = lm._logits(normed[None])
                vec = fb(normed[None], logits, None, E)[0]
                torch.testing.assert_close(out.latents[b, i], vec, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(out.latent_states[b, i], normed, rtol=1e-9, atol=1e-9)
                want = logits.softmax(-1).topk(5)
                assert out.latent_topk_ids[b, i].tolist() == want.indices[0].tolist()
                torch.testing.assert_close(out.latent_topk_probs[b, i], want.values[0], rtol=1e-9, atol=1e-12)
                embeds.append(vec)
    if mode == "hidden":
        assert torch.equal(out.latents, out.latent_states)


def test_generate_bad_input():
    _, lm = pair("gpt2", torch.float32)
    _, batch = prompts([2], seed=29)
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="needs <bot> <latent>"):
        lm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, stop="eot")
    with pytest.raises(ValueError, match="must read question <bot> <latent>"):
        lm.generate(torch.tensor([[5, 6, LAT, LAT, 7]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceed the model's 128"):
        lm.generate(ids, max_new_tokens=500)
    with pytest.raises(ValueError, match="feedback must be one of"):
        lm.generate(ids, max_new_tokens=2, feedback="telepathy")
    with pytest.raises(ValueError, match="stop must be"):
        lm.generate(ids, max_new_tokens=2, stop="whenever")
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        lm.generate(ids, max_new_tokens=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_graph_generate_equals_eager():
    _, lm = pair("gpt2", torch.float32)
    lm = lm.cuda()
    _, batch = prompts([3, 1, 5, 0], seed=31)
    ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
    eager = lm.generate(ids, mask, max_new_tokens=8, use_cuda_graph=False)
    graphed = lm.generate(ids, mask, max_new_tokens=8, use_cuda_graph=True)
    assert torch.equal(eager.tokens, graphed.tokens)


@pytest.mark.parametrize("noise", ["gumbel", "dirichlet"])
def test_soft_feedback_noise_is_seeded(noise):
    _, lm = pair("gpt2", torch.float32)
    fb = SoftFeedback(1.0, top_k=20, noise=noise, noise_scale=2.0)
    logits = torch.randn(3, V)
    E = lm.model.embed_tokens.weight.detach()

    def draw(seed):
        return fb(torch.zeros(3, 32), logits, None, E, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.allclose(draw(1), draw(2))
    clean = SoftFeedback(1.0, top_k=20)(torch.zeros(3, 32), logits, None, E)
    assert not torch.allclose(draw(1), clean)
    # A noisy mixture is still a convex combination of embedding rows: inside their bounding box.
    assert (draw(3) <= E.max(0).values + 1e-5).all() and (draw(3) >= E.min(0).values - 1e-5).all()
