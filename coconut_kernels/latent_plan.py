"""The per-batch plan of a latent step, built once on the host: where each example's prefix, latent and answer
rows are, which rows every pass computes, and (generation) each example's phases and latent budget.

Training (`LatentLM.forward`), `generate`, and the schedules built on them read their positions from here; the
steps that run a plan are in `latent_steps` (shared) and `latent_decode` (generation). Coordinates: an
example's *local row* r is its r-th real token; its *global column* is leftpad + r.

Two schedules over the same rows: sequential (`BatchPlan.passes`: prefill, one latent row per pass, answer) and
Jacobi (`jacobi_passes`: prefill, one LATENT pass spanning every example's n thought rows that `latent_jacobi`
runs T times, then the answer after the thoughts). In the Jacobi passes only the prefill is chained: its last row
feeds the first thought; the thought rows' other feeds are written by `latent_jacobi` from the previous
iteration (`JacobiFeeds`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

PREFILL, LATENT, ANSWER = "prefill", "latent", "answer"


@dataclass
class PassSpan:
    """One pass of the sequential schedule: example b computes its local rows [start[b], start[b] + count[b])."""
    kind: str             # PREFILL (up to each first latent), LATENT (one latent row), ANSWER (last latent to end)
    start: torch.Tensor   # (B,) local row of the pass's first token
    count: torch.Tensor   # (B,) rows computed (0: the example idles in this pass)
    chained: bool = True  # the sequential chain: the previous pass feeds this pass's first row, and this pass's
    #                       last row feeds the next latent (False: the schedule writes the feeds itself)


@dataclass
class BatchPlan:
    """Where every pass reads and writes, in each example's local coordinates (CPU tensors).

    Pass 0 (PREFILL) runs each example up to its first latent (everything when it has none); pass i
    (1 <= i < k_b, LATENT) runs the single latent row first_latent + i - 1, fed the hidden state of the row
    before it; the last pass (index max k, ANSWER) runs from the last latent to the end. An example with fewer
    latents idles in the passes between, so the long last segment runs once for all.
    """
    leftpad: torch.Tensor       # (B,) columns of left padding
    length: torch.Tensor        # (B,) real tokens
    n_latents: torch.Tensor     # (B,)
    first_latent: torch.Tensor  # (B,) local row of the first latent (meaningless where n_latents is 0)
    passes: list[PassSpan]
    max_len: int                # longest example: the rows a cache needs

    @property
    def batch(self) -> int:
        return self.leftpad.shape[0]


def _sequential_passes(first: torch.Tensor, n_lat: torch.Tensor, length: torch.Tensor) -> list[PassSpan]:
    """The passes of the sequential schedule (see BatchPlan) from each example's first latent row. The one-row
    latent passes are computed together, as rows of (k - 1, B) tensors."""
    k = int(n_lat.max())
    zero = torch.zeros_like(n_lat)
    has = n_lat > 0
    passes = [PassSpan(PREFILL, zero, torch.where(has, first, length))]
    if k > 1:
        i = torch.arange(1, k)[:, None]
        thinking = n_lat[None] > i                                              # (k - 1, B)
        starts = torch.where(thinking, first[None] + i - 1, 0)
        passes += [PassSpan(LATENT, st, ct) for st, ct in zip(starts.unbind(0), thinking.long().unbind(0))]
    if k > 0:
        last = first + n_lat - 1
        passes.append(PassSpan(ANSWER, torch.where(has, last, zero), torch.where(has, length - last, zero)))
    return passes


def jacobi_passes(plan: BatchPlan) -> list[PassSpan]:
    """The Jacobi schedule's passes: the prefill (as sequential: up to each first latent; it feeds the first
    thought), every example's n_latents thought rows in one unchained LATENT pass (run once per iteration), then
    the rows after the thoughts (<eot> onwards) in one unchained ANSWER pass."""
    n_lat, first, length = plan.n_latents, plan.first_latent, plan.length
    has = n_lat > 0
    zero = torch.zeros_like(n_lat)
    after = first + n_lat
    return [plan.passes[0], PassSpan(LATENT, torch.where(has, first, zero), n_lat, chained=False),
            PassSpan(ANSWER, torch.where(has, after, zero), torch.where(has, length - after, zero), chained=False)]


@dataclass
class JacobiFeeds:
    """The thought rows a Jacobi iteration feeds from the previous one (device tensors): row dst[i] of example
    b[i] gets the feedback of the previous iteration's hidden state at row dst[i] - 1 of the LATENT pass."""
    b: torch.Tensor
    dst: torch.Tensor

    @classmethod
    def of(cls, n_latents: torch.Tensor, device) -> "JacobiFeeds":
        width = int(n_latents.max()) if n_latents.numel() else 0
        i = torch.arange(1, max(width, 1))
        fed = i[None] < n_latents[:, None]                      # (B, width - 1): thoughts after each first one
        b, j = fed.nonzero(as_tuple=True)
        return cls(b.to(device, non_blocking=True), i[j].to(device, non_blocking=True))


def plan_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_id: int) -> BatchPlan:
    """Plan the passes (see BatchPlan) of a batch that `validation.check_batch` accepted (CPU tensors).
    latent_id -1: no latent rows (one plain pass, e.g. pause feedback)."""
    B, T = input_ids.shape
    mask = attention_mask.to(torch.bool)
    length = mask.sum(1)
    cols = torch.arange(T)
    first = torch.where(mask, cols, T).min(1).values
    leftpad = torch.where(length > 0, first, 0)
    is_latent = input_ids == latent_id
    n_lat = is_latent.sum(1)
    first_lat = torch.where(is_latent, cols, T).min(1).values
    s = first_lat - leftpad
    return BatchPlan(leftpad, length, n_lat, s, _sequential_passes(s, n_lat, length), int(length.max()))


# ---- training: each pass's index tensors ---------------------------------------------------------------------


@dataclass
class PassRows:
    """One pass's index tensors on the device, views into the one buffer `pass_rows` copies there.

    Flat indices count the pass's (B, width) rows in row-major order."""
    kind: str
    width: int                 # rows per example in the pass's input (max count)
    col: torch.Tensor          # (B, width) global column of each row (clamped into the batch)
    count: torch.Tensor        # (B,) rows each example computes: the pass's new_seqlens
    feed_rows: torch.Tensor    # examples whose first row here is a latent, fed by the previous pass
    produce: torch.Tensor      # examples whose next latent is fed from this pass's hidden state ...
    src: torch.Tensor          # ... at this row of the pass (its last one)
    loss_rows: torch.Tensor    # flat rows with a label (their next token)
    targets: torch.Tensor      # those labels
    valid_rows: torch.Tensor   # flat rows that hold a real token (for return_logits)
    col_flat: torch.Tensor     # (B * width,) col, flattened


def _pass_pieces(plan: BatchPlan, p: int, span: PassSpan, labels: torch.Tensor | None, T: int):
    """The host tensors of one pass, in PassRows' field order after kind and width, each 1-D (col flattened)."""
    start, count = span.start, span.count
    t = torch.arange(int(count.max()))
    local = start[:, None] + t[None]                             # (B, width) local rows
    valid = t[None] < count[:, None]
    col = (plan.leftpad[:, None] + local).clamp(max=T - 1)       # global columns
    if labels is not None:
        tgt_col = (col + 1).clamp(max=T - 1)
        target = torch.where(valid & (local + 1 < plan.length[:, None]), labels.gather(1, tgt_col), IGNORE_INDEX)
        flat = (target != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
        target = target.reshape(-1)[flat]
    else:
        flat = target = torch.zeros(0, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    feed_rows = (count > 0).nonzero().squeeze(1) if p > 0 and span.chained else none
    produce = ((plan.n_latents > p) & (count > 0)).nonzero().squeeze(1) if span.chained else none
    return [col.reshape(-1), count, feed_rows, produce, (count - 1).clamp(min=0)[produce], flat, target,
            valid.reshape(-1).nonzero().squeeze(1), col.reshape(-1)]


def _latent_pieces(plan: BatchPlan, spans: list[PassSpan], labels: torch.Tensor | None, T: int):
    """_pass_pieces of the sequential schedule's one-row latent passes 1 .. k - 1, computed together: a pass's
    examples that think (count 1) are fed, produce the next latent from their one row (src 0) and are its
    valid rows."""
    count = torch.stack([s.count for s in spans])                          # (K, B) of 0 / 1
    col = (plan.leftpad[None] + torch.stack([s.start for s in spans])).clamp(max=T - 1)
    sizes = count.sum(1).tolist()
    thinking = count.nonzero()[:, 1].split(sizes)
    src = torch.zeros(sum(sizes), dtype=torch.long).split(sizes)
    if labels is not None:
        local = col - plan.leftpad[None]
        target = torch.where((count > 0) & (local + 1 < plan.length[None]),
                             labels.gather(1, (col + 1).clamp(max=T - 1).t()).t(), IGNORE_INDEX)
        labelled = target != IGNORE_INDEX
        flat = labelled.nonzero()[:, 1].split(labelled.sum(1).tolist())
        targets = target[labelled].split(labelled.sum(1).tolist())
    else:
        flat = targets = [torch.zeros(0, dtype=torch.long)] * len(spans)
    return [[c, n, rows, rows, z, f, tg, rows, c]
            for c, n, rows, z, f, tg in zip(col.unbind(0), count.unbind(0), thinking, src, flat, targets)]


def pass_rows(plan: BatchPlan, labels: torch.Tensor | None, T: int, device,
              passes: list[PassSpan] | None = None) -> list[PassRows]:
    """Every pass's index tensors (of `passes`, default the sequential plan.passes), built on the host and moved
    to `device` in one copy, then cut into views in one split (per-pass Python work stays off the latent loop)."""
    spans = plan.passes if passes is None else passes
    # The sequential one-row latent passes (chained, after the prefill) are planned together.
    latent = [p for p, s in enumerate(spans) if s.kind == LATENT and s.chained and p > 0]
    batched = dict(zip(latent, _latent_pieces(plan, [spans[p] for p in latent], labels, T))) if latent else {}
    host, layout = [], []
    for p, span in enumerate(spans):
        pieces = batched[p] if p in batched else _pass_pieces(plan, p, span, labels, T)
        layout.append((span.kind, pieces[0].numel() // plan.batch))
        host.extend(pieces)
    parts = torch.cat(host).long().to(device, non_blocking=True).split([x.numel() for x in host])
    out, n = [], len(PassRows.__dataclass_fields__) - 2
    for i, (kind, width) in enumerate(layout):
        mine = list(parts[i * n:(i + 1) * n])
        mine[0] = mine[0].view(plan.batch, width)
        out.append(PassRows(kind, width, *mine))
    return out


# ---- generation: each example's phases -----------------------------------------------------------------------


@dataclass
class DecodePlan:
    """generate's schedule: one ragged prefill up to each first latent (all but the last token when there is
    none), then one row per example per step: its latents (fed vectors), the prompt rows after them (forced:
    usually <eot>), then its own tokens. Tensors on the device."""
    prefill: torch.Tensor       # (B,) rows of the prefill pass
    prefill_cols: torch.Tensor  # (B, max(width, 1)) their global columns
    width: int                  # longest prefill (0: no prefill pass)
    forced_cols: torch.Tensor   # (B, n_forced) global columns of the prompt rows after the latents
    forced_len: torch.Tensor    # (B,) how many of them each example has
    n_forced: int               # max(longest forced run, 1)
    latent_budget: torch.Tensor  # (B,) latent steps each example may take (its k, or the stop rule's maximum)
    max_latents: int            # the largest budget: every example has stopped thinking by this step
    total: int                  # positions the longest example needs: prompt + extra latents + answer
    max_steps: int              # decode steps after which every example has ended


def plan_decode(plan: BatchPlan, max_new_tokens: int, max_latents: int | None, max_positions: int, T: int,
                device) -> DecodePlan:
    """generate's plan from the batch's; max_latents: the stop rule's latent budget (None: the prompt's k)."""
    k, length, leftpad = plan.n_latents, plan.length, plan.leftpad
    max_lat = int(k.max()) if max_latents is None else max(int(k.max()), int(max_latents))
    total = int((length + max_new_tokens + (max_lat - k)).max())
    if total > max_positions:
        raise ValueError(f"prompt + latents + max_new_tokens = {total} positions exceed the model's {max_positions}")
    prefill = torch.where(k > 0, plan.passes[0].count, (length - 1).clamp(min=0))
    suffix_start = leftpad + prefill + k                    # global column after the latents
    forced_len = leftpad + length - suffix_start            # prompt tokens left after the latents
    n_forced = max(int(forced_len.max()), 1)
    fcols = (suffix_start[:, None] + torch.arange(n_forced)[None]).clamp(max=T - 1)
    budget = k.clone() if max_latents is None else torch.where(k > 0, torch.full_like(k, max_lat), k)
    width = int(prefill.max())
    pcols = (leftpad[:, None] + torch.arange(max(width, 1))[None]).clamp(max=T - 1)
    pcols, prefill, fcols, forced_len, budget = (t.to(device, non_blocking=True)
                                                 for t in (pcols, prefill, fcols, forced_len, budget))
    return DecodePlan(prefill, pcols, width, fcols, forced_len, n_forced, budget, max_lat, total,
                      max_lat + n_forced + max_new_tokens)
