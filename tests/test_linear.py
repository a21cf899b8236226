"""models.linear inside batched_weight_grads(): Linear's weight and bias gradients, taken once per layer over every
pass's rows, equal nn.Linear's per-pass gradients summed by autograd; the fused mlp() and attention() nodes give
the values and gradients of the plain compositions."""
import gc

import pytest
import torch
from torch import nn

from coconut_kernels.models import linear as linear_mod
from coconut_kernels.models.linear import Linear, batched_weight_grads


def make_layers(bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Linear(16, 24, bias=bias, dtype=dtype), Linear(24, 16, bias=bias, dtype=dtype)


def passes(layers, x0, rows_per_pass):
    """A chain of passes like a COCONUT step: a long first pass, then short ones each fed the previous
    pass's last output row."""
    up, down = layers
    outs, prev = [], None
    for p, n in enumerate(rows_per_pass):
        x = x0[:, :n] if prev is None else torch.cat([prev, x0[:, p:p + n - 1]], 1)
        h = down(torch.tanh(up(x)))
        outs.append(h)
        prev = h[:, -1:]
    return sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in outs)


def grads(layers, x0, rows_per_pass, batched):
    for m in layers:
        m.zero_grad(set_to_none=True)
    x0 = x0.detach().requires_grad_()
    if batched:
        with batched_weight_grads():
            loss = passes(layers, x0, rows_per_pass)
    else:
        loss = passes(layers, x0, rows_per_pass)
    loss.backward()  # after the context has exited
    out = {"loss": loss.detach(), "x0": x0.grad}
    for i, m in enumerate(layers):
        for name, p in m.named_parameters():
            out[f"{i}.{name}"] = p.grad
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows_per_pass", [[300, 1, 1, 1, 1, 1, 1, 5], [3, 1, 2], [700, 1, 600]],
                         ids=["prefix-latents-suffix", "all-small", "two-own-products"])
def test_batched_grads_match_per_pass_grads(bias, rows_per_pass):
    layers = make_layers(bias)
    x0 = torch.randn(4, max(rows_per_pass) + len(rows_per_pass), 16, dtype=torch.float64)
    ref = grads(layers, x0, rows_per_pass, batched=False)
    got = grads(layers, x0, rows_per_pass, batched=True)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_gradients_accumulate_over_backwards_and_rows_are_released():
    layers = make_layers(True)
    x0 = torch.randn(2, 20, 16, dtype=torch.float64)
    ref = grads(layers, x0, [8, 1, 1, 3], batched=False)
    for m in layers:
        m.zero_grad(set_to_none=True)
    with batched_weight_grads():
        loss = passes(layers, x0, [8, 1, 1, 3])
    loss.backward(retain_graph=True)
    loss.backward()  # a second backward through the same graph adds the same gradients again
    torch.testing.assert_close(layers[0].weight.grad, 2 * ref["0.weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layers[1].bias.grad, 2 * ref["1.bias"], rtol=1e-12, atol=1e-12)


def test_plain_linear_outside_the_context_and_for_frozen_or_no_grad():
    up, down = make_layers(True)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    with batched_weight_grads():
        with torch.no_grad():
            assert up(x).grad_fn is None
        up.weight.requires_grad_(False)
        y = up(x)
        assert type(y.grad_fn).__name__ != "_DeferredLinearBackward"
        up.weight.requires_grad_(True)
        assert type(up(x).grad_fn).__name__ == "_DeferredLinearBackward"
    assert type(up(x).grad_fn).__name__ != "_DeferredLinearBackward"
    # the plain path of a frozen weight still gives the input and bias gradients
    up.weight.requires_grad_(False)
    with batched_weight_grads():
        up(x).sum().backward()
    assert up.weight.grad is None and up.bias.grad is not None
    torch.testing.assert_close(x.grad, up.weight.sum(0).expand_as(x))


def test_bf16_autocast_matches_nn_linear_under_autocast():
    torch.manual_seed(3)
    ours = Linear(32, 48)
    ref = nn.Linear(32, 48)
    ref.load_state_dict(ours.state_dict())
    xs = [torch.randn(4, n, 32) for n in (40, 1, 1, 7)]

    def run(layer, batched):
        layer.zero_grad(set_to_none=True)
        xg = [x.clone().requires_grad_() for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with batched_weight_grads() if batched else torch.enable_grad():
                ys = [layer(x) for x in xg]
        assert all(y.dtype == torch.bfloat16 for y in ys)
        sum((y.float() * y.float()).sum() for y in ys).backward()
        return [y.float() for y in ys], layer.weight.grad, layer.bias.grad, [x.grad for x in xg]

    y1, w1, b1, x1 = run(ours, True)
    y2, w2, b2, x2 = run(ref, False)
    assert w1.dtype == torch.float32 and b1.dtype == torch.float32
    for a, b in zip(y1, y2):
        torch.testing.assert_close(a, b)
    # the same bf16 products, summed in a different order: within bf16 rounding of the sum
    torch.testing.assert_close(w1, w2, rtol=2e-2, atol=2e-2 * w2.abs().max().item())
    torch.testing.assert_close(b1, b2, rtol=2e-2, atol=2e-2 * b2.abs().max().item())
    for a, b in zip(x1, x2):
        torch.testing.assert_close(a, b)


def _pair(bias=True, seed=5):
    torch.manual_seed(seed)
    ours = Linear(12, 10, bias=bias, dtype=torch.float64)
    ref = nn.Linear(12, 10, bias=bias, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_no_entry_outlives_its_step():
    """The per-layer state must not be kept alive by a reference cycle through autograd's nodes (with a
    bias, and with the autocast casts)."""
    ours, _ = _pair(bias=True)
    for autocast in (False, True):
        for _ in range(3):
            x1, x2 = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 1, 12, dtype=torch.float64)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with batched_weight_grads():
                    y = ours(x1).float().sum() + ours(x2).float().sum()
            y.backward()
            del y
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is linear_mod._Entry]


def test_backward_that_skips_the_weights_keeps_nothing():
    ours, ref = _pair()
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    grads = []
    for layer in (ours, ref):
        with batched_weight_grads() if layer is ours else torch.enable_grad():
            y = (layer(x) ** 2).sum() + layer(x[:, :1]).sum()
        torch.autograd.grad(y, [x], retain_graph=True)  # does not reach the weights
        y.backward()
        grads.append((layer.weight.grad, layer.bias.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


def test_double_backward_gradient_penalty():
    ours, ref = _pair()
    x0 = torch.randn(2, 5, 12, dtype=torch.float64)
    grads = []
    for layer in (ours, ref):
        x = x0.clone().requires_grad_()
        with batched_weight_grads() if layer is ours else torch.enable_grad():
            y = torch.tanh(layer(x)).sum() + torch.tanh(layer(x[:, :1])).pow(2).sum()
        (gx,) = torch.autograd.grad(y, [x], create_graph=True)
        (y + gx.pow(2).sum()).backward()
        grads.append((layer.weight.grad, layer.bias.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)


def test_double_backward_under_autocast_raises():
    ours, _ = _pair()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with batched_weight_grads():
            y = ours(x).float().pow(2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, [x], create_graph=True)


# ---- mlp(): the feed-forward as one node ----------------------------------------------------------------------


def _mlp_layers(act, bias, seed=7):
    torch.manual_seed(seed)
    d_ff = 24
    fc = Linear(16, 2 * d_ff if act == "swiglu" else d_ff, bias=bias, dtype=torch.float64)
    proj = Linear(d_ff, 16, bias=bias, dtype=torch.float64)
    return fc, proj


def _mlp_chain(fc, proj, act, x0, rows_per_pass, fused):
    """A chain of passes like a COCONUT step, each pass's input the previous pass's last output row: mlp() inside
    batched_weight_grads() (fused) or the plain composition of nn.Linear and the activation."""
    plain_fc, plain_proj = (nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.weight.dtype)
                            for m in (fc, proj))
    plain_fc.load_state_dict(fc.state_dict())
    plain_proj.load_state_dict(proj.state_dict())
    mods = (fc, proj) if fused else (plain_fc, plain_proj)
    outs, prev = [], None
    with batched_weight_grads() if fused else torch.enable_grad():
        for p, n in enumerate(rows_per_pass):
            x = x0[:, :n] if prev is None else torch.cat([prev, x0[:, p:p + n - 1]], 1)
            if fused:
                h = linear_mod.mlp(x, fc, proj, act)
                assert type(h.grad_fn).__name__ == "_DeferredMLPBackward"  # the fused node, not the fallback
            else:
                h = plain_proj(linear_mod.ACTIVATIONS[act][0](plain_fc(x)))
            outs.append(h)
            prev = torch.tanh(h[:, -1:])
    loss = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in outs)
    return loss, mods


@pytest.mark.parametrize("act", sorted(linear_mod.ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gradients_match_the_plain_composition(act, bias):
    fc, proj = _mlp_layers(act, bias)
    x0 = torch.randn(3, 40, 16, dtype=torch.float64)
    got = {}
    for fused in (True, False):
        x = x0.clone().requires_grad_()
        loss, mods = _mlp_chain(fc, proj, act, x, [30, 1, 1, 1, 4], fused)
        loss.backward()
        got[fused] = [loss.detach(), x.grad] + [p.grad for m in mods for p in m.parameters()]
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu"])
def test_mlp_double_backward_gradient_penalty(act):
    fc, proj = _mlp_layers(act, True)
    x0 = torch.randn(2, 9, 16, dtype=torch.float64)
    got = {}
    for fused in (True, False):
        x = x0.clone().requires_grad_()
        loss, mods = _mlp_chain(fc, proj, act, x, [6, 1, 2], fused)
        (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
        (loss + gx.pow(2).sum()).backward()
        got[fused] = [x.grad] + [p.grad for m in mods for p in m.parameters()]
        for m in mods:
            m.zero_grad(set_to_none=True)
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mlp_plain_path_under_autocast_and_for_frozen_layers():
    fc, proj = _mlp_layers("gelu_tanh", True)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    with batched_weight_grads():
        fc.weight.requires_grad_(False)
        y = linear_mod.mlp(x, fc, proj, "gelu_tanh")
        assert type(y.grad_fn).__name__ != "_DeferredMLPBackward"
        y.sum().backward()
        assert fc.weight.grad is None and fc.bias.grad is not None and proj.weight.grad is not None
        fc.weight.requires_grad_(True)
    fc32, proj32 = fc.float(), proj.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), batched_weight_grads():
        y = linear_mod.mlp(x.detach().float(), fc32, proj32, "gelu_tanh")
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_DeferredMLPBackward"


# ---- attention(): the attention as one node --------------------------------------------------------------------


def _attention_chain(qkv, out, x0, fused, rows_per_pass, ragged):
    """Passes through one KVCache layer, each fed (through tanh) the previous pass's first output row; GQA (4 query
    heads on 2 kv heads), rotary, and (ragged) a pass whose second sequence appends fewer rows."""
    from coconut_kernels.cache import KVCache

    Hq, Hkv, D = 4, 2, 8
    B = x0.shape[0]
    cache = KVCache(1, B, sum(rows_per_pass), Hkv, D, dtype=torch.float64)
    angles = torch.arange(64, dtype=torch.float64)[:, None] * torch.linspace(0.05, 1.0, D // 2, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    outs, prev = [], None
    with batched_weight_grads() if fused else torch.enable_grad():
        for p, n in enumerate(rows_per_pass):
            x = x0[:, :n] if prev is None else torch.cat([prev, x0[:, p:p + n - 1]], 1)
            counts = torch.full((B,), n, dtype=torch.int32)
            if ragged and n > 1 and p > 0:
                counts[1] = n - 1
            y = linear_mod.attention(x, qkv, out, cache, 0, (Hq, Hkv, D), new_seqlens=counts, rotary_cos=cos,
                                     rotary_sin=sin, softmax_scale=0.3)
            assert (type(y.grad_fn).__name__ == "_DeferredAttentionBackward") == fused  # fused node vs fallback
            cache.advance(counts)
            valid = (torch.arange(n)[None, :] < counts[:, None])[:, :, None].to(y.dtype)
            outs.append(y * valid)
            prev = torch.tanh(y[:, :1])
    return sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in outs)


def _attention_layers(seed, bias=True):
    torch.manual_seed(seed)
    return (Linear(16, (4 + 2 * 2) * 8, bias=bias, dtype=torch.float64),
            Linear(4 * 8, 16, bias=bias, dtype=torch.float64))


def _assert_fused_matches_plain(layers, x0, loss_of):
    """loss_of(x, fused) run inside batched_weight_grads() (fused) and outside: the same loss, input gradient and
    parameter gradients. Returns the fused run's gradients."""
    got = {}
    for fused in (True, False):
        for m in layers:
            m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = loss_of(x, fused)
        loss.backward()
        got[fused] = [loss.detach(), x.grad] + [p.grad.clone() for m in layers for p in m.parameters()]
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    return got[True][1:]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ragged", [False, True])
def test_attention_gradients_match_the_plain_composition(bias, ragged):
    qkv, out = _attention_layers(11, bias)
    x0 = torch.randn(3, 12, 16, dtype=torch.float64)
    _assert_fused_matches_plain((qkv, out), x0,
                                lambda x, fused: _attention_chain(qkv, out, x, fused, [7, 1, 1, 3], ragged))


def test_double_backward_through_the_cached_attention_raises():
    qkv, out = _attention_layers(12)
    for fused in (True, False):
        x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
        loss = _attention_chain(qkv, out, x, fused, [4, 1], ragged=False)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, [x], create_graph=True)


def test_attention_pass_whose_output_no_loss_uses():
    """A pass whose output is not in the loss (its backward gets no output gradient) still passes on the gradient
    that later passes' attention sends to its keys and values."""
    from coconut_kernels.cache import KVCache

    qkv, out = _attention_layers(14)

    def loss_of(x, fused):
        cache = KVCache(1, 2, 6, 2, 8, dtype=torch.float64)
        with batched_weight_grads() if fused else torch.enable_grad():
            linear_mod.attention(x[:, :4], qkv, out, cache, 0, (4, 2, 8))  # output unused
            cache.advance(4)
            y = linear_mod.attention(x[:, 4:], qkv, out, cache, 0, (4, 2, 8))
        return y.pow(2).sum()

    x_grad = _assert_fused_matches_plain((qkv, out), torch.randn(2, 6, 16, dtype=torch.float64), loss_of)[0]
    assert x_grad[:, :4].abs().sum() > 0  # the keys of the unused pass did receive a gradient


def test_fused_nodes_keep_no_step_alive():
    """mlp() and attention() inside batched_weight_grads(): once a step's graph is gone, no entry and no cache
    survives (a cycle through autograd's C++ nodes would be invisible to the gc), also after a double backward
    that the attention refused."""
    import weakref

    from coconut_kernels.cache import KVCache

    torch.manual_seed(13)
    qkv, out = Linear(16, 48, dtype=torch.float64), Linear(16, 16, dtype=torch.float64)
    fc, proj = _mlp_layers("gelu_tanh", True)
    refs = []
    for step in range(3):
        cache = KVCache(1, 2, 8, 2, 8, dtype=torch.float64)
        x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
        h = x
        with batched_weight_grads():
            for n in (3, 1):
                y = linear_mod.attention(h[:, -n:], qkv, out, cache, 0, (2, 2, 8))
                cache.advance(n)
                h = linear_mod.mlp(y, fc, proj, "gelu_tanh")
        if step == 1:  # a refused double backward, after the MLP nodes kept rows that hold graphs
            with pytest.raises(RuntimeError, match="double backward"):
                torch.autograd.grad(h.pow(2).sum(), [x, proj.weight], create_graph=True)
        else:
            h.pow(2).sum().backward()
        refs.append(weakref.ref(cache))
        del cache, y, h, x
    gc.collect()
    assert all(r() is None for r in refs)
    assert not [o for o in gc.get_objects() if type(o) is linear_mod._Entry]


def test_fused_nodes_step_aside_for_hooks_and_overrides():
    """A forward hook on a projection, or a KVCache subclass overriding attend, must run: the plain path."""
    from coconut_kernels.cache import KVCache

    calls = []

    class Logged(KVCache):
        def attend(self, *args, **kwargs):
            calls.append("attend")
            return super().attend(*args, **kwargs)

    torch.manual_seed(15)
    qkv, out = Linear(16, 48, dtype=torch.float64), Linear(16, 16, dtype=torch.float64)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    with batched_weight_grads():
        y = linear_mod.attention(x, qkv, out, Logged(1, 2, 8, 2, 8, dtype=torch.float64), 0, (2, 2, 8))
        assert calls == ["attend"] and type(y.grad_fn).__name__ != "_DeferredAttentionBackward"
        handle = out.register_forward_hook(lambda m, i, o: calls.append("hook"))
        y = linear_mod.attention(x, qkv, out, KVCache(1, 2, 8, 2, 8, dtype=torch.float64), 0, (2, 2, 8))
        handle.remove()
        assert calls[-1] == "hook" and type(y.grad_fn).__name__ != "_DeferredAttentionBackward"


# ---- embedding -------------------------------------------------------------------------------------------------


def _embedding_steps(batched, create_graph=False, seed=11, grad_of_w_first=False):
    """Passes that each look up positions in one table, like GPT-2's learned positions in a COCONUT step; the
    table's gradient (and the loss) with or without the deferral."""
    torch.manual_seed(seed)
    table = nn.Embedding(40, 6, dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64, requires_grad=grad_of_w_first)
    ids = [torch.randint(0, 40, (3, n)) for n in (30, 1, 1, 2, 1)] + [torch.tensor([[5], [5], [39]])]
    with batched_weight_grads() if batched else torch.enable_grad():
        outs = [linear_mod.embedding(i, table) for i in ids]
        kinds = {type(o.grad_fn).__name__ for o in outs}
    loss = sum((torch.tanh(o) @ w).pow(2).sum() for o in outs)
    if grad_of_w_first:  # a backward that does not reach the table keeps no rows for the next one
        torch.autograd.grad(loss, [w], retain_graph=True)
    if create_graph:
        (g,) = torch.autograd.grad(loss, [table.weight], create_graph=True)
        loss = loss + g.pow(2).sum()
    loss.backward()
    return loss.detach(), table.weight.grad, kinds


def test_embedding_gradient_deferred_matches_nn_embedding():
    ref_loss, ref_grad, ref_kinds = _embedding_steps(batched=False)
    loss, grad, kinds = _embedding_steps(batched=True)
    assert kinds == {"_DeferredEmbeddingBackward"} and "_DeferredEmbeddingBackward" not in ref_kinds
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_embedding_backward_that_skips_the_table_keeps_nothing():
    _, ref_grad, _ = _embedding_steps(batched=False)
    _, grad, _ = _embedding_steps(batched=True, grad_of_w_first=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_embedding_double_backward_matches_nn_embedding():
    ref_loss, ref_grad, _ = _embedding_steps(batched=False, create_graph=True)
    loss, grad, _ = _embedding_steps(batched=True, create_graph=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_embedding_plain_path_for_options_frozen_tables_and_hooks():
    ids = torch.tensor([[1, 2, 2]])
    cases = [nn.Embedding(5, 3, padding_idx=0), nn.Embedding(5, 3, max_norm=1.0),
             nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Embedding(5, 3, sparse=True)]
    frozen = nn.Embedding(5, 3)
    frozen.weight.requires_grad_(False)
    hooked = nn.Embedding(5, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    with batched_weight_grads():
        for m in [*cases, frozen, hooked]:
            out = linear_mod.embedding(ids, m)
            assert out.grad_fn is None or type(out.grad_fn).__name__ != "_DeferredEmbeddingBackward"
        torch.testing.assert_close(linear_mod.embedding(ids, hooked), hooked.weight[ids] * 2)
        with torch.no_grad():
            assert linear_mod.embedding(ids, nn.Embedding(5, 3)).grad_fn is None


def test_embedding_entry_does_not_outlive_its_step():
    for _ in range(3):
        _embedding_steps(batched=True)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is linear_mod._EmbeddingEntry]
