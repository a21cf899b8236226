"""Multi-pass COCONUT training forward (and batched latent decoding) on the model layer.

A batch is planned once on the host (where the latents are, which rows each pass computes); every pass
then runs the model over its rows against one preallocated KVCache (ragged: each example at its own
positions, no compute on pads), feeds the final-normed last hidden state back with the fused
`latent_feedback` op, and the loss is taken at labelled positions only, in chunks (`linear_cross_entropy`).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from .feedback import Feedback, HiddenFeedback, resolve_feedback
from .loss import linear_cross_entropy
from .models.linear import batched_weight_grads
from .ops.latent_feedback import latent_feedback

IGNORE_INDEX = -100


@dataclass
class LatentOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None = None  # (B, T, V), only with return_logits=True
    n_tokens: int = 0  # labelled positions the loss averages over


@dataclass
class _Plan:
    """Where every pass reads and writes, in each example's local coordinates (column - left padding)."""
    leftpad: torch.Tensor        # (B,) columns of left padding
    length: torch.Tensor         # (B,) real tokens
    n_latents: torch.Tensor      # (B,)
    starts: list[torch.Tensor]   # per pass (B,) local row of the pass's first token
    counts: list[torch.Tensor]   # per pass (B,) tokens computed
    max_len: int


def plan_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
               latent_id: int, max_positions: int) -> _Plan:
    """Validate a batch (CPU tensors) and plan its passes.

    Pass 0 runs each example up to its first latent (everything when it has none); pass i (1 <= i < k_b) runs
    the single latent row s_b + i - 1; the last pass (index max k) runs from the last latent to the end. An
    example with fewer latents idles in the passes between, so the long last segment runs once for all.
    """
    B, T = input_ids.shape
    mask = attention_mask.to(torch.bool)
    length = mask.sum(1)
    cols = torch.arange(T)
    first = torch.where(mask, cols, T).min(1).values
    leftpad = torch.where(length > 0, first, 0)
    last = torch.where(mask, cols, -1).max(1).values
    holes = (last + 1 - leftpad) != length
    if bool(holes.any()):
        b = int(holes.nonzero()[0])
        raise ValueError(f"attention_mask row {b} must be zeros (left padding), then ones, then zeros (right "
                         f"padding); got holes in the ones")
    is_latent = input_ids == latent_id
    if bool((is_latent & ~mask).any()):
        raise ValueError("input_ids has latent tokens at padded positions (attention_mask 0)")
    n_lat = is_latent.sum(1)
    first_lat = torch.where(is_latent, cols, T).min(1).values
    last_lat = torch.where(is_latent, cols, -1).max(1).values
    bad = (n_lat > 0) & (last_lat - first_lat + 1 != n_lat)
    if bool(bad.any()):
        raise ValueError(f"the latent tokens of example {int(bad.nonzero()[0])} are not contiguous")
    if labels is not None and bool((is_latent & (labels != IGNORE_INDEX)).any()):
        raise ValueError(f"labels must be {IGNORE_INDEX} at latent positions (example "
                         f"{int((is_latent & (labels != IGNORE_INDEX)).any(1).nonzero()[0])})")
    if int(length.max()) > max_positions:
        raise ValueError(f"an example has {int(length.max())} tokens, more than the model's {max_positions} positions")
    bad = (n_lat > 0) & (first_lat == leftpad)
    if bool(bad.any()):
        raise ValueError(f"example {int(bad.nonzero()[0])} starts with a latent token: a latent needs a previous position")

    s = first_lat - leftpad  # local row of the first latent
    k = int(n_lat.max())
    zero = torch.zeros(B, dtype=torch.long)
    has = n_lat > 0
    starts, counts = [zero], [torch.where(has, s, length)]
    for i in range(1, k):
        starts.append(torch.where(n_lat > i, s + i - 1, zero))
        counts.append((n_lat > i).long())
    if k > 0:
        starts.append(torch.where(has, s + n_lat - 1, zero))
        counts.append(torch.where(has, length - (s + n_lat - 1), zero))
    return _Plan(leftpad, length, n_lat, starts, counts, int(length.max()))


class LatentLM(nn.Module):
    """COCONUT on a model of `coconut_kernels.models`: multi-pass training forward with feedback of the last
    hidden state at every latent token.

        lm = LatentLM.from_pretrained(folder)                  # ids from the folder's tokenizer
        lm = LatentLM(model, tokenizer=tok)                    # or the ids: LatentLM(model, latent_token_id,
                                                               #     start_latent_id, end_latent_id, eos_token_id)
        out = lm(input_ids, attention_mask, labels, position_ids)    # out.loss

    Accepts the reference collator's batches (first latents aligned by left padding, pads with attention 0) and
    ragged ones (right padding only, each example's latents at its own positions): both are run ragged, so no
    compute is spent on pads, and give the loss and gradients of the reference algorithm. The loss is the mean
    cross-entropy over labelled positions (labels != -100), shifted by one as in a causal LM.

    feedback: what a latent is fed (see `coconut_kernels.feedback`): "hidden" (COCONUT, default; the final norm
    is fused into the `latent_feedback` op), "projected" (CODI), "soft" (Soft Thinking), "mixture" (Mixture of
    Inputs), "pause" (the latent token keeps its own embedding: the pause-token control, run as one plain
    pass), or a `Feedback` module.
    """

    def __init__(self, model: nn.Module, latent_token_id: int | None = None, start_latent_id: int | None = None,
                 end_latent_id: int | None = None, eos_token_id: int | None = None, *, tokenizer=None,
                 feedback: str | Feedback = "hidden"):
        super().__init__()
        from .interop.markers import resolve_ids

        # ids not given come from the tokenizer (the markers added to it and to the model if missing)
        ids = resolve_ids(model, tokenizer, latent_token_id, start_latent_id, end_latent_id, eos_token_id)
        self.model = model
        self.latent_token_id, self.start_latent_id, self.end_latent_id, self.eos_token_id = ids
        self._tokenizer = tokenizer
        self.feedback = resolve_feedback(feedback, model.config.d_model)

    @property
    def tokenizer(self):
        """The tokenizer the ids came from (the folder's for `from_pretrained`); None when the ids were given
        without one."""
        return self._tokenizer

    @property
    def latent_ids(self):
        """(start_latent_id, end_latent_id, latent_token_id), the official order."""
        from .interop.markers import LatentIds

        return LatentIds(self.start_latent_id, self.end_latent_id, self.latent_token_id)

    @classmethod
    def from_pretrained(cls, path, *, latent_token_id: int | None = None, start_latent_id: int | None = None,
                        end_latent_id: int | None = None, eos_token_id: int | None = None, tokenizer=None,
                        dtype=None, device=None, **kwargs) -> "LatentLM":
        """A Hugging Face folder (config.json + safetensors) and its tokenizer (tokenizer.json, or vocab.json +
        merges.txt): ids not given are read from the tokenizer, the three markers added to it and to the
        model in the official order when it lacks them (`coconut_kernels.add_latent_tokens`)."""
        from .models.loading import load_pretrained

        model, tokenizer = load_pretrained(path, tokenizer=tokenizer, dtype=dtype, device=device,
                                           need_tokenizer=None in (latent_token_id, start_latent_id, end_latent_id,
                                                                   eos_token_id))
        return cls(model, latent_token_id, start_latent_id, end_latent_id, eos_token_id, tokenizer=tokenizer, **kwargs)

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        logits = normed @ self.model.lm_head_weight.T
        if self.model.lm_head_bias is not None:
            logits = logits + self.model.lm_head_bias
        return logits if logits.dtype == torch.float64 else logits.float()

    def _feed(self, dst: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """A copy of dst (B, 1, d) with dst[b, 0] = feedback(hidden[b, src]) for b in rows. The "hidden" mode
        is one fused op (gather, final norm, write); the others normalise the gathered rows first."""
        zeros = torch.zeros_like(rows)
        norm = self.model.final_norm
        if isinstance(self.feedback, HiddenFeedback):
            return latent_feedback(dst, hidden, rows, zeros, src, norm=self.model.norm_kind,
                                   weight=norm.weight, bias=getattr(norm, "bias", None), eps=norm.eps)
        normed = norm(hidden[rows, src])
        logits = self._logits(normed) if self.feedback.needs_logits else None
        token = logits.argmax(-1) if self.feedback.needs_token else None
        vec = self.feedback(normed, logits, token, self.model.embed_tokens.weight)
        return latent_feedback(dst, vec.to(dst.dtype)[:, None], rows, zeros, zeros)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                return_logits: bool = False) -> LatentOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
        device = input_ids.device
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # One host sync per step: the pass structure depends on where the latents are.
        ids_h, mask_h = input_ids.cpu(), attention_mask.cpu()
        labels_h = labels.cpu() if labels is not None else None
        latent_id = self.latent_token_id if self.feedback.sequential else -1
        plan = plan_batch(ids_h, mask_h, labels_h, latent_id, self.model.config.max_position)

        # Host-side index tensors of every pass, moved to the device in one copy.
        host, layout = [], []
        for p, (start, count) in enumerate(zip(plan.starts, plan.counts)):
            width = int(count.max())
            t = torch.arange(width)
            local = start[:, None] + t[None]                             # (B, width) local rows
            valid = t[None] < count[:, None]
            col = (plan.leftpad[:, None] + local).clamp(max=T - 1)       # global columns
            tgt_col = (col + 1).clamp(max=T - 1)
            if labels_h is not None:
                target = torch.where(valid & (local + 1 < plan.length[:, None]), labels_h.gather(1, tgt_col),
                                     IGNORE_INDEX)
                flat = (target != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
                target = target.reshape(-1)[flat]
            else:
                flat = target = torch.zeros(0, dtype=torch.long)
            feed_rows = (count > 0).nonzero().squeeze(1) if p > 0 else torch.zeros(0, dtype=torch.long)
            produce = ((plan.n_latents > p) & (count > 0)).nonzero().squeeze(1)
            pieces = [col, count, flat, target, feed_rows, produce, (count - 1).clamp(min=0)[produce],
                      valid.reshape(-1).nonzero().squeeze(1), col.reshape(-1)]
            layout.append((width, [x.numel() for x in pieces]))
            host.extend(x.reshape(-1).long() for x in pieces)
        dev = torch.cat(host).to(device, non_blocking=True)

        model = self.model
        cache = model.new_cache(B, max(plan.max_len, 1), device=device)
        embeds = model.embed(input_ids)
        fed = None
        sel_hidden, sel_target, logit_rows = [], [], []
        offset = 0
        # Several passes under grad: each layer's weight gradient is one product over every pass's rows
        # (models.linear), not one per pass plus a sum.
        multi_pass = torch.is_grad_enabled() and sum(w > 0 for w, _ in layout) > 1
        with batched_weight_grads() if multi_pass else nullcontext():
            for p, (width, sizes) in enumerate(layout):
                parts = []
                for n in sizes:
                    parts.append(dev[offset:offset + n])
                    offset += n
                col, count, flat, target, feed_rows, produce, src, valid_flat, col_flat = parts
                if width == 0:
                    continue
                col = col.view(B, width)
                # Rows of the embeddings looked up once for the whole batch: an embedding lookup per pass would
                # cost a dense (V, d) gradient per pass in backward.
                x = embeds.gather(1, col[:, :, None].expand(B, width, embeds.shape[-1]))
                if p > 0 and feed_rows.numel():
                    x = latent_feedback(x, fed.to(x.dtype), feed_rows, torch.zeros_like(feed_rows),
                                        torch.zeros_like(feed_rows))
                pos = position_ids.gather(1, col) if position_ids is not None else None
                h = model.forward_embeds(x, cache, position_ids=pos, new_seqlens=count.int())
                cache.advance(count.int())
                if produce.numel():
                    if fed is None:
                        fed = h.new_zeros(B, 1, h.shape[-1])
                    fed = self._feed(fed, h, produce, src)
                h2 = h.reshape(B * width, -1)
                sel_hidden.append(h2.index_select(0, flat))
                sel_target.append(target)
                if return_logits:
                    logit_rows.append((h2.index_select(0, valid_flat), (valid_flat // width), col_flat[valid_flat]))

        loss, n_tok = None, 0
        if labels is not None:
            hidden = model.final_norm(torch.cat(sel_hidden))
            targets = torch.cat(sel_target)
            n_tok = targets.numel()
            loss = linear_cross_entropy(hidden, model.lm_head_weight, targets, model.lm_head_bias)
        logits = None
        if return_logits:
            V = model.lm_head_weight.shape[0]
            acc = torch.float64 if model.lm_head_weight.dtype == torch.float64 else torch.float32
            logits = torch.zeros(B, T, V, dtype=acc, device=device)
            for rows, b, c in logit_rows:
                logits = logits.index_put((b, c), self._logits(model.final_norm(rows)))
        return LatentOutput(loss=loss, logits=logits, n_tokens=n_tok)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, feedback=None, stop=None,
                 return_latents: bool = False, use_cuda_graph: bool = True,
                 generator: torch.Generator | None = None, pad_token_id: int | None = None) -> GenerateOutput:
        """Batched latent reasoning then KV-cached decoding of the answer.

        input_ids (B, T): prompts `question <bot> <latent>*k <eot>`, left-padded (attention_mask 0 on the left)
        or right-padded, k differing per example (0 allowed with stop=None). One ragged prefill up to each
        first latent, then one token per example per step: the fed-back vector while the example thinks,
        its remaining prompt tokens (<eot>), then its own tokens until eos_token_id or max_new_tokens.

        feedback: None (this model's mode) or a mode name / Feedback module (see `coconut_kernels.feedback`).
        stop: None / "fixed" (the prompt's k latents), "eot" (end the thought when <eot> is the argmax at a
        latent step), "entropy" / ("entropy", tau, m[, max]) (after m consecutive steps with entropy < tau);
        ("eot", max) and the entropy form's max raise the latent budget above the prompt's k.
        Sampling: greedy (do_sample=False) or temperature / top_k / top_p with an optional seeded generator.
        On CUDA with use_cuda_graph the model step is captured once as a CUDA graph over static buffers;
        the loop syncs the host only to check, every few steps, whether every example has ended.

        Returns GenerateOutput: tokens (B, max_new_tokens) padded with pad_token_id (default: EOS), lengths
        (EOS included when emitted), n_latents, and with return_latents the vector fed at every latent step
        and its top-5 read-out through the LM head (probabilities, ids).
        """
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        return _generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos, feedback=feedback,
                         stop=stop, return_latents=return_latents, use_cuda_graph=use_cuda_graph,
                         generator=generator, pad_token_id=eos if pad_token_id is None else pad_token_id)


@dataclass
class GenerateOutput:
    tokens: torch.Tensor                      # (B, max_new_tokens) new tokens, pad_token_id after each end
    lengths: torch.Tensor                     # (B,) new tokens per example (EOS included when emitted)
    n_latents: torch.Tensor                   # (B,) latent steps each example ran
    latents: torch.Tensor | None = None       # (B, max latents, d) the vector fed at every latent step
    latent_topk_ids: torch.Tensor | None = None    # (B, max latents, k): what each thought decodes to
    latent_topk_probs: torch.Tensor | None = None  # (B, max latents, k)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """-inf outside the top-k and outside the smallest nucleus reaching top_p (the top token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy argmax, or a draw from softmax(filtered logits / temperature)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = _filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class _Stop:
    kind: str              # "fixed" | "eot" | "entropy"
    threshold: float = 0.0
    patience: int = 1
    max_latents: int | None = None


def parse_stop(stop) -> _Stop:
    """stop: None / "fixed" (the prompt's latent count), "eot", ("eot", max), "entropy", ("entropy", tau, m),
    ("entropy", tau, m, max), or a dict with those keys (kind, threshold, patience, max_latents)."""
    if stop is None or stop == "fixed":
        return _Stop("fixed")
    if isinstance(stop, dict):
        return _Stop(**stop) if stop.get("kind") in ("fixed", "eot", "entropy") else parse_stop(stop.get("kind", "?"))
    if stop == "eot":
        return _Stop("eot")
    if stop == "entropy":
        return _Stop("entropy", threshold=0.1, patience=2)
    if isinstance(stop, (tuple, list)) and stop and stop[0] in ("eot", "entropy"):
        if stop[0] == "eot":
            return _Stop("eot", max_latents=stop[1] if len(stop) > 1 else None)
        return _Stop("entropy", threshold=float(stop[1]), patience=int(stop[2]) if len(stop) > 2 else 1,
                     max_latents=stop[3] if len(stop) > 3 else None)
    raise ValueError(f"stop must be None, 'fixed', 'eot', 'entropy', ('eot', max), ('entropy', tau, m[, max]) "
                     f"or a dict; got {stop!r}")


class _Decoder:
    """Batched, KV-cached latent + answer decoding with a per-example state machine, all on the device.

    Every step feeds one token per example: a fed-back vector while the example is in its latent phase, the
    prompt's remaining tokens after the latents (usually just <eot>) next, then its own sampled tokens. The
    examples move through the phases independently (per-sequence cache lengths), so one step function serves
    them all and can be captured once as a CUDA graph."""

    def __init__(self, lm: "LatentLM", B: int, max_len: int, device):
        self.lm, self.model = lm, lm.model
        self.cache = self.model.new_cache(B, max_len, device=device)
        self.graph = None

    def step(self, tokens: torch.Tensor, fed: torch.Tensor, use_fed: torch.Tensor, active: torch.Tensor):
        x = self.model.embed(tokens[:, None])
        x = torch.where(use_fed[:, None, None], fed[:, None].to(x.dtype), x)
        n = active.to(torch.int32)
        h = self.model.forward_embeds(x, self.cache, new_seqlens=n)
        self.cache.advance(n)
        normed = self.model.final_norm(h[:, 0])
        return normed, self.lm._logits(normed)

    def capture(self, tokens, fed, use_fed, active):
        """Capture `step` over these (static) buffers as a CUDA graph; replay() then reruns it."""
        self.static_in = (tokens, fed, use_fed, active)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        seqlens = self.cache.seqlens.clone()
        with torch.cuda.stream(s):
            self.step(*self.static_in)  # warm up (allocations, autotuning) outside the graph
        torch.cuda.current_stream().wait_stream(s)
        self.cache.seqlens.copy_(seqlens)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the step (advance included) without running it
            self.static_out = self.step(*self.static_in)

    def replay(self):
        self.graph.replay()
        return self.static_out


def _generate(lm: "LatentLM", input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
              eos_token_id, feedback, stop, return_latents, use_cuda_graph, generator, pad_token_id,
              check_every: int = 4, readout_k: int = 5) -> GenerateOutput:
    model = lm.model
    fb = lm.feedback if feedback is None else resolve_feedback(feedback, model.config.d_model)
    rule = parse_stop(stop)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    device = input_ids.device
    B, T = input_ids.shape
    eos = eos_token_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ids_h, mask_h = input_ids.cpu(), mask.cpu()
    latent_id = lm.latent_token_id if fb.sequential else -1
    plan = plan_batch(ids_h, mask_h, None, latent_id, model.config.max_position)
    k = plan.n_latents
    if rule.kind != "fixed" and bool((k == 0).any()):
        raise ValueError(f"stop={rule.kind!r} needs <bot> <latent>... <eot> in every prompt: example "
                         f"{int((k == 0).nonzero()[0])} has no latent tokens")
    if fb.sequential and bool((k > 0).any()):
        first = plan.leftpad + torch.where(k > 0, plan.counts[0], 0)    # column of the first latent
        bot_ok = ids_h.gather(1, (first - 1).clamp(min=0)[:, None])[:, 0] == lm.start_latent_id
        after = first + k
        eot_ok = (ids_h.gather(1, after.clamp(max=T - 1)[:, None])[:, 0] == lm.end_latent_id) & (
            after < plan.leftpad + plan.length)
        bad = (k > 0) & ~(bot_ok & eot_ok)
        if bool(bad.any()):
            raise ValueError(f"prompt {int(bad.nonzero()[0])} must read question <bot> <latent>... <eot>: its latents "
                             f"are not between start_latent_id {lm.start_latent_id} and end_latent_id "
                             f"{lm.end_latent_id}")
    max_lat = int(k.max()) if rule.max_latents is None else max(int(k.max()), int(rule.max_latents))
    total = int((plan.length + max_new_tokens + (max_lat - k)).max())
    if total > model.config.max_position:
        raise ValueError(f"prompt + latents + max_new_tokens = {total} positions exceed the model's "
                         f"{model.config.max_position}")

    # Prefill: each prompt up to its first latent (all but its last token when it has none).
    length = plan.length
    prefill = torch.where(k > 0, plan.counts[0], (length - 1).clamp(min=0))
    first_lat = plan.leftpad + prefill
    suffix_start = first_lat + k                            # global column after the latents
    forced_len = plan.leftpad + length - suffix_start       # prompt tokens left after the latents
    F_ = max(int(forced_len.max()), 1)
    fcols = (suffix_start[:, None] + torch.arange(F_)[None]).clamp(max=T - 1)
    lat_left = k.clone() if rule.max_latents is None else torch.where(k > 0, torch.full_like(k, max_lat), k)
    width = int(prefill.max())
    pcols = (plan.leftpad[:, None] + torch.arange(max(width, 1))[None]).clamp(max=T - 1)
    host = [pcols, prefill, fcols, forced_len, lat_left]
    dev = [t.to(device, non_blocking=True) for t in host]
    pcols, prefill_d, fcols, forced_len_d, lat_left_d = dev

    dtype = model.embed_tokens.weight.dtype
    dec = _Decoder(lm, B, total + 1, device)
    d = model.config.d_model
    embedding = model.embed_tokens.weight
    with torch.no_grad():
        fed = torch.zeros(B, d, dtype=dtype, device=device)
        last_logits = torch.zeros(B, embedding.shape[0], device=device)
        if width > 0:
            x = model.embed(input_ids.gather(1, pcols))
            h = model.forward_embeds(x, dec.cache, new_seqlens=prefill_d.int())
            dec.cache.advance(prefill_d.int())
            last = h.gather(1, (prefill_d - 1).clamp(min=0)[:, None, None].expand(B, 1, h.shape[-1]))[:, 0]
            normed = model.final_norm(last)
            last_logits = lm._logits(normed)
        else:
            normed = fed
        forced = input_ids.gather(1, fcols)

        def next_fed(normed, logits, generator):
            if not fb.sequential:
                return model.embed(torch.full((B,), lm.latent_token_id, device=device))
            token = logits.argmax(-1) if fb.needs_token else None
            return fb(normed, logits if fb.needs_logits else None, token, embedding, generator).to(dtype)

        fed = next_fed(normed, last_logits, generator)
        fpos = torch.zeros(B, dtype=torch.long, device=device)
        next_tok = forced[:, 0].clone()
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        n_out = torch.zeros(B, dtype=torch.long, device=device)
        n_lat = torch.zeros(B, dtype=torch.long, device=device)
        low_run = torch.zeros(B, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)
        latents, read_ids, read_p = [], [], []
        # Static step buffers (CUDA graphs replay over them).
        s_tok = torch.zeros(B, dtype=torch.long, device=device)
        s_fed = torch.zeros(B, d, dtype=dtype, device=device)
        s_use = torch.zeros(B, dtype=torch.bool, device=device)
        s_act = torch.zeros(B, dtype=torch.bool, device=device)
        graphs = use_cuda_graph and device.type == "cuda"
        max_steps = max_lat + F_ + max_new_tokens
        for it in range(max_steps):
            in_lat = (lat_left_d > 0) & ~done
            in_forced = ~in_lat & (fpos < forced_len_d)
            tok = torch.where(in_forced, forced.gather(1, fpos.clamp(max=F_ - 1)[:, None])[:, 0], next_tok)
            s_tok.copy_(tok)
            s_fed.copy_(fed)
            s_use.copy_(in_lat)
            s_act.copy_(~done)
            if graphs and dec.graph is None:
                dec.capture(s_tok, s_fed, s_use, s_act)
            normed, logits = dec.replay() if graphs else dec.step(s_tok, s_fed, s_use, s_act)
            if return_latents and it < max_lat:
                latents.append(torch.where(in_lat[:, None], fed, torch.zeros_like(fed)))
                p = lm._logits(fed.to(model.lm_head_weight.dtype)).softmax(-1).topk(readout_k, dim=-1)
                read_ids.append(p.indices)
                read_p.append(torch.where(in_lat[:, None], p.values, torch.zeros_like(p.values)))
            # Latent bookkeeping and the stop rules (per example).
            n_lat += in_lat
            stop_now = torch.zeros_like(in_lat)
            if rule.kind == "eot":
                stop_now = in_lat & (logits.argmax(-1) == lm.end_latent_id)
            elif rule.kind == "entropy":
                logp = logits.log_softmax(-1)
                ent = -(logp.exp() * logp).sum(-1)
                low_run = torch.where(in_lat & (ent < rule.threshold), low_run + 1, torch.zeros_like(low_run))
                stop_now = in_lat & (low_run >= rule.patience)
            lat_left_d = torch.where(stop_now, torch.zeros_like(lat_left_d), lat_left_d - in_lat.long())
            fpos = fpos + in_forced.long()
            # Every example starts thinking at step 0 and has stopped by step max_lat: later steps feed no vector
            # (and a noisy feedback draws no random numbers for them).
            if fb.sequential and it + 1 < max_lat:
                fed = next_fed(normed, logits, generator)
            # The output of this step is a new token when the example fed its last prompt token or its own
            # previous token, or its last latent with no prompt after it.
            emit = ~done & torch.where(in_lat, (lat_left_d <= 0) & (forced_len_d == 0), fpos >= forced_len_d)
            sampled = sample_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator)
            slot = n_out.clamp(max=max_new_tokens - 1)
            out[rows, slot] = torch.where(emit, sampled, out[rows, slot])
            n_out = n_out + emit.long()
            next_tok = torch.where(emit, sampled, next_tok)
            done = done | (emit & (sampled == eos)) | (n_out >= max_new_tokens)
            if (it + 1) % check_every == 0 and bool(done.all()):  # the loop's only host sync
                break
    res = GenerateOutput(tokens=out, lengths=n_out, n_latents=n_lat)
    if return_latents:
        res.latents = torch.stack(latents, 1) if latents else None
        res.latent_topk_ids = torch.stack(read_ids, 1) if read_ids else None
        res.latent_topk_probs = torch.stack(read_p, 1) if read_p else None
    return res
