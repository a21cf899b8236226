"""The Jacobi latent schedule (latent_schedule="jacobi", coconut_kernels.latent_jacobi).

With T >= n iterations it equals the sequential schedule (loss, every gradient, greedy tokens), aligned and ragged,
GPT-2 and Llama. With T < n it equals a plain Jacobi loop written here: every iteration re-runs the whole
`transformers` model over the prompt so far (no cache). Gradients through all iterations pass gradcheck in fp64.
"""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import CoconutError, LatentLM
from coconut_kernels.data import AlignedCollator, RaggedCollator
from coconut_kernels.feedback import ProjectedFeedback, resolve_feedback
from coconut_kernels.models import from_pretrained
from tests.test_latent import EOS, LAT, PAD, examples, grads_by_our_name, hf_gpt2, pair

pytest.importorskip("transformers")


def counts_for(n: int) -> list[int]:
    """Different thought counts per example (one without thoughts), the largest n."""
    return [n, max(n - 2, 1), 0, n]


def loss_and_grads(lm, batch, **schedule):
    lm.zero_grad()
    out = lm(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("position_ids"), **schedule)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in lm.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["aligned", "ragged"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_jacobi_with_enough_iterations_equals_sequential(family, layout, n):
    """T = n (GPT-2) and T = n + 2 (Llama: iterations past n change nothing) in fp32: loss within 1e-5, every
    gradient within 1e-4, and generate's greedy tokens identical."""
    _, lm = pair(family, torch.float32)
    collate = (AlignedCollator if layout == "aligned" else RaggedCollator)(PAD, LAT)
    batch = collate(examples(counts_for(n), seed=n))
    T = n if family == "gpt2" else n + 2
    loss, grads = loss_and_grads(lm, batch)
    jloss, jgrads = loss_and_grads(lm, batch, latent_schedule="jacobi", jacobi_iters=T)
    torch.testing.assert_close(jloss, loss, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(jgrads[name], g, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    prompts = collate(examples(counts_for(n), seed=n, with_labels=False))
    args = (prompts["input_ids"], prompts["attention_mask"])
    seq = lm.generate(*args, max_new_tokens=6, return_latents=True)
    jac = lm.generate(*args, max_new_tokens=6, latent_schedule="jacobi", jacobi_iters=T, return_latents=True)
    assert torch.equal(jac.tokens, seq.tokens) and torch.equal(jac.lengths, seq.lengths)
    assert torch.equal(jac.n_latents, seq.n_latents)
    torch.testing.assert_close(jac.latents, seq.latents, rtol=1e-4, atol=1e-5)
    assert torch.equal(jac.latent_topk_ids[jac.latent_topk_probs > 0], seq.latent_topk_ids[seq.latent_topk_probs > 0])


def plain_jacobi(hf, fb, ids: list[int], T: int) -> list[torch.Tensor]:
    """The input embeddings of one prompt after T Jacobi iterations, the plain way: each iteration re-runs the
    whole model over prefix + thoughts (no cache); thought i is fed fb(the previous iteration's normed hidden
    state one row up), thought 0 fb(the prefix's last), and the first iteration's other thoughts the <latent>
    embedding."""
    E = hf.get_input_embeddings().weight
    k = ids.count(LAT)
    s = ids.index(LAT) if k else len(ids)
    prefix = [E[t] for t in ids[:s]]

    def normed_rows(embeds):
        return hf.base_model(inputs_embeds=torch.stack(embeds)[None]).last_hidden_state[0]

    def feed(normed):
        logits = hf.lm_head(normed[None])
        token = logits.argmax(-1) if fb.needs_token else None
        return fb(normed[None], logits if fb.needs_logits else None, token, E)[0]

    if not k:
        return [E[t] for t in ids]
    first = feed(normed_rows(prefix)[-1])
    thoughts = [first] + [E[LAT]] * (k - 1)
    for _ in range(T - 1):
        h = normed_rows(prefix + thoughts)
        thoughts = [first] + [feed(h[s + i - 1]) for i in range(1, k)]
    return prefix + thoughts + [E[t] for t in ids[s + k:]]


def plain_jacobi_loss(hf, fb, ex, T: int) -> torch.Tensor:
    total, n = 0.0, 0
    for e in ex:
        logits = hf(inputs_embeds=torch.stack(plain_jacobi(hf, fb, e["input_ids"], T))[None]).logits[0]
        target = torch.tensor(e["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum")
        n += int((target != -100).sum())
    return total / n


def plain_jacobi_generate(hf, fb, ids: list[int], T: int, max_new_tokens: int) -> list[int]:
    E = hf.get_input_embeddings().weight
    embeds, tokens = plain_jacobi(hf, fb, ids, T), []
    for _ in range(max_new_tokens):
        t = int(hf(inputs_embeds=torch.stack(embeds)[None]).logits[0, -1].argmax())
        tokens.append(t)
        if t == EOS:
            break
        embeds.append(E[t])
    return tokens


@pytest.mark.parametrize("family,mode,layout,T", [
    ("gpt2", "hidden", "ragged", 1), ("gpt2", "hidden", "aligned", 2), ("gpt2", "projected", "ragged", 2),
    ("llama", "hidden", "ragged", 3),
])
def test_fewer_iterations_match_a_plain_jacobi_loop(family, mode, layout, T):
    """T < n (counts 5, 3, 0, 5): loss, model and feedback gradients, and greedy tokens equal the plain loop's
    in fp64 (Llama: transformers' RMSNorm computes in fp32)."""
    ref, lm = pair(family, torch.float64)
    hf = ref.base_causallm
    torch.manual_seed(0)
    fb = ProjectedFeedback(32).double() if mode == "projected" else resolve_feedback(mode, 32)
    lm = LatentLM(lm.model, lm.latent_token_id, lm.start_latent_id, lm.end_latent_id, lm.eos_token_id, feedback=fb)
    tol = dict(rtol=1e-9, atol=1e-11) if family == "gpt2" else dict(rtol=1e-5, atol=1e-7)
    collate = (AlignedCollator if layout == "aligned" else RaggedCollator)(PAD, LAT)
    ex = examples([5, 3, 0, 5], seed=11)
    batch = collate(ex)
    loss, grads = loss_and_grads(lm, batch, latent_schedule="jacobi", jacobi_iters=T)
    fb_grads = [p.grad.clone() for p in fb.parameters()]
    for p in fb.parameters():
        p.grad = None
    ref_loss = plain_jacobi_loss(hf, fb, ex, T)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, **tol)
    expected = grads_by_our_name(ref, lm)
    for name, p in lm.model.named_parameters():
        torch.testing.assert_close(grads[f"model.{name}"], expected[name], **tol, msg=lambda m: f"{name}: {m}")
    for got, p in zip(fb_grads, fb.parameters()):
        torch.testing.assert_close(got, p.grad, **tol)
    prompts_ex = examples([5, 3, 0, 5], seed=11, with_labels=False)
    prompts = collate(prompts_ex)
    out = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=4, latent_schedule="jacobi",
                      jacobi_iters=T)
    with torch.no_grad():
        for b, e in enumerate(prompts_ex):
            assert out.tokens[b, :out.lengths[b]].tolist() == plain_jacobi_generate(hf, fb, e["input_ids"], T, 4)


def test_gradcheck_through_every_iteration():
    """fp64 gradcheck of the Jacobi loss (T = 2 < n = 3) w.r.t. the final norm's weight and the first layer's
    attention bias: the gradient reaches the K/V and the feeds of both iterations."""
    hf = hf_gpt2(torch.float64)
    lm = LatentLM(from_pretrained(hf), LAT, LAT - 1, LAT + 1, EOS)
    batch = RaggedCollator(PAD, LAT)(examples([3, 1], seed=5))
    names = ("model.final_norm.weight", "model.layers.0.ln_1.bias")
    params = tuple(dict(lm.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def loss(*values):
        out = torch.func.functional_call(lm, dict(zip(names, values)), (batch["input_ids"], batch["attention_mask"],
                                         batch["labels"]), {"latent_schedule": "jacobi", "jacobi_iters": 2})
        return out.loss

    assert torch.autograd.gradcheck(loss, params, fast_mode=True)


def test_pause_feedback_has_nothing_to_iterate():
    _, lm = pair("gpt2", torch.float64)
    lm = LatentLM(lm.model, LAT, lm.start_latent_id, lm.end_latent_id, EOS, feedback="pause")
    batch = RaggedCollator(PAD, LAT)(examples([3, 0, 2], seed=2))
    with torch.no_grad():
        seq = lm(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        jac = lm(batch["input_ids"], batch["attention_mask"], batch["labels"], latent_schedule="jacobi",
                 jacobi_iters=1).loss
    assert torch.equal(seq, jac)


@pytest.mark.parametrize("kwargs,match", [
    ({"latent_schedule": "parallel"}, "latent_schedule must be one of"),
    ({"latent_schedule": "jacobi"}, "jacobi_iters must be an int >= 1"),
    ({"latent_schedule": "jacobi", "jacobi_iters": 0}, r"jacobi_iters must be an int in \[1"),
    ({"latent_schedule": "jacobi", "jacobi_iters": 2.0}, "jacobi_iters must be an int"),
    ({"latent_schedule": "jacobi", "jacobi_iters": 2, "stop": "eot"}, "needs the prompt's latent count"),
    ({"latent_schedule": "jacobi", "jacobi_iters": 2, "stop": ("entropy", 0.5, 2)}, "needs the prompt's latent"),
])
def test_bad_schedule_arguments(kwargs, match):
    _, lm = pair("gpt2", torch.float32)
    batch = RaggedCollator(PAD, LAT)(examples([2, 1], seed=3))
    prompts = RaggedCollator(PAD, LAT)(examples([2, 1], seed=3, with_labels=False))
    if "stop" not in kwargs:
        with pytest.raises(CoconutError, match=match):
            lm(batch["input_ids"], batch["attention_mask"], batch["labels"], **kwargs)
    with pytest.raises(CoconutError, match=match):
        lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=2, **kwargs)
