"""LatentEngine: continuous batching of latent generation over one KVCache of `max_batch` slots.

Every step: (1) admit waiting requests into free slots, strictly first come first served (a request of n
samples waits until n slots are free, and nothing behind it is admitted first, so no request starves);
(2) one ragged prefill pass over the newly admitted prompts (each up to its first <latent>, or all but its last
token; `prefill_chunk` caps the rows a prompt prefills per step, the rest continues at the next steps); a
prompt with n samples prefills once and its rows are copied into the other n-1 slots (fork); (3) one decode
pass of one row per running sample, whatever its phase: the fed-back vector while it thinks, its prompt rows
after the latents (<eot>), or its last token. The phases, stop rules and sampling are `latent_decode`'s
(DecodeState, StopRule, sample_tokens, thought_vector) applied per slot, so a request's output is the one
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
from ..latent_decode import DecodeState, _Decoder, _filter_logits, parse_stop, sample_tokens
from ..latent_plan import plan_batch, plan_decode
from ..latent_steps import forward_rows, head_logits, thought_vector
from .params import RequestOutput, Sample, SamplingParams

_WAIT, _PREFILL, _DECODE = "wait", "prefill", "decode"


class _SlotPlan:
    """What DecodeState reads from a DecodePlan, per slot: the prompt rows after the latents (forced) and the
    latent budget of the request in each slot."""

    def __init__(self, B: int, n_forced: int, device):
        self.forced_len = torch.zeros(B, dtype=torch.long, device=device)
        self.latent_budget = torch.zeros(B, dtype=torch.long, device=device)
        self.n_forced = n_forced


class _Seq:
    """One sample of a request, in one slot."""

    def __init__(self, req, index: int):
        self.req, self.index, self.slot, self.it = req, index, None, 0
        seed = req.params.seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed + index)
        self.sample = Sample()
        self.latents: list[torch.Tensor] = []


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

    add(prompt_ids, params) queues a prompt (a CoconutError for bad input, raised for that request only);
    step() runs one step and returns the requests that finished in it; generate(prompts, params) runs to
    completion and returns one RequestOutput per prompt, in input order (a bad prompt: an output with .error).
    On CUDA (use_cuda_graph) the decode pass is `latent_decode`'s captured step over static buffers.
    """

    def __init__(self, lm, max_batch: int, max_tokens: int | None = None, *, prefill_chunk: int | None = None,
                 use_cuda_graph: bool = True):
        if not isinstance(lm, LatentLM):
            raise CoconutError(f"lm must be a LatentLM (coconut_kernels.LatentLM), got {type(lm).__name__}")
        validation.check_bool(use_cuda_graph, "use_cuda_graph")
        self.lm, self.model = lm, lm.model
        cfg = self.model.config
        self.max_batch = validation.check_int(max_batch, "max_batch", low=1)
        self.max_tokens = cfg.max_position if max_tokens is None else validation.check_int(
            max_tokens, "max_tokens", low=2, high=cfg.max_position)
        self.prefill_chunk = None if prefill_chunk is None else validation.check_int(prefill_chunk, "prefill_chunk",
                                                                                     low=1)
        B, device = self.max_batch, self.model.lm_head_weight.device
        self.dec = _Decoder(lm, B, self.max_tokens, device, use_cuda_graph)
        self.cache = self.dec.cache
        self.device = device
        self.forced = torch.zeros(B, self.max_tokens, dtype=torch.long, device=device)
        self.plan = _SlotPlan(B, self.max_tokens, device)
        self.state = DecodeState.start(self.plan, self.forced, self.max_tokens, lm.eos_token_id)
        self.state.done.fill_(True)  # a slot runs only while a sample decodes in it
        d, dtype = cfg.d_model, self.model.embed_tokens.weight.dtype
        self.fed = torch.zeros(B, d, dtype=dtype, device=device)
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
        """One ragged pass over the prompts being prefilled (in their first slot); those whose prefill is
        complete start decoding."""
        reqs = [r for r in self.running if r.phase == _PREFILL]
        if not reqs:
            return
        B, chunk = self.max_batch, self.prefill_chunk
        counts = torch.zeros(B, dtype=torch.long)
        rows = {}
        for r in reqs:
            n = r.prefill_len - r.prefilled
            rows[r.id] = min(n, chunk) if chunk else n
        W = max(rows.values())
        last = {}
        if W > 0:
            ids = torch.zeros(B, W, dtype=torch.long)
            for r in reqs:
                c, s = rows[r.id], r.seqs[0].slot
                ids[s, :c] = torch.tensor(r.ids[r.prefilled:r.prefilled + c], dtype=torch.long)
                counts[s] = c
            # explicit positions: the rows past a slot's count are never used, but must index the table
            pos = (self.cache.seqlens.long()[:, None].cpu() + torch.arange(W)).clamp(
                max=self.model.config.max_position - 1)
            try:
                h = forward_rows(self.model, self.model.embed(ids.to(self.device)), self.cache,
                                 counts.to(self.device), pos.to(self.device))
            except Exception as err:  # the pass failed: every request in it fails, the others go on
                for r in reqs:
                    self._fail(r, err)
                return
            for r in reqs:
                if rows[r.id]:
                    last[r.id] = h[r.seqs[0].slot, rows[r.id] - 1]
        for r in reqs:
            r.prefilled += rows[r.id]
            if r.prefilled == r.prefill_len:
                try:
                    self._start_decode(r, last.get(r.id))
                except Exception as err:
                    self._fail(r, err)

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
            self.forced[s, :len(r.forced)] = forced
            self.plan.forced_len[s] = len(r.forced)
            self.plan.latent_budget[s] = r.budget
            st.latent_left[s], st.forced_pos[s], st.next_token[s] = r.budget, 0, forced[0]
            st.n_out[s] = st.n_latents[s] = st.low_run[s] = 0
            st.done[s] = False
        r.phase = _DECODE

    def _decode(self) -> None:
        """One row per decoding sample: the model pass, the stop rules, the next thoughts, the sampled tokens,
        their log-probs, and the samples that end."""
        st, plan, model = self.state, self.plan, self.model
        active = ~st.done
        act_h = active.tolist()
        if not any(act_h):
            return
        tok, in_lat, in_forced = st.inputs(self.forced, plan)
        self.s_tok.copy_(tok)
        self.s_fed.copy_(self.fed)
        self.s_use.copy_(in_lat)
        self.s_act.copy_(active)
        seqs = [self.slots[s] for s in range(self.max_batch) if act_h[s]]
        try:
            normed, logits = self.dec.run(self.s_tok, self.s_fed, self.s_use, self.s_act)
        except Exception as err:  # the pass failed: every request in it fails, the others go on
            for r in {id(q.req): q.req for q in seqs}.values():
                self._fail(r, err)
            return
        lat_h = in_lat.tolist()
        for seq in seqs:
            if seq.req.params.return_latents and lat_h[seq.slot]:
                seq.latents.append(self.fed[seq.slot].clone())
        self._update_stop(seqs, logits, in_lat, in_forced)
        sampled = logits.argmax(-1)
        failed = {}
        for seq in seqs:  # per sample: its own feedback, generator and sampling parameters
            s, r, p = seq.slot, seq.req, seq.req.params
            try:
                if r.fb.sequential and seq.it + 1 < r.budget:
                    self.fed[s] = thought_vector(model, r.fb, normed[s:s + 1], logits[s:s + 1],
                                                 seq.generator)[0].to(self.fed.dtype)
                if p.do_sample:
                    sampled[s] = sample_tokens(logits[s:s + 1], do_sample=True, temperature=p.temperature,
                                               top_k=p.top_k, top_p=p.top_p, generator=seq.generator)[0]
            except Exception as err:
                failed[id(r)] = (r, err)
        n_before = st.n_out.clone()
        st.emit(sampled, in_lat, plan, self.lm.eos_token_id)
        emitted = (st.n_out > n_before).tolist()
        sampled_h, done_h = sampled.tolist(), st.done.tolist()
        raw = logits.float().log_softmax(-1)
        for seq in seqs:
            s, r, p, out = seq.slot, seq.req, seq.req.params, seq.sample
            seq.it += 1
            if id(r) in failed:
                continue
            if emitted[s]:
                t = sampled_h[s]
                out.token_ids.append(t)
                out.model_logprobs.append(float(raw[s, t]))
                if p.do_sample:
                    filt = _filter_logits(logits[s:s + 1].float() / p.temperature, p.top_k, p.top_p)
                    out.logprobs.append(float(filt.log_softmax(-1)[0, t]))
                else:
                    out.logprobs.append(0.0)
                stop = t == self.lm.eos_token_id or t in p.stop_token_ids
                if stop or len(out.token_ids) >= p.max_tokens or done_h[s]:
                    out.finish_reason = "stop" if stop else "length"
            elif done_h[s]:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                self._retire(seq)
        for r, err in failed.values():
            self._fail(r, err)
        for r in [r for r in self.running if all(q.sample.finish_reason for q in r.seqs)]:
            self.running.remove(r)
            self._finished.append(RequestOutput(r.id, r.ids, [q.sample for q in r.seqs]))

    def _update_stop(self, seqs, logits, in_lat, in_forced) -> None:
        """DecodeState.update_stop once per distinct stop rule among the running samples, on their rows only
        (the other rows' low-entropy runs kept)."""
        groups: dict = {}
        for seq in seqs:
            groups.setdefault(seq.req.rule_key, (seq.req.rule, []))[1].append(seq.slot)
        st = self.state
        for rule, slots in groups.values():
            g = torch.zeros_like(in_lat)
            g[slots] = True
            low = st.low_run.clone()
            st.update_stop(rule, logits, in_lat & g, in_forced & g, self.lm.end_latent_id)
            st.low_run = torch.where(g, st.low_run, low)

    def _retire(self, seq: _Seq) -> None:
        """Free the sample's slot (its cache rows are overwritten by the next occupant)."""
        s = seq.slot
        seq.sample.n_latents = int(self.state.n_latents[s])
        if seq.latents:
            seq.sample.latents = torch.stack(seq.latents)
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
