"""LatentEngine (continuous batching): every request's output is `LatentLM.generate`'s on its prompt alone,
whatever shares the batch and whenever it joined; seeded sampling per request; n samples from one prefill;
log-probs; FIFO admission; bad input and failing steps end only the requests concerned."""
from __future__ import annotations

import random

import pytest
import torch

from coconut_kernels import CoconutError, LatentLM
from coconut_kernels.engine import LatentEngine, SamplingParams
from coconut_kernels.engine import engine as engine_mod
from coconut_kernels.models import GPT2, GPT2Config
from .helpers import CharTokenizer

V = 61
EOS, BOT, LAT, EOT = V - 4, V - 3, V - 2, V - 1


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_position=96)).eval()
    with torch.no_grad():  # larger weights than the init: answers that vary with the prompt, some ending at EOS
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    return LatentLM(model, LAT, BOT, EOT, EOS)


def prompts(n, seed=0, max_k=4):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
        k = rng.randrange(-1, max_k + 1)
        out.append(q + ([BOT] + [LAT] * k + [EOT] if k >= 0 else []))
    return out


def alone(lm, prompt, max_tokens, **kw):
    ref = lm.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, **kw)
    return ref.tokens[0, :int(ref.lengths[0])].tolist(), int(ref.n_latents[0])


def run_staggered(eng, items, every=2):
    """Add (prompt, params) items a few at a time while stepping; returns {index: RequestOutput}."""
    ids, out, i, step = {}, {}, 0, 0
    while i < len(items) or eng.has_unfinished():
        if step % every == 0:
            for _ in range(2):
                if i < len(items):
                    ids[eng.add(*items[i])] = i
                    i += 1
        for res in eng.step():
            out[ids[res.request_id]] = res
        step += 1
    return out


@pytest.mark.parametrize("chunk", [None, 2])
def test_greedy_equals_generate_alone_staggered(lm, chunk):
    ps = prompts(11)
    mt = [4 + 3 * (i % 4) for i in range(len(ps))]
    eng = LatentEngine(lm, 3, 64, prefill_chunk=chunk)  # fewer slots than requests
    out = run_staggered(eng, [(p, SamplingParams(max_tokens=m)) for p, m in zip(ps, mt)])
    assert len(out) == len(ps)
    for i, p in enumerate(ps):
        s = out[i].samples[0]
        toks, k = alone(lm, p, mt[i])
        assert out[i].error is None and s.token_ids == toks and s.n_latents == k
        assert s.finish_reason == ("stop" if toks[-1] == EOS else "length")
        assert len(s.logprobs) == len(s.model_logprobs) == len(toks)
    assert all(seq is None for seq in eng.slots) and int(eng.cache.seqlens.sum()) == 0
    quiet = eng.generate(ps[:3], [SamplingParams(max_tokens=m, logprobs=False) for m in mt[:3]])
    assert [o.samples[0].token_ids for o in quiet] == [out[i].samples[0].token_ids for i in range(3)]
    assert all(o.samples[0].logprobs == o.samples[0].model_logprobs == [] for o in quiet)


def test_mixed_stop_rules_and_feedback_per_request(lm):
    ps = [p for p in prompts(12, seed=1) if LAT in p][:6]
    kinds = [dict(stop="eot"), dict(stop=("eot", 6)), dict(stop=("entropy", 2.0, 2, 5)), dict(),
             dict(feedback="soft"), dict(feedback="pause")]
    eng = LatentEngine(lm, 4, 64)
    outs = eng.generate(ps, [SamplingParams(max_tokens=6, **kw) for kw in kinds])
    for p, kw, o in zip(ps, kinds, outs):
        toks, k = alone(lm, p, 6, **kw)
        assert o.samples[0].token_ids == toks and o.samples[0].n_latents == k, kw


def test_seeded_sampling_matches_generate_and_is_batch_independent(lm):
    ps = prompts(6, seed=2)
    params = [SamplingParams(max_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=10 + i,
                             feedback="soft" if i % 2 else None) for i in range(len(ps))]
    crowd = LatentEngine(lm, 4, 64).generate(ps, params)
    for i, p in enumerate(ps):
        solo = LatentEngine(lm, 1, 64).generate([p], params[i])[0]
        assert crowd[i].samples[0].token_ids == solo.samples[0].token_ids
        toks, _ = alone(lm, p, 8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(10 + i), feedback=params[i].feedback)
        assert crowd[i].samples[0].token_ids == toks


def test_parallel_samples_fork_one_prefill(lm, monkeypatch):
    p = [5, 6, 7, BOT, LAT, LAT, LAT, EOT]
    calls = []
    real = engine_mod.forward_rows
    monkeypatch.setattr(engine_mod, "forward_rows", lambda *a, **k: calls.append(int(a[3].sum())) or real(*a, **k))
    eng = LatentEngine(lm, 4, 64)
    params = SamplingParams(n=4, max_tokens=10, do_sample=True, temperature=2.0, seed=5)
    (res,) = eng.generate([p], params)
    assert calls == [4]  # one prefill pass of the prompt's 4 rows, not 4 of them
    toks = [s.token_ids for s in res.samples]
    assert len(toks) == 4 and len({tuple(t) for t in toks}) > 1  # the samples differ
    for i, t in enumerate(toks):  # sample i is the n=1 request seeded seed + i
        single = LatentEngine(lm, 1, 64).generate([p], SamplingParams(max_tokens=10, do_sample=True,
                                                                      temperature=2.0, seed=5 + i))[0]
        assert t == single.samples[0].token_ids
    greedy = eng.generate([p], SamplingParams(n=3, max_tokens=10))[0]
    assert all(s.token_ids == alone(lm, p, 10)[0] for s in greedy.samples)


def test_logprobs_and_latents(lm):
    p = [5, 6, 7, BOT, LAT, LAT, EOT]
    eng = LatentEngine(lm, 2, 64)
    s = eng.generate([p], SamplingParams(max_tokens=6, do_sample=True, temperature=0.7, top_k=10, seed=1,
                                         return_latents=True))[0].samples[0]
    full = torch.tensor([p + s.token_ids])
    logits = lm(full, return_logits=True).logits[0, len(p) - 1:len(p) - 1 + len(s.token_ids)].double()
    tok = torch.tensor(s.token_ids)
    raw = logits.log_softmax(-1)[torch.arange(len(tok)), tok]
    torch.testing.assert_close(torch.tensor(s.model_logprobs, dtype=torch.float64), raw, atol=1e-4, rtol=1e-4)
    scaled = logits / 0.7
    kth = scaled.topk(10, -1).values[:, -1:]
    samp = scaled.masked_fill(scaled < kth, float("-inf")).log_softmax(-1)[torch.arange(len(tok)), tok]
    torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), samp, atol=1e-4, rtol=1e-4)
    ref = lm.generate(torch.tensor([p]), max_new_tokens=6, return_latents=True)
    assert s.n_latents == 2 and s.latents.shape == (2, 32)
    torch.testing.assert_close(s.latents, ref.latents[0, :2])


def test_weight_update_is_seen_at_the_next_step(lm):
    p = [9, 8, 7, BOT, LAT, EOT]
    eng = LatentEngine(lm, 2, 64)
    before = eng.generate([p], SamplingParams(max_tokens=6))[0].samples[0].token_ids
    saved = lm.model.wpe.weight.detach().clone()
    try:
        with torch.no_grad():
            lm.model.wpe.weight.mul_(-3)
        after = eng.generate([p], SamplingParams(max_tokens=6))[0].samples[0].token_ids
        assert after == alone(lm, p, 6)[0] and after != before
    finally:
        with torch.no_grad():
            lm.model.wpe.weight.copy_(saved)


def test_fifo_admission_bounds_the_wait(lm):
    """A steady stream of 1-sample requests does not starve a 3-sample request that needs every slot: it is
    admitted as soon as those added before it have left, and nothing added after it goes first."""
    eng = LatentEngine(lm, 3, 64)
    quick = SamplingParams(max_tokens=4, stop_token_ids=())
    admitted, order, big, step = {}, [], None, 0
    while step < 60:
        rid = eng.add([1 + step % 40, 2], quick)  # one new request per step, forever
        if step == 5:
            big = eng.add([3, 4, BOT, LAT, EOT], SamplingParams(n=3, max_tokens=4))
        for r in eng.running:
            admitted.setdefault(r.id, step)
        for res in eng.step():
            order.append(res.request_id)
        if big in order:
            break
        step += 1
    assert big in order
    added_before = [r for r in admitted if r < big]
    assert admitted[big] <= max(admitted[r] for r in added_before) + 6  # waits for the earlier ones only
    assert all(admitted[r] >= admitted[big] for r in admitted if r > big)  # no one overtakes it
    assert sorted(admitted, key=lambda r: (admitted[r], r)) == sorted(admitted)  # FIFO


@pytest.mark.parametrize("prompt, params, match", [
    ([], None, "empty"),
    ([1] * 95, SamplingParams(max_tokens=8), "positions"),
    ([1, 2], {"max_tokens": 4, "beams": 2}, "unknown sampling parameter"),
    ([1, 2], SamplingParams(n=0), "n"),
    ([1, 2], SamplingParams(n=5), "n"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be"),
    ([1, 2, LAT, EOT], None, "latent"),
    ([1, BOT, LAT, LAT], None, "latent"),
    ([1, 2], SamplingParams(stop="eot"), "latent"),
    ([1, 2.5], None, "prompt_ids"),
    ([1, V + 3], None, "token ids"),
    ([1, 2], SamplingParams(temperature=0.0, do_sample=True), "temperature"),
    ([1, 2], SamplingParams(feedback="telepathy"), "feedback"),
])
def test_bad_input_fails_that_request_only(lm, prompt, params, match):
    eng = LatentEngine(lm, 4, 64)
    good = eng.add([5, 6, BOT, LAT, EOT], SamplingParams(max_tokens=5))
    with pytest.raises(CoconutError, match=match):
        eng.add(prompt, params)
    outs = eng.generate([[5, 6, BOT, LAT, EOT], prompt], [SamplingParams(max_tokens=5), params])
    assert outs[0].error is None and outs[1].error is not None and isinstance(outs[1].error, CoconutError)
    assert outs[0].samples[0].token_ids == alone(lm, [5, 6, BOT, LAT, EOT], 5)[0]
    assert good < outs[0].request_id  # the earlier request ran too (generate drains the engine)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(lm, monkeypatch):
    eng = LatentEngine(lm, 3, 64)
    ps = prompts(5, seed=4)
    real = eng.dec.run
    calls = []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return real(*a)

    monkeypatch.setattr(eng.dec, "run", flaky)
    outs = eng.generate(ps, SamplingParams(max_tokens=6))
    failed = [o for o in outs if o.error is not None]
    assert len(failed) == 3 and all("fell over" in str(o.error) for o in failed)  # the 3 in that step
    for p, o in zip(ps, outs):
        if o.error is None:
            assert o.samples[0].token_ids == alone(lm, p, 6)[0]
    assert all(seq is None for seq in eng.slots)
    # a failure inside one request's own work (its sampling) fails that request only
    real_filter = engine_mod.filter_logits

    def picky(logits, top_k, top_p):
        if top_k == 7:
            raise ValueError("bad draw")
        return real_filter(logits, top_k, top_p)

    monkeypatch.setattr(engine_mod, "filter_logits", picky)
    params = [SamplingParams(max_tokens=6, do_sample=True, top_k=k, seed=1) for k in (0, 7, 0)]
    outs = eng.generate(ps[:3], params)
    assert [o.error is None for o in outs] == [True, False, True]
    assert "bad draw" in str(outs[1].error)
    assert outs[1].samples[0].finish_reason == "error"


def test_a_row_that_cannot_be_sampled_fails_its_own_request_only(lm, monkeypatch):
    """Samples that share their sampling settings are drawn together; NaN logits in one of them (its own
    feedback or temperature overflowing) fail that request alone."""
    ps = prompts(3, seed=9)
    eng = LatentEngine(lm, 3, 64)
    real = eng._model_step

    def poisoned(rows):
        normed, logits = real(rows)
        for q in rows.seqs:
            if q.req.id == 1 and q.slot in logits.index:
                logits.values[logits.index[q.slot]] = float("nan")
        return normed, logits

    monkeypatch.setattr(eng, "_model_step", poisoned)
    params = [SamplingParams(max_tokens=5, do_sample=True, seed=i) for i in range(3)]
    outs = eng.generate(ps, params)
    assert [o.error is None for o in outs] == [True, False, True]
    assert "cannot sample" in str(outs[1].error)
    for i in (0, 2):
        solo = LatentEngine(lm, 1, 64).generate([ps[i]], params[i])[0]
        assert outs[i].samples[0].token_ids == solo.samples[0].token_ids


def test_abort_frees_the_slots(lm):
    eng = LatentEngine(lm, 2, 64)
    a = eng.add([5, 6, BOT, LAT, EOT], SamplingParams(n=2, max_tokens=20))
    b = eng.add([7, 8], SamplingParams(max_tokens=3))
    eng.step()
    assert eng.progress(a) is not None and eng.progress(b) is not None  # a runs, b waits
    assert eng.abort(a) and not eng.abort(a)
    assert eng.progress(a) is None and eng.abort(b)
    assert all(s is None for s in eng.slots) and not eng.has_unfinished() and eng.step() == []
    out = eng.generate([[7, 8]], SamplingParams(max_tokens=3))[0]
    assert out.samples[0].token_ids == alone(lm, [7, 8], 3)[0]


def test_stop_strings_end_a_sample_and_cut_its_text(lm):
    p = [5, 6, 7, BOT, LAT, EOT]
    tok = CharTokenizer()
    full, _ = alone(lm, p, 24)
    text = tok.decode(full)
    stop = text[5:7]  # two tokens, first seen at index text.find(stop)
    cut = text.find(stop)
    eng = LatentEngine(lm, 2, 64, tokenizer=tok)
    s = eng.generate([p], SamplingParams(max_tokens=24, stop_strings=(stop, "never")))[0].samples[0]
    assert s.finish_reason == "stop" and s.text == text[:cut] and s.token_ids == full[:cut + 2]
    with pytest.raises(CoconutError, match="tokenizer"):
        LatentEngine(lm, 2, 64).add(p, SamplingParams(stop_strings=("x",)))
    with pytest.raises(CoconutError, match="stop_strings"):
        eng.add(p, SamplingParams(stop_strings=("",)))


@pytest.mark.parametrize("feedback", ["hidden", "soft"])
def test_latent_topk_equals_generate_readout(lm, feedback):
    """The fed vectors, the states they were made from and the states' read-out are generate's (for "soft" the
    fed vector is an embedding mix and the read-out is the state's, not the mix's)."""
    p = [5, 6, 7, BOT, LAT, LAT, LAT, EOT]
    s = LatentEngine(lm, 2, 64).generate([p], SamplingParams(max_tokens=4, return_latents=True, latent_topk=3,
                                                             feedback=feedback))[0].samples[0]
    ref = lm.generate(torch.tensor([p]), max_new_tokens=4, return_latents=True, feedback=feedback)
    assert s.latent_topk_ids.shape == (3, 3)
    assert torch.equal(s.latent_topk_ids, ref.latent_topk_ids[0, :3, :3])
    torch.testing.assert_close(s.latent_topk_probs, ref.latent_topk_probs[0, :3, :3])
    torch.testing.assert_close(s.latents, ref.latents[0])
    torch.testing.assert_close(s.latent_states, ref.latent_states[0])
    assert torch.equal(s.latents, s.latent_states) == (feedback == "hidden")


def test_lm_head_runs_only_on_rows_that_read_logits(lm, monkeypatch):
    """A latent step of a fixed-count, hidden-feedback thought needs no logits: its LM head is skipped, and
    the output is unchanged (greedy equals generate alone)."""
    heads = []
    real = engine_mod.DecodeStep.step

    def counting(self, tokens, fed, use_fed, active, head_rows=None):
        if head_rows is not None:  # generate (the reference below) computes every row's logits
            heads.append((int(active.sum()), len(head_rows)))
        return real(self, tokens, fed, use_fed, active, head_rows)

    monkeypatch.setattr(engine_mod.DecodeStep, "step", counting)
    p = [5, 6, BOT] + [LAT] * 4 + [EOT]
    out = LatentEngine(lm, 2, 64).generate([p], SamplingParams(max_tokens=3))[0].samples[0]
    assert out.token_ids == alone(lm, p, 3)[0]
    assert heads[:5] == [(1, 0)] * 4 + [(1, 1)]  # the four latent steps headless, then <eot> emits
