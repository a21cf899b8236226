"""The per-batch plan (coconut_kernels.latent_plan) written out by hand for a ragged and an aligned batch: which
pass computes which rows, where the fed vectors go and come from, the labelled rows; generate's phases; and the
stop state of the decode loop (latent_decode.DecodeState) under each stop rule."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coconut_kernels.latent_decode import DecodeState, StopRule
from coconut_kernels.latent_plan import (ANSWER, LATENT, PREFILL, PassRows, _pass_pieces, pass_rows, plan_batch,
                                         plan_decode)

BOT, LAT, EOT, PAD = 8, 9, 7, 0
IGN = -100

# ex0: 4 question rows, 2 latents, <eot> and 3 answer tokens (10 rows); ex1: 2 + 3 latents + <eot> + 2 answer
# tokens (8 rows); ex2: no latents, 5 rows, the last two labelled.
ROWS = [[1, 2, 3, BOT, LAT, LAT, EOT, 4, 5, 6],
        [1, BOT, LAT, LAT, LAT, EOT, 4, 6],
        [1, 2, 3, 4, 5]]
LABELS = [[IGN] * 7 + [4, 5, 6], [IGN] * 6 + [4, 6], [IGN] * 3 + [4, 5]]


def batch(leftpad):
    T = max(p + len(r) for p, r in zip(leftpad, ROWS))
    ids = torch.full((3, T), PAD)
    mask = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), IGN)
    for b, (p, r, lab) in enumerate(zip(leftpad, ROWS, LABELS)):
        ids[b, p:p + len(r)] = torch.tensor(r)
        mask[b, p:p + len(r)] = 1
        labels[b, p:p + len(r)] = torch.tensor(lab)
    return ids, mask, labels


def test_plan_of_a_ragged_batch():
    ids, mask, labels = batch([0, 0, 0])
    plan = plan_batch(ids, mask, LAT)
    assert plan.leftpad.tolist() == [0, 0, 0] and plan.length.tolist() == [10, 8, 5]
    assert plan.n_latents.tolist() == [2, 3, 0] and plan.first_latent[:2].tolist() == [4, 2]
    assert [p.kind for p in plan.passes] == [PREFILL, LATENT, LATENT, ANSWER]
    # prefill up to each first latent (ex2: everything), one latent row per pass, then from the last latent on
    assert [p.count.tolist() for p in plan.passes] == [[4, 2, 5], [1, 1, 0], [0, 1, 0], [5, 4, 0]]
    assert [p.start[p.count > 0].tolist() for p in plan.passes] == [[0, 0, 0], [4, 2], [3], [5, 4]]
    assert plan.max_len == 10
    for b, r in enumerate(ROWS):  # every real row is computed exactly once
        assert sum(int(p.count[b]) for p in plan.passes) == len(r)


def test_plan_of_an_aligned_batch_is_the_ragged_one_shifted():
    ragged = plan_batch(*batch([0, 0, 0])[:2], LAT)
    aligned = plan_batch(*batch([0, 2, 0])[:2], LAT)  # first latents both at column 4
    assert aligned.leftpad.tolist() == [0, 2, 0]
    for a, r in zip(aligned.passes, ragged.passes):
        assert a.kind == r.kind and torch.equal(a.start, r.start) and torch.equal(a.count, r.count)
    rows = pass_rows(aligned, batch([0, 2, 0])[2], 10, "cpu")
    assert rows[1].col[:2, 0].tolist() == [4, 4]  # local rows 4 and 2 at the same global column


def test_pass_rows_of_a_ragged_batch():
    ids, mask, labels = batch([0, 0, 0])
    plan = plan_batch(ids, mask, LAT)
    rows = pass_rows(plan, labels, ids.shape[1], "cpu")
    assert [r.width for r in rows] == [5, 1, 1, 5]
    assert [r.count.tolist() for r in rows] == [p.count.tolist() for p in plan.passes]
    assert rows[0].col.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    # rows past count[b] (ex1's last, all of ex2's) are inputs the pass does not compute
    assert rows[3].col.tolist() == [[5, 6, 7, 8, 9], [4, 5, 6, 7, 8], [0, 1, 2, 3, 4]]
    # fed vectors: written at the first row of the examples in a latent phase, produced by the last row of
    # the examples whose next row is a latent
    assert [r.feed_rows.tolist() for r in rows] == [[], [0, 1], [1], [0, 1]]
    assert [r.produce.tolist() for r in rows] == [[0, 1], [0, 1], [1], []]
    assert [r.src.tolist() for r in rows] == [[3, 1], [0, 0], [0], []]
    # labelled rows predict the next column's label: ex2 in the prefill pass, ex0 and ex1 in the answer pass
    assert rows[0].loss_rows.tolist() == [12, 13] and rows[0].targets.tolist() == [4, 5]
    assert rows[3].loss_rows.tolist() == [1, 2, 3, 6, 7] and rows[3].targets.tolist() == [4, 5, 6, 4, 6]
    assert rows[1].loss_rows.numel() == rows[2].loss_rows.numel() == 0
    assert rows[3].valid_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("seed", range(4))
def test_latent_passes_planned_together_equal_one_by_one(seed):
    """The one-row latent passes planned in one batched computation (pass_rows) hold the index tensors the
    per-pass planning gives, on random ragged and left-padded batches with labels on latent rows too."""
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 24
    lengths = torch.randint(6, T + 1, (B,), generator=g)
    pads = torch.randint(0, 2, (B,), generator=g) * (T - lengths)
    ids, mask = torch.full((B, T), PAD), torch.zeros(B, T, dtype=torch.long)
    labels = torch.randint(1, 7, (B, T), generator=g)
    for b in range(B):
        n, p = int(lengths[b]), int(pads[b])
        k = int(torch.randint(0, min(6, n - 3), (), generator=g))
        row = torch.randint(1, 7, (n,), generator=g)
        row[1], row[2:2 + k], row[2 + k] = BOT, LAT, EOT
        ids[b, p:p + n], mask[b, p:p + n] = row, 1
    labels[torch.rand(B, T, generator=g) < 0.5] = IGN
    plan = plan_batch(ids, mask, LAT)
    rows = pass_rows(plan, labels, T, "cpu")
    assert len(rows) == len(plan.passes)
    for p, (span, r) in enumerate(zip(plan.passes, rows)):
        expect = _pass_pieces(plan, p, span, labels, T)
        got = [getattr(r, f) for f in list(PassRows.__dataclass_fields__)[2:]]
        assert r.width * B == expect[0].numel()
        for name, a, e in zip(list(PassRows.__dataclass_fields__)[2:], got, expect):
            assert a.reshape(-1).tolist() == e.reshape(-1).tolist(), (p, name)


def test_plan_without_latents_is_one_prefill_pass():
    ids, mask, labels = batch([0, 0, 0])
    plan = plan_batch(ids, mask, -1)  # pause feedback: no latent rows
    assert [p.kind for p in plan.passes] == [PREFILL]
    assert plan.passes[0].count.tolist() == [10, 8, 5]


def test_decode_plan_phases_and_budget():
    # generate's prompts end at <eot>
    prompts = [r[: r.index(EOT) + 1] if EOT in r else r for r in ROWS]
    T = max(map(len, prompts))
    ids = torch.tensor([r + [PAD] * (T - len(r)) for r in prompts])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in prompts])
    plan = plan_batch(ids, mask, LAT)
    fixed = plan_decode(plan, max_new_tokens=4, max_latents=None, max_positions=64, T=T, device="cpu")
    assert fixed.prefill.tolist() == [4, 2, 4]  # up to the first latent; all but the last token without one
    assert fixed.width == 4 and fixed.prefill_cols.tolist()[1] == [0, 1, 2, 3]
    assert fixed.forced_len.tolist() == [1, 1, 1] and fixed.forced_cols[:, 0].tolist() == [6, 5, 4]
    assert fixed.latent_budget.tolist() == [2, 3, 0] and fixed.max_latents == 3
    # positions: prompt + max_new_tokens + the latents above the prompt's own (ex2: 3 it never takes)
    assert fixed.total == 5 + 4 + 3 and fixed.max_steps == 3 + 1 + 4
    eot = plan_decode(plan, max_new_tokens=4, max_latents=6, max_positions=64, T=T, device="cpu")
    assert eot.latent_budget.tolist() == [6, 6, 0] and eot.max_latents == 6 and eot.total == 5 + 4 + 6
    with pytest.raises(ValueError, match="exceed the model's 14"):
        plan_decode(plan, max_new_tokens=4, max_latents=6, max_positions=14, T=T, device="cpu")


def _state(budget):
    B = len(budget)
    forced = torch.full((B, 1), EOT)
    plan = SimpleNamespace(latent_budget=torch.tensor(budget), forced_len=torch.ones(B, dtype=torch.long), n_forced=1)
    return DecodeState.start(plan, forced, max_new_tokens=3, pad_token_id=PAD), forced, plan


def _logits(top, n=12, sharp=True):
    x = torch.zeros(len(top), n)
    for b, t in enumerate(top):
        x[b, t] = 20.0 if sharp else 0.1
    return x


def test_stop_state_eot_rule():
    state, forced, plan = _state([4, 4])
    tok, in_lat, in_forced = state.inputs(forced, plan)
    assert in_lat.tolist() == [True, True] and not in_forced.any()
    state.update_stop(StopRule("eot"), _logits([EOT, 3]), in_lat, in_forced, end_latent_id=EOT)
    assert state.latent_left.tolist() == [0, 3] and state.n_latents.tolist() == [1, 1]
    tok, in_lat, in_forced = state.inputs(forced, plan)
    assert in_lat.tolist() == [False, True] and in_forced.tolist() == [True, False] and tok[0] == EOT
    state.update_stop(StopRule("eot"), _logits([3, 3]), in_lat, in_forced, end_latent_id=EOT)
    assert state.forced_pos.tolist() == [1, 0] and state.n_latents.tolist() == [1, 2]
    state.emit(torch.tensor([5, 6]), in_lat, plan, eos=PAD)  # ex0 fed its last prompt row: emits; ex1 thinks
    assert state.n_out.tolist() == [1, 0] and state.tokens[0, 0] == 5 and state.next_token[0] == 5


def test_stop_state_entropy_rule_and_fixed_budget():
    rule = StopRule("entropy", threshold=0.5, patience=2)
    state, forced, plan = _state([5, 5])
    for step, (sharp0, sharp1) in enumerate([(True, False), (True, True)]):
        _, in_lat, in_forced = state.inputs(forced, plan)
        logits = torch.cat([_logits([1], sharp=sharp0), _logits([1], sharp=sharp1)])
        state.update_stop(rule, logits, in_lat, in_forced, end_latent_id=EOT)
    assert state.low_run.tolist() == [2, 1]
    assert state.latent_left.tolist() == [0, 3]  # ex0: two confident steps in a row end its thought
    fixed, forced, plan = _state([2, 0])
    for _ in range(3):
        _, in_lat, in_forced = fixed.inputs(forced, plan)
        fixed.update_stop(StopRule("fixed"), _logits([EOT, EOT]), in_lat, in_forced, end_latent_id=EOT)
    assert fixed.n_latents.tolist() == [2, 0] and fixed.latent_left.tolist() == [0, 0]
