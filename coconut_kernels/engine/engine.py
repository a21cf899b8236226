"""LatentEngine: continuous batching of latent generation over one KVCache of `max_batch` slots.

Every step: (1) admit waiting requests into free slots, strictly first come first served (a request of n
samples waits until n slots are free, and nothing behind it is admitted first, so no request starves);
(2) one ragged prefill pass over the newly admitted prompts (each up to its first <latent>, or all but its last
token; `prefill_chunk` caps the rows a prompt prefills per step, the rest continues at the next steps); a
prompt with n samples prefills once and its rows are copied into the other n-1 slots (fork); (3) one decode
pass of one row per running sample, whatever its phase: the fed-back vector while it thinks, its prompt rows
after the latents (<eot>), or its last token. The phases, stop rules and sampling are `latent_decode`'s
(DecodeState, StopRule, draw_categorical, thought_vector) applied per slot, so a request's output is the one
`LatentLM.generate` gives for its prompt alone, whatever shares the batch and whenever it joined.

The engine holds `lm` itself: a weight update (an optimizer step on lm's parameters) is used from the next step.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import torch

from .. import validation
from ..errors import CoconutError
from ..feedback import resolve_feedback
from ..latent import LatentLM
from ..latent_decode import (DecodeState, DecodeStep, draw_categorical, filter_logits, parse_stop, scaled_logits,
                             thought_topk)
from ..latent_plan import plan_batch, plan_decode
from ..latent_steps import forward_rows, head_logits, thought_vector
from ..ops.argmax import argmax_last
from .params import RequestOutput, Sample, SamplingParams

_WAIT, _PREFILL, _DECODE = "wait", "prefill", "decode"


class _SlotPlan:
    """What DecodeState reads from a DecodePlan, per slot: the prompt rows after the latents (forced) and the
    latent budget of the request in each slot."""

    def __init__(self, B: int, n_forced: int, device):
        self.forced_len = torch.zeros(B, dtype=torch.long, device=device)
        self.latent_budget = torch.zeros(B, dtype=torch.long, device=device)
        self.n_forced = n_forced


@dataclasses.dataclass
class _StepRows:
    """The rows of one decode step: the samples that run (in slot order) and, per slot, the token fed, whether
    it feeds a thought (in_lat, also on the host) or a forced prompt row, and whether it runs at all."""
    seqs: list
    tok: torch.Tensor
    in_lat: torch.Tensor
    in_forced: torch.Tensor
    active: torch.Tensor
    in_lat_h: list


class _StepLogits:
    """A decode step's logits, of the rows that read them only: values (n, V) for `slots` (in slot order)."""

    def __init__(self, values: torch.Tensor, slots: list[int], B: int):
        self.values, self.slots, self.B = values, slots, B
        self.index = {s: i for i, s in enumerate(slots)}
        self.slots_t = torch.tensor(slots, dtype=torch.long, device=values.device)

    def row(self, s: int) -> torch.Tensor | None:
        """(1, V) logits of slot s, None where they were not computed."""
        i = self.index.get(s)
        return None if i is None else self.values[i:i + 1]

    def full(self) -> torch.Tensor:
        """(B, V), zeros in the rows not computed (DecodeState.update_stop reads every row)."""
        out = self.values.new_zeros(self.B, self.values.shape[1])
        out[self.slots_t] = self.values
        return out


class _Seq:
    """One sample of a request, in one slot."""

    def __init__(self, req, index: int):
        self.req, self.index, self.slot, self.it = req, index, None, 0
        seed = req.params.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed + index)
        self.sample = Sample()
        self.latents: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []  # the normed state each thought was made from


class _Request:
    def __init__(self, rid: int, ids: list[int], params: SamplingParams, fb, rule, prefill: int, forced: list[int],
                 budget: int):
        self.id, self.ids, self.params, self.fb, self.rule = rid, ids, params, fb, rule
        self.prefill_len, self.forced, self.budget = prefill, forced, budget
        self.prefilled, self.phase = 0, _WAIT
        self.seqs = [_Seq(self, i) for i in range(params.n)]
        self.rule_key = dataclasses.astuple(rule)


class LatentEngine:
    """Continuous batching over `max_batch` slots of `max_tokens` positions each (prompt + latents + answer;
    default: the model's max_position). See the module docstring for the step.

    tokenizer (default: lm.tokenizer): decodes the answers of requests with stop_strings.
    add(prompt_ids, params) queues a prompt (a CoconutError for bad input, raised for that request only);
    step() runs one step and returns the requests that finished in it; generate(prompts, params) runs to
    completion and returns one RequestOutput per prompt, in input order (a bad prompt: an output with .error).
    On CUDA (use_cuda_graph) the decode pass is `latent_decode`'s captured step over static buffers.
    """

    def __init__(self, lm, max_batch: int, max_tokens: int | None = None, *, prefill_chunk: int | None = None,
                 use_cuda_graph: bool = True, tokenizer=None):
        if not isinstance(lm, LatentLM):
            raise CoconutError(f"lm must be a LatentLM (coconut_kernels.LatentLM), got {type(lm).__name__}")
        validation.check_bool(use_cuda_graph, "use_cuda_graph")
        self.lm, self.model = lm, lm.model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None)
        cfg = self.model.config
        self.max_batch = validation.check_int(max_batch, "max_batch", low=1)
        self.max_tokens = cfg.max_position if max_tokens is None else validation.check_int(
            max_tokens, "max_tokens", low=2, high=cfg.max_position)
        self.prefill_chunk = None if prefill_chunk is None else validation.check_int(prefill_chunk, "prefill_chunk",
                                                                                     low=1)
        B, device = self.max_batch, self.model.lm_head_weight.device
        self.dec = DecodeStep(lm, B, self.max_tokens, device, use_cuda_graph)
        self.cache = self.dec.cache
        self.device = device
        self.forced = torch.zeros(B, self.max_tokens, dtype=torch.long, device=device)
        self.plan = _SlotPlan(B, self.max_tokens, device)
        self.state = DecodeState.start(self.plan, self.forced, self.max_tokens, lm.eos_token_id)
        self.state.done.fill_(True)  # a slot runs only while a sample decodes in it
        d, dtype = cfg.d_model, self.model.embed_tokens.weight.dtype
        self.fed = torch.zeros(B, d, dtype=dtype, device=device)
        self.fed_state = torch.zeros(B, d, dtype=dtype, device=device)  # return_latents: what fed came from
        # static buffers of the decode pass (a CUDA graph replays over them)
        self.s_tok = torch.zeros(B, dtype=torch.long, device=device)
        self.s_fed = torch.zeros(B, d, dtype=dtype, device=device)
        self.s_use = torch.zeros(B, dtype=torch.bool, device=device)
        self.s_act = torch.zeros(B, dtype=torch.bool, device=device)
        self.slots: list[_Seq | None] = [None] * B
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._finished: list[RequestOutput] = []
        self._next_id = 0

    # ---- requests ----------------------------------------------------------------------------------------

    def _params(self, params) -> SamplingParams:
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        elif not isinstance(params, SamplingParams):
            raise CoconutError(f"params must be a SamplingParams, a dict or None, got {type(params).__name__}")
        params.check(self.model.config.vocab_size, self.max_batch)
        if params.stop_strings and self.tokenizer is None:
            raise CoconutError("stop_strings need a tokenizer to decode the answer: give LatentEngine(tokenizer=...) "
                               "or use stop_token_ids")
        return params

    @staticmethod
    def _prompt(prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise CoconutError(f"prompt_ids must be a 1-D integer tensor or a list of ints, got a "
                                   f"{prompt_ids.dim()}-D {prompt_ids.dtype} tensor")
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise CoconutError(f"prompt_ids must be a list of ints or a 1-D integer tensor, got {prompt_ids!r:.80}")
        if not prompt_ids:
            raise CoconutError("prompt_ids is empty: a prompt needs at least one token")
        return list(prompt_ids)

    def add(self, prompt_ids, params: SamplingParams | dict | None = None) -> int:
        """Queue one prompt (its samples run as soon as params.n slots are free, first come first served);
        returns its request id. Raises CoconutError for bad input; the engine is unchanged then."""
        ids = self._prompt(prompt_ids)
        params = self._params(params)
        lm, cfg = self.lm, self.model.config
        if params.feedback is not None:
            validation.check_feedback(params.feedback, cfg.d_model)
        fb = lm.feedback if params.feedback is None else resolve_feedback(params.feedback, cfg.d_model)
        rule = parse_stop(params.stop)
        latent_id = lm.latent_token_id if fb.sequential else -1
        ids_h = torch.tensor([ids])
        mask = torch.ones_like(ids_h)
        validation.check_batch(ids_h, mask, None, None, **validation.batch_rules(lm, latent_id),
                               max_new_tokens=params.max_tokens, stop_kind=rule.kind, max_latents=rule.max_latents,
                               prompt_name="prompt_ids", max_new_tokens_name="params.max_tokens")
        bplan = plan_batch(ids_h, mask, latent_id)
        dplan = plan_decode(bplan, params.max_tokens, rule.max_latents, cfg.max_position, len(ids), "cpu")
        if dplan.total > self.max_tokens:
            raise CoconutError(f"prompt_ids / params.max_tokens: prompt + latents + max_tokens = {dplan.total} "
                               f"positions exceed the engine's max_tokens={self.max_tokens} per slot")
        prefill, k = int(dplan.prefill[0]), int(bplan.n_latents[0])
        req = _Request(self._next_id, ids, params, fb, rule, prefill, ids[prefill + k:], int(dplan.latent_budget[0]))
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _find(self, request_id: int) -> _Request | None:
        return next((r for q in (self.waiting, self.running) for r in q if r.id == request_id), None)

    def progress(self, request_id: int) -> list[Sample] | None:
        """The samples of an unfinished request as they grow (read-only; None once it has finished or is
        unknown): what a streaming client has been sent is a prefix of their token_ids."""
        r = self._find(request_id)
        return None if r is None else [q.sample for q in r.seqs]

    def abort(self, request_id: int) -> bool:
        """Drop an unfinished request (a client that left): its slots are freed and no output is returned.
        False when it had already finished or is unknown."""
        r = self._find(request_id)
        if r is None:
            return False
        if r in self.waiting:
            self.waiting.remove(r)
        self._fail(r, CoconutError("aborted"))
        self._finished.pop()  # an aborted request reports nothing
        return True

    def generate(self, prompts, params=None) -> list[RequestOutput]:
        """Run `prompts` (lists of ids) to completion; params: one for all or one per prompt. Returns one
        RequestOutput per prompt in input order; a prompt the engine refuses gets an output with .error."""
        if not isinstance(prompts, (list, tuple)):
            raise CoconutError(f"prompts must be a list of prompts (each a list of token ids or a 1-D tensor), got "
                               f"{type(prompts).__name__}")
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise CoconutError(f"params: expected one per prompt ({len(prompts)}), got {len(per)}")
        out: list[RequestOutput | None] = [None] * len(prompts)
        pos = {}
        for i, (p, sp) in enumerate(zip(prompts, per)):
            try:
                pos[self.add(p, sp)] = i
            except CoconutError as err:
                out[i] = RequestOutput(-1, p if isinstance(p, list) else [], [], err)
        while any(o is None for o in out):
            for res in self.step():
                if res.request_id in pos:
                    out[pos[res.request_id]] = res
        return out

    # ---- the step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admit, prefill, decode once; returns the requests that finished (or failed) in this step."""
        with torch.no_grad():
            self._admit()
            self._prefill()
            self._decode()
        out, self._finished = self._finished, []
        return out

    def _admit(self) -> None:
        free = [s for s, seq in enumerate(self.slots) if seq is None]
        while self.waiting and len(free) >= self.waiting[0].params.n:
            req = self.waiting.popleft()
            for seq in req.seqs:
                seq.slot = free.pop(0)
                self.slots[seq.slot] = seq
            req.phase = _PREFILL
            self.running.append(req)

    def _prefill(self) -> None:
        """One ragged pass over the prompts being prefilled (each in its first slot); those whose prefill is
        complete start decoding."""
        reqs = [r for r in self.running if r.phase == _PREFILL]
        if not reqs:
            return
        chunk = self.prefill_chunk
        rows = {r.id: min(r.prefill_len - r.prefilled, chunk or r.prefill_len) for r in reqs}
        last = {}
        if max(rows.values()) > 0:
            try:
                h = self._prefill_pass(reqs, rows)
            except Exception as err:  # the pass failed: every request in it fails, the others go on
                for r in reqs:
                    self._fail(r, err)
                return
            last = {r.id: h[i, rows[r.id] - 1] for i, r in enumerate(reqs) if rows[r.id]}
        for r in reqs:
            r.prefilled += rows[r.id]
            if r.prefilled == r.prefill_len:
                try:
                    self._start_decode(r, last.get(r.id))
                except Exception as err:
                    self._fail(r, err)

    def _prefill_pass(self, reqs: list[_Request], rows: dict) -> torch.Tensor:
        """The model pass of `rows[r.id]` prompt rows of each request in `reqs`, on a cache of len(reqs) rows
        only (not all max_batch slots: a pass computes every row it is given, so a prompt admitted alone would
        otherwise pay for max_batch of them). The rows a request prefilled at earlier steps (prefill_chunk) are
        copied in first, the new ones copied back into its slot after. Returns the hidden states (n, W, d)."""
        n, W = len(reqs), max(rows.values())
        held = [r.prefilled for r in reqs]
        sub = self.model.new_cache(n, max(p + rows[r.id] for p, r in zip(held, reqs)), device=self.device)
        ids = torch.zeros(n, W, dtype=torch.long)
        for i, r in enumerate(reqs):
            c, s, p = rows[r.id], r.seqs[0].slot, held[i]
            ids[i, :c] = torch.tensor(r.ids[p:p + c], dtype=torch.long)
            if p:
                sub.k[:, i, :p], sub.v[:, i, :p] = self.cache.k[:, s, :p], self.cache.v[:, s, :p]
        sub.seqlens.copy_(torch.tensor(held, dtype=torch.int32))
        # explicit positions: the rows past a prompt's count are never used, but must index the table
        pos = (torch.tensor(held)[:, None] + torch.arange(W)).clamp(max=self.model.config.max_position - 1)
        counts = torch.tensor([rows[r.id] for r in reqs])
        h = forward_rows(self.model, self.model.embed(ids.to(self.device)), sub, counts.to(self.device),
                         pos.to(self.device))
        for i, r in enumerate(reqs):
            s, p, c = r.seqs[0].slot, held[i], rows[r.id]
            self.cache.k[:, s, p:p + c], self.cache.v[:, s, p:p + c] = sub.k[:, i, p:p + c], sub.v[:, i, p:p + c]
            self.cache.seqlens[s] = p + c
        return h

    def _start_decode(self, r: _Request, last: torch.Tensor | None) -> None:
        """Fork the prefilled rows into the request's other slots and set every sample's decode state. The
        first thought comes from the prefill's last row (zeros where there was none, as `generate`)."""
        model, st, L = self.model, self.state, r.prefill_len
        if last is None:
            normed = torch.zeros(self.fed.shape[1], dtype=self.fed.dtype, device=self.device)
            logits = torch.zeros(model.config.vocab_size, device=self.device)
        else:
            normed = model.final_norm(last)
            logits = head_logits(model, normed)
        lead = r.seqs[0].slot
        for seq in r.seqs[1:]:
            s = seq.slot
            self.cache.k[:, s, :L] = self.cache.k[:, lead, :L]
            self.cache.v[:, s, :L] = self.cache.v[:, lead, :L]
            self.cache.seqlens[s] = L
        forced = torch.tensor(r.forced, dtype=torch.long, device=self.device)
        for seq in r.seqs:
            s = seq.slot
            if r.fb.sequential:
                self.fed[s] = thought_vector(model, r.fb, normed[None], logits[None], seq.generator)[0].to(
                    self.fed.dtype)
            else:
                self.fed[s] = model.embed(torch.tensor([self.lm.latent_token_id], device=self.device))[0]
            if r.params.return_latents:  # pause: a <latent> embedding, made from no state, reads as itself
                self.fed_state[s] = normed if r.fb.sequential else self.fed[s]
            self.forced[s, :len(r.forced)] = forced
            self.plan.forced_len[s] = len(r.forced)
            self.plan.latent_budget[s] = r.budget
            st.latent_left[s], st.forced_pos[s], st.next_token[s] = r.budget, 0, forced[0]
            st.n_out[s] = st.n_latents[s] = st.low_run[s] = 0
            st.done[s] = False
        r.phase = _DECODE

    def _decode(self) -> None:
        """One row per decoding sample: the model pass, the stop rules, the next thoughts and sampled tokens,
        then each sample's output and the samples and requests that end."""
        rows = self._decode_rows()
        if rows is None:
            return
        try:
            normed, logits = self._model_step(rows)
        except Exception as err:  # the pass failed: every request in it fails, the others go on
            for r in {id(q.req): q.req for q in rows.seqs}.values():
                self._fail(r, err)
            return
        for seq in rows.seqs:
            if seq.req.params.return_latents and rows.in_lat_h[seq.slot]:
                seq.latents.append(self.fed[seq.slot].clone())
                seq.states.append(self.fed_state[seq.slot].clone())
        self._update_stop(rows.seqs, logits, rows.in_lat, rows.in_forced)
        sampled, sample_lp, failed = self._next_inputs(rows, normed, logits)
        self._emit(rows, sampled, logits, sample_lp, failed)
        for r, err in failed.values():
            self._fail(r, err)
        for r in [r for r in self.running if all(q.sample.finish_reason for q in r.seqs)]:
            self.running.remove(r)
            self._finished.append(RequestOutput(r.id, r.ids, [q.sample for q in r.seqs]))

    def _decode_rows(self) -> "_StepRows | None":
        """This step's rows (None when no sample decodes): which slots run, and what each feeds."""
        st = self.state
        active = ~st.done
        act_h = active.tolist()
        if not any(act_h):
            return None
        tok, in_lat, in_forced = st.inputs(self.forced, self.plan)
        seqs = [self.slots[s] for s in range(self.max_batch) if act_h[s]]
        return _StepRows(seqs, tok, in_lat, in_forced, active, in_lat.tolist())

    def _model_step(self, rows: "_StepRows") -> tuple[torch.Tensor, _StepLogits]:
        """The decode pass over the static buffers; the LM head only on the rows that read their logits."""
        self.s_tok.copy_(rows.tok)
        self.s_fed.copy_(self.fed)
        self.s_use.copy_(rows.in_lat)
        self.s_act.copy_(rows.active)
        head = [q.slot for q in rows.seqs if not rows.in_lat_h[q.slot] or self._latent_reads_logits(q)]
        head_rows = torch.tensor(head, dtype=torch.long, device=self.device)
        normed, logits = self.dec.run(self.s_tok, self.s_fed, self.s_use, self.s_act, head_rows)
        if logits.shape[0] != len(head):  # a captured graph computed every row
            logits = logits.index_select(0, head_rows)
        return normed, _StepLogits(logits, head, self.max_batch)

    def _latent_reads_logits(self, seq: _Seq) -> bool:
        """Whether a sample in its latent phase reads this step's logits: for its stop rule, its feedback, the
        token it emits when this is its last thought with no prompt row after it, or its sampling (a draw at
        every step, as `generate` draws, keeps a seeded sample's random stream the same as there)."""
        r = seq.req
        return (r.rule.kind != "fixed" or r.fb.needs_logits or r.fb.needs_token or r.params.do_sample
                or (seq.it + 1 >= r.budget and not r.forced))

    def _next_inputs(self, rows: "_StepRows", normed, logits: _StepLogits):
        """Per sample, with its own feedback, generator and sampling parameters: the next thought (while it
        thinks) and the sampled token (greedy: the argmax). The samples that share (temperature, top_k, top_p)
        are filtered and drawn together, each from one uniform of its own generator (`draw_categorical`), which
        gives each the token `sample_tokens` gives it alone. Returns (sampled (B,), {slot: log-prob of the
        sampled token under the sampling distribution} for the samples that ask for log-probs,
        {request: error})."""
        sampled = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        if logits.slots and any(not seq.req.params.do_sample for seq in rows.seqs if seq.slot in logits.index):
            sampled[logits.slots_t] = argmax_last(logits.values)
        failed, groups, sample_lp = {}, {}, {}
        for seq in rows.seqs:
            s, r, p = seq.slot, seq.req, seq.req.params
            try:
                if r.fb.sequential and seq.it + 1 < r.budget:
                    self.fed[s] = thought_vector(self.model, r.fb, normed[s:s + 1], logits.row(s),
                                                 seq.generator)[0].to(self.fed.dtype)
                    if p.return_latents:
                        self.fed_state[s] = normed[s]
                if p.do_sample:  # the uniform after the thought's noise, as generate draws them
                    u = torch.rand(1, dtype=torch.float64, generator=seq.generator)
                    groups.setdefault((p.temperature, p.top_k, p.top_p), []).append((seq, u))
            except Exception as err:
                failed[id(r)] = (r, err)
        for (temperature, top_k, top_p), members in groups.items():
            members = [(q, u) for q, u in members if id(q.req) not in failed]
            if not members:
                continue
            try:
                at = [logits.index[q.slot] for q, _ in members]
                values = logits.values if at == list(range(len(logits.slots))) else \
                    logits.values.index_select(0, torch.tensor(at, dtype=torch.long, device=self.device))
                filt = filter_logits(scaled_logits(values, temperature), top_k, top_p)
                tok, ok = draw_categorical(filt.softmax(-1), uniforms=torch.cat([u for _, u in members]),
                                           with_ok=True)
                slots = [q.slot for q, _ in members]
                sampled[torch.tensor(slots, dtype=torch.long, device=self.device)] = tok
                lp = filt.log_softmax(-1).gather(1, tok[:, None])[:, 0].tolist() \
                    if any(q.req.params.logprobs for q, _ in members) else None
                for i, ((q, _), good) in enumerate(zip(members, ok.tolist())):
                    if not good:  # a row that cannot be sampled (NaN / inf logits) fails its own request only
                        failed[id(q.req)] = (q.req, CoconutError(
                            f"request {q.req.id}: cannot sample: its logits hold a NaN or an infinity"))
                    elif lp is not None:
                        sample_lp[q.slot] = lp[i]
            except Exception as err:  # the group's requests fail, the others go on
                for q, _ in members:
                    failed[id(q.req)] = (q.req, err)
        return sampled, sample_lp, failed

    def _emit(self, rows: "_StepRows", sampled, logits: _StepLogits, sample_lp: dict, failed: dict) -> None:
        """Advance the decode state; append each emitted token with its log-probs to its sample; retire the
        samples that end (EOS, a stop id, max_tokens)."""
        st, eos = self.state, self.lm.eos_token_id
        n_before = st.n_out.clone()
        st.emit(sampled, rows.in_lat, self.plan, eos)
        emitted = (st.n_out > n_before).tolist()
        sampled_h, done_h = sampled.tolist(), st.done.tolist()
        raw = []  # log p(token) under the raw model, per computed row, in one pass over the rows
        if logits.slots and any(q.req.params.logprobs for q in rows.seqs):
            v = logits.values.float()
            raw = (v.gather(1, sampled[logits.slots_t][:, None])[:, 0] - v.logsumexp(-1)).tolist()
        for seq in rows.seqs:
            s, r, p, out = seq.slot, seq.req, seq.req.params, seq.sample
            seq.it += 1
            if id(r) in failed:
                continue
            if emitted[s]:
                t = sampled_h[s]
                out.token_ids.append(t)
                if p.logprobs:
                    out.model_logprobs.append(raw[logits.index[s]])
                    out.logprobs.append(sample_lp[s] if p.do_sample else 0.0)
                stop = t == eos or t in p.stop_token_ids or self._stop_string(out, p.stop_strings)
                if stop or len(out.token_ids) >= p.max_tokens or done_h[s]:
                    out.finish_reason = "stop" if stop else "length"
            elif done_h[s]:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                self._retire(seq)

    def _stop_string(self, out: Sample, stops) -> bool:
        """Decode the sample's answer (when it has stop strings): whether it now contains one; out.text is the
        answer cut before the earliest of them."""
        if not stops:
            return False
        out.text = self.tokenizer.decode(out.token_ids)
        cut = min((i for i in (out.text.find(x) for x in stops) if i >= 0), default=-1)
        if cut >= 0:
            out.text = out.text[:cut]
        return cut >= 0

    def _update_stop(self, seqs, logits: _StepLogits, in_lat, in_forced) -> None:
        """DecodeState.update_stop once per distinct stop rule among the running samples, on their rows only
        (the other rows' low-entropy runs kept). Only the eot and entropy rules read logits."""
        groups: dict = {}
        for seq in seqs:
            groups.setdefault(seq.req.rule_key, (seq.req.rule, []))[1].append(seq.slot)
        st = self.state
        full = logits.full() if any(rule.kind != "fixed" for rule, _ in groups.values()) else None
        for rule, slots in groups.values():
            g = torch.zeros_like(in_lat)
            g[slots] = True
            low = st.low_run.clone()
            st.update_stop(rule, full, in_lat & g, in_forced & g, self.lm.end_latent_id)
            st.low_run = torch.where(g, st.low_run, low)

    def _retire(self, seq: _Seq) -> None:
        """Free the sample's slot (its cache rows are overwritten by the next occupant)."""
        s = seq.slot
        seq.sample.n_latents = int(self.state.n_latents[s])
        if seq.latents:
            seq.sample.latents = torch.stack(seq.latents)
            seq.sample.latent_states = torch.stack(seq.states)
            seq.sample.latent_topk_ids, seq.sample.latent_topk_probs = thought_topk(
                self.model, seq.sample.latent_states, seq.req.params.latent_topk)
        self.state.done[s] = True
        self.cache.seqlens[s] = 0
        self.slots[s] = None
        seq.slot = None

    def _fail(self, r: _Request, err: Exception) -> None:
        """End request r with `err`: free its slots, drop it from the queue; the engine goes on."""
        for seq in r.seqs:
            if seq.slot is not None:
                self.state.done[seq.slot] = True
                self.cache.seqlens[seq.slot] = 0
                self.slots[seq.slot] = None
                seq.slot = None
            if seq.sample.finish_reason is None:
                seq.sample.finish_reason = "error"
        if r in self.running:
            self.running.remove(r)
        self._finished.append(RequestOutput(r.id, r.ids, [q.sample for q in r.seqs],
                                            err if isinstance(err, Exception) else CoconutError(str(err))))
