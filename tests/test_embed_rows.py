"""`latent_steps.EmbedRows`: the passes' input rows gathered from the batch's embeddings with one gradient buffer
(each pass's backward adds its own rows; the sink hands the sum to the embeddings once). Its gradient is the
plain gather's, bitwise where every position is read by one pass (as in a training step), to rounding where
passes share positions; passes whose rows reach no loss, no grad mode, a refused double backward, no step kept
alive; and a LatentLM training step's gradients with it equal the plain gathers'."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from coconut_kernels import LatentLM, latent_steps
from coconut_kernels.data import RaggedCollator
from coconut_kernels.models import GPT2, GPT2Config


def _gathers(src, cols, use_rows: bool):
    rows = latent_steps.EmbedRows(src) if use_rows else None
    d = src.shape[-1]
    out = []
    for col in cols:
        if use_rows:
            out.append(rows.gather(col))
        else:
            out.append(src.gather(1, col[:, :, None].expand(*col.shape, d)))
    return out


def _grad(base, cols, weights, use_rows):
    leaf = base.clone().requires_grad_(True)
    xs = _gathers(leaf * 1.5, cols, use_rows)  # a non-leaf, as the embedding lookup gives
    loss = sum((x * w).sum() for x, w in zip(xs, weights) if w is not None)
    loss.backward()
    return leaf.grad


def test_gradient_equals_the_plain_gather():
    g = torch.Generator().manual_seed(0)
    B, T, d = 3, 11, 8
    base = torch.randn(B, T, d, generator=g)
    # disjoint passes over each row's positions (a training step's layout), the last padded by clamped columns
    cols = [torch.arange(0, 6).expand(B, 6), torch.full((B, 1), 6), torch.full((B, 1), 7),
            torch.tensor([8, 9, 10, 10]).expand(B, 4)]
    weights = [torch.randn(B, c.shape[1], d, generator=g) for c in cols]
    weights[3][:, 3] = 0  # the clamped pad column carries no gradient
    assert torch.equal(_grad(base, cols, weights, True), _grad(base, cols, weights, False))
    # overlapping reads: the same sums, added in another order
    cols = [torch.randint(0, T, (B, 5), generator=g) for _ in range(4)]
    weights = [torch.randn(B, 5, d, generator=g) for _ in cols]
    torch.testing.assert_close(_grad(base, cols, weights, True), _grad(base, cols, weights, False),
                               rtol=1e-6, atol=1e-6)


def test_passes_that_reach_no_loss_and_no_grad_mode():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 6, 4, generator=g)
    cols = [torch.arange(0, 3).expand(2, 3), torch.arange(3, 6).expand(2, 3)]
    for used in ([True, False], [False, True]):
        weights = [torch.randn(2, 3, 4, generator=g) if u else None for u in used]
        assert torch.equal(_grad(base, cols, weights, True), _grad(base, cols, weights, False))
    with torch.no_grad():
        rows = latent_steps.EmbedRows(base.clone().requires_grad_(True))
        x = rows.gather(cols[1])
    assert not x.requires_grad and torch.equal(x, base[:, 3:6])


def test_double_backward_is_refused_and_no_step_stays_alive():
    refs = []
    for step in range(3):
        leaf = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
        rows = latent_steps.EmbedRows(leaf * 2)
        x = torch.cat([rows.gather(torch.arange(0, 2).expand(2, 2)), rows.gather(torch.arange(2, 5).expand(2, 3))], 1)
        loss = x.pow(2).sum()
        if step == 1:
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(loss, [leaf], create_graph=True)
        else:
            loss.backward()
            torch.testing.assert_close(leaf.grad, 8 * leaf.detach())
        refs += [weakref.ref(rows), weakref.ref(rows._shared)]
        del rows, x, loss, leaf
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_backward_that_raised_half_way_leaves_nothing_behind():
    """A backward that stops after some gathers added their rows (here a hook raising) must not leave a partial
    sum for the next backward over the retained graph."""
    leaf = torch.randn(2, 4, 3, requires_grad=True)
    rows = latent_steps.EmbedRows(leaf * 1)
    late = rows.gather(torch.tensor([[2, 3], [2, 3]])) * 3
    early = rows.gather(torch.tensor([[0, 1], [0, 1]])) * 2
    state = {"raise": True}

    def hook(grad):
        if state["raise"]:
            state["raise"] = False
            raise RuntimeError("stopped half way")

    late.register_hook(hook)
    loss = early.sum() + late.sum()
    with pytest.raises(RuntimeError, match="stopped half way"):
        loss.backward(retain_graph=True)
    leaf.grad = None
    loss.backward()
    expect = torch.zeros_like(leaf)
    expect[:, :2], expect[:, 2:] = 2, 3
    assert torch.equal(leaf.grad, expect)


V = 61
EOS, BOT, LAT, EOT = V - 4, V - 3, V - 2, V - 1


@pytest.mark.parametrize("jacobi", [None, 2])
def test_a_training_step_gets_the_plain_gathers_gradients(monkeypatch, jacobi):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_position=64))
    lm = LatentLM(model, LAT, BOT, EOT, EOS)
    ex = [{"input_ids": [3, 4, 5, 6, BOT] + [LAT] * k + [EOT, 7, 8, 9][:2 + k % 2],
           "labels": [-100] * (5 + k) + [EOT, 7, 8, 9][:2 + k % 2]} for k in (2, 0, 3)]
    batch = RaggedCollator(EOS, LAT)(ex)

    def grads():
        model.zero_grad()
        kw = {} if jacobi is None else dict(latent_schedule="jacobi", jacobi_iters=jacobi)
        lm(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], **kw).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = grads()

    class Plain(latent_steps.EmbedRows):
        def __init__(self, embeds):
            with torch.no_grad():  # no sink: gather() takes the plain path
                super().__init__(embeds)

    monkeypatch.setattr(latent_steps, "EmbedRows", Plain)
    monkeypatch.setattr("coconut_kernels.latent.EmbedRows", Plain)
    plain = grads()
    assert fast.keys() == plain.keys()
    for name in fast:
        assert torch.equal(fast[name], plain[name]), name
