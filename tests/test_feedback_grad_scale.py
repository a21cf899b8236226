"""LatentLM.forward(feedback_grad_scale=s): the forward is unchanged and the gradient from each fed vector into
the (pre-norm) hidden state it was made from is multiplied by s, checked against a plain loop that recomputes
the whole prompt for every thought (no cache) and scales that gradient with a hook of its own."""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import CoconutError, LatentLM
from coconut_kernels.data import AlignedCollator, RaggedCollator
from coconut_kernels.feedback import resolve_feedback
from coconut_kernels.training import load_config
from coconut_kernels.errors import ConfigError
from tests.test_latent import EOS, LAT, PAD, examples, grads_by_our_name, pair
from tests.test_latent_jacobi import loss_and_grads


def _scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    """x in forward, s times its gradient in backward (written apart from the library's autograd Function)."""
    return x * s + x.detach() * (1 - s)


def plain_sequential_loss(hf, fb, ex, s: float) -> torch.Tensor:
    """The official algorithm, one example at a time, with every thought's hidden state scaled by _scaled
    before the final norm (captured from ln_f's input) and the feedback."""
    E = hf.get_input_embeddings().weight
    ln_f = hf.transformer.ln_f
    total, n = 0.0, 0
    for e in ex:
        ids = e["input_ids"]
        k = ids.count(LAT)
        embeds = [E[t] for t in ids]
        for i in range(k):
            pos = ids.index(LAT) + i
            got = {}
            hook = ln_f.register_forward_hook(lambda m, args, out: got.__setitem__("h", args[0]))
            hf.transformer(inputs_embeds=torch.stack(embeds[:pos])[None])
            hook.remove()
            normed = ln_f(_scaled(got["h"][0, -1], s))[None]
            logits = hf.lm_head(normed) if fb.needs_logits else None
            embeds[pos] = fb(normed, logits, None, E)[0]
        logits = hf(inputs_embeds=torch.stack(embeds)[None]).logits[0]
        target = torch.tensor(e["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum")
        n += int((target != -100).sum())
    return total / n


@pytest.mark.parametrize("mode,layout,s", [("hidden", "ragged", 0.3), ("hidden", "aligned", 0.0),
                                           ("soft", "ragged", 0.5)])
def test_scaled_gradient_matches_a_plain_loop(mode, layout, s):
    """fp64 GPT-2, thought counts 3, 1, 0, 3: loss and every gradient equal the plain loop's; the loss equals
    the unscaled one and the gradients differ from it."""
    ref, lm = pair("gpt2", torch.float64)
    hf = ref.base_causallm
    fb = resolve_feedback(mode, 32)
    lm = LatentLM(lm.model, lm.latent_token_id, lm.start_latent_id, lm.end_latent_id, lm.eos_token_id, feedback=fb)
    ex = examples([3, 1, 0, 3], seed=7)
    batch = (AlignedCollator if layout == "aligned" else RaggedCollator)(PAD, LAT)(ex)
    loss, grads = loss_and_grads(lm, batch, feedback_grad_scale=s)
    full_loss, full_grads = loss_and_grads(lm, batch)
    ref_loss = plain_sequential_loss(hf, fb, ex, s)
    ref_loss.backward()
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert torch.equal(loss, full_loss)
    expected = grads_by_our_name(ref, lm)
    for name, _ in lm.model.named_parameters():
        torch.testing.assert_close(grads[f"model.{name}"], expected[name], **tol, msg=lambda m: f"{name}: {m}")
    assert any(not torch.allclose(grads[name], g) for name, g in full_grads.items())


@pytest.mark.parametrize("mode", ["hidden", "soft"])
def test_jacobi_with_enough_iterations_scales_alike(mode):
    """The Jacobi schedule with T = n applies the same scale: its gradients equal the sequential schedule's."""
    _, lm = pair("gpt2", torch.float64)
    lm = LatentLM(lm.model, LAT, LAT - 1, LAT + 1, EOS, feedback=mode)
    batch = RaggedCollator(PAD, LAT)(examples([3, 2, 0, 3], seed=3))
    loss, grads = loss_and_grads(lm, batch, feedback_grad_scale=0.25)
    jloss, jgrads = loss_and_grads(lm, batch, latent_schedule="jacobi", jacobi_iters=3, feedback_grad_scale=0.25)
    torch.testing.assert_close(jloss, loss, rtol=1e-10, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(jgrads[name], g, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_bad_scale_is_rejected(bad):
    _, lm = pair("gpt2", torch.float32)
    batch = RaggedCollator(PAD, LAT)(examples([2], seed=1))
    with pytest.raises(CoconutError, match="feedback_grad_scale"):
        lm(batch["input_ids"], batch["attention_mask"], batch["labels"], feedback_grad_scale=bad)
    with pytest.raises(ConfigError, match="feedback_grad_scale"):
        load_config(None, {"model": {"family": "gpt2", "n_layer": 1, "n_head": 2, "d_model": 16},
                           "feedback_grad_scale": bad})
