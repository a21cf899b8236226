"""Batched latent decoding (`LatentLM.generate`): sampling, the stop rules of a thought, every example's state
in the decode loop, and the decode step, captured once as a CUDA graph on a GPU.

After one ragged prefill (`latent_plan.DecodePlan`), every step feeds one row per example: a fed-back vector
while the example thinks, its remaining prompt tokens (<eot>) next, then its own sampled tokens. The examples
move through these phases independently (per-sequence cache lengths), all on the device; the loop syncs the
host only every few steps, to see whether every example has ended.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import validation
from .errors import CoconutError
from .feedback import Feedback
from .latent_jacobi import jacobi_thoughts
from .latent_plan import DecodePlan, plan_batch, plan_decode
from .latent_steps import forward_rows, head_logits, thought_vector
from .ops import sampling as sampling_ops
from .ops.argmax import argmax_last


@dataclass
class GenerateOutput:
    tokens: torch.Tensor                      # (B, max_new_tokens) new tokens, pad_token_id after each end
    lengths: torch.Tensor                     # (B,) new tokens per example (EOS included when emitted)
    n_latents: torch.Tensor                   # (B,) latent steps each example ran
    latents: torch.Tensor | None = None       # (B, max latents, d) the vector fed at every latent step
    latent_states: torch.Tensor | None = None  # (B, max latents, d) the normed hidden state each came from
    latent_topk_ids: torch.Tensor | None = None    # (B, max latents, k): what each thought decodes to
    latent_topk_probs: torch.Tensor | None = None  # (B, max latents, k)


# ---- sampling ------------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (n, V) with -inf outside the top-k (0: no limit) and outside the smallest nucleus reaching top_p
    (1.0: no limit); the top token always stays. `sample_tokens` draws from softmax(filter_logits(logits / T)),
    so the log-probability of a drawn token is log_softmax of the same filtered logits."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(_outside_nucleus(logits, top_p), float("-inf"))
    return logits


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool (n, V): the tokens outside each row's smallest nucleus reaching top_p, in the order of probability: a
    token is out when the mass of the tokens before it already reaches top_p. On the CPU only the largest k
    probabilities are sorted (topk), k = 64, 512, 4096, ... until every row's nucleus ends among them (a row's
    k-th token is out, so every later one is): a full sort of a 50k vocabulary costs ~70 ms on a (32, 50257)
    batch on 2 CPU threads, where a peaked row's nucleus fits in the top 64 (3 ms). On a GPU one full sort,
    which needs no host sync (the check between the steps would)."""
    probs = logits.softmax(-1)
    V = logits.shape[-1]
    k = min(64, V) if logits.device.type == "cpu" else V
    while True:
        top, order = probs.topk(k, dim=-1)                      # sorted, largest first
        out = top.cumsum(-1) - top >= top_p                     # the mass before it already reaches top_p
        if k == V or bool(out[:, -1].all()):
            break
        k = min(V, 8 * k)
    return torch.ones_like(logits, dtype=torch.bool).scatter_(-1, order, out)


CANNOT_SAMPLE = ("cannot sample: a row of probabilities has a NaN, an infinity, or no positive mass (are the logits "
                 "finite?)")


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None = None,
                     uniforms: torch.Tensor | None = None, *, with_ok: bool = False):
    """One index per row of probs (n, V), index j drawn with probability probs[i, j] / sum_j probs[i, j], by
    inverting the row's cumulative sum (in float64) at one uniform draw per row. An index of zero probability
    is never drawn. `uniforms` (n,) float64 in [0, 1) replaces the draws from `generator` (the engine draws
    each row from its own request's generator).

    A row with a NaN, an infinity or no positive mass cannot be sampled: on the CPU that raises, unless
    with_ok, which returns (indices, ok (n,) bool) instead and leaves the bad rows' indices meaningless (in
    range). On a GPU nothing is checked (a check would sync); the indices stay in range.

    The same distribution as `torch.multinomial(probs, 1)`, from one random number per row where that draws
    one exponential per vocabulary entry (about 1 ms per 50k-entry row on a CPU core): the random stream, so
    the tokens a given seed gives, differ from torch.multinomial's (README, "Sampling"). On the CPU (float32 or
    float64 probs, `ops.sampling` switch on) the C++ kernel computes the same index without writing the float64
    cumulative sums (the uniforms are then drawn before the rows are checked)."""
    if uniforms is not None and tuple(uniforms.shape) != (probs.shape[0],):
        raise CoconutError(f"uniforms must have shape ({probs.shape[0]},): one per row of probs, got "
                           f"{tuple(uniforms.shape)}")
    if sampling_ops.applies(probs):  # the same index from the CPU kernel, without the (n, V) float64 copy
        if uniforms is None:
            uniforms = _uniforms(probs, generator)
        idx, ok = torch.ops.coconut.draw_categorical(probs, uniforms.to("cpu", torch.float64))
        if not with_ok and not bool(ok.all()):
            raise CoconutError(CANNOT_SAMPLE)
        return (idx, ok) if with_ok else idx
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    ok = None
    if with_ok or probs.device.type == "cpu":
        ok = ((total > 0) & torch.isfinite(total))[:, 0]
        if not with_ok and not bool(ok.all()):
            raise CoconutError(CANNOT_SAMPLE)
    if uniforms is None:
        uniforms = _uniforms(probs, generator)
    target = torch.minimum(uniforms.to(cdf.device, torch.float64)[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))  # below the row's total mass
    # the first index whose cumulative mass exceeds the target: never one of zero probability (its cumulative
    # mass equals the index before it); clamped so a NaN row cannot index past the vocabulary
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(0, probs.shape[-1] - 1)
    return (idx, ok) if with_ok else idx


def _uniforms(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One float64 uniform per row of probs, drawn where the generator lives (a CPU generator may drive a GPU's
    sampling; no generator: probs' device)."""
    device = probs.device if generator is None else generator.device
    return torch.rand(probs.shape[0], dtype=torch.float64, device=device, generator=generator)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32; at temperature 1 the float32 logits themselves (no division, no copy)."""
    x = logits.float()
    return x if temperature == 1.0 else x / temperature


def sample_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy argmax, or a draw (`draw_categorical`) from softmax(filtered logits / temperature)."""
    if not do_sample:
        return argmax_last(logits)
    probs = filter_logits(scaled_logits(logits, temperature), top_k, top_p).softmax(-1)
    return draw_categorical(probs, generator)


@dataclass
class Sampling:
    """How answer tokens are drawn (see sample_tokens)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_tokens(logits, do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, generator=self.generator)


# ---- stop rules ----------------------------------------------------------------------------------------------


@dataclass
class StopRule:
    """When a thought ends: "fixed" (the prompt's latent count), "eot" (<eot> is the argmax at a latent step) or
    "entropy" (`patience` consecutive latent steps with entropy < threshold); max_latents raises the budget."""
    kind: str              # "fixed" | "eot" | "entropy"
    threshold: float = 0.0
    patience: int = 1
    max_latents: int | None = None


def parse_stop(stop) -> StopRule:
    """stop: None / "fixed" (the prompt's latent count), "eot", ("eot", max), "entropy", ("entropy", tau, m),
    ("entropy", tau, m, max), or a dict with those keys (kind, threshold, patience, max_latents)."""
    validation.check_stop(stop)
    if stop is None or stop == "fixed":
        return StopRule("fixed")
    if isinstance(stop, dict):
        kind = stop.get("kind")
        return StopRule(**stop) if kind in ("fixed", "eot", "entropy") else parse_stop(stop.get("kind", "?"))
    if stop == "eot":
        return StopRule("eot")
    if stop == "entropy":
        return StopRule("entropy", threshold=0.1, patience=2)
    if isinstance(stop, (tuple, list)) and stop and stop[0] in ("eot", "entropy"):
        if stop[0] == "eot":
            return StopRule("eot", max_latents=stop[1] if len(stop) > 1 else None)
        return StopRule("entropy", threshold=float(stop[1]), patience=int(stop[2]) if len(stop) > 2 else 1,
                        max_latents=stop[3] if len(stop) > 3 else None)
    raise ValueError(f"stop must be None, 'fixed', 'eot', 'entropy', ('eot', max), ('entropy', tau, m[, max]) "
                     f"or a dict; got {stop!r}")


# ---- every example's state in the loop -----------------------------------------------------------------------


@dataclass
class DecodeState:
    """Where each example is in its phases and the stop rule's state, on the device (no host sync): latent
    steps left, position in its forced prompt rows, the run of low-entropy latent steps, and the output."""
    latent_left: torch.Tensor  # (B,) latent steps the example may still take
    forced_pos: torch.Tensor   # (B,) forced prompt rows already fed
    next_token: torch.Tensor   # (B,) the token to feed once the prompt is used up
    done: torch.Tensor         # (B,) bool: ended (EOS or max_new_tokens)
    tokens: torch.Tensor       # (B, max_new_tokens) output, pad_token_id where not written
    n_out: torch.Tensor        # (B,) tokens written
    n_latents: torch.Tensor    # (B,) latent steps taken
    low_run: torch.Tensor      # (B,) consecutive low-entropy latent steps (entropy rule)
    rows: torch.Tensor         # (B,) arange: the row index of the output writes

    @classmethod
    def start(cls, plan: DecodePlan, forced: torch.Tensor, max_new_tokens: int, pad_token_id: int):
        B, device = forced.shape[0], forced.device
        zeros = [torch.zeros(B, dtype=torch.long, device=device) for _ in range(4)]
        return cls(plan.latent_budget, zeros[0], forced[:, 0].clone(), torch.zeros(B, dtype=torch.bool, device=device),
                   torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device), *zeros[1:],
                   torch.arange(B, device=device))

    def inputs(self, forced: torch.Tensor, plan: DecodePlan):
        """(token, thinking, forced) of this step: whether each example feeds a vector (thinking), a prompt row
        (forced: that row's token) or its last token."""
        in_lat = (self.latent_left > 0) & ~self.done
        in_forced = ~in_lat & (self.forced_pos < plan.forced_len)
        tok = torch.where(in_forced, forced.gather(1, self.forced_pos.clamp(max=plan.n_forced - 1)[:, None])[:, 0],
                          self.next_token)
        return tok, in_lat, in_forced

    def update_stop(self, rule: StopRule, logits: torch.Tensor, in_lat, in_forced, end_latent_id: int) -> None:
        """Count the step's latents and forced rows, and end the thoughts the stop rule ends."""
        self.n_latents += in_lat
        stop_now = torch.zeros_like(in_lat)
        if rule.kind == "eot":
            stop_now = in_lat & (argmax_last(logits) == end_latent_id)
        elif rule.kind == "entropy":
            logp = logits.log_softmax(-1)
            ent = -(logp.exp() * logp).sum(-1)
            low = in_lat & (ent < rule.threshold)
            self.low_run = torch.where(low, self.low_run + 1, torch.zeros_like(self.low_run))
            stop_now = in_lat & (self.low_run >= rule.patience)
        self.latent_left = torch.where(stop_now, torch.zeros_like(self.latent_left), self.latent_left - in_lat.long())
        self.forced_pos = self.forced_pos + in_forced.long()

    def emit(self, sampled: torch.Tensor, in_lat, plan: DecodePlan, eos: int) -> None:
        """Write the sampled token where this step's output is a new token: the example fed its last prompt
        token or its own previous token, or its last latent with no prompt after it."""
        emit = ~self.done & torch.where(in_lat, (self.latent_left <= 0) & (plan.forced_len == 0),
                                        self.forced_pos >= plan.forced_len)
        max_new, rows = self.tokens.shape[1], self.rows
        slot = self.n_out.clamp(max=max_new - 1)
        self.tokens[rows, slot] = torch.where(emit, sampled, self.tokens[rows, slot])
        self.n_out = self.n_out + emit.long()
        self.next_token = torch.where(emit, sampled, self.next_token)
        self.done = self.done | (emit & (sampled == eos)) | (self.n_out >= max_new)


# ---- the decode step -----------------------------------------------------------------------------------------


def _graphs_supported(device: torch.device) -> bool:
    """Whether the decode step may be captured as a CUDA graph on `device` (a seam the tests force on CPU)."""
    return device.type == "cuda"


class DecodeStep:
    """One decode step of a batch over one KVCache (`.cache`, batch B, max_len rows per sequence), eager or
    captured once as a CUDA graph over static buffers. Used by `generate` and by `engine.LatentEngine`.

    run(tokens, fed, use_fed, active) feeds one row per sequence: fed[b] (B, d) where use_fed[b] (a thought),
    else the embedding of tokens[b] (B,); sequences with active[b] False append nothing. It returns the row's
    final-normed hidden state (B, d) and its LM-head logits (B, V) in fp32. head_rows (eager only): a (n,) index
    of the rows whose logits are wanted: the logits are then (n, V), in head_rows' order, and the LM head, the
    largest matmul of a step, runs on those n rows only. A captured graph has fixed shapes: it always returns
    every row's logits (B, V).
    """

    def __init__(self, lm, B: int, max_len: int, device, use_graph: bool):
        self.lm, self.model = lm, lm.model
        self.cache = self.model.new_cache(B, max_len, device=device)
        self.graph = None
        self.use_graph = use_graph and _graphs_supported(torch.device(device))

    def step(self, tokens: torch.Tensor, fed: torch.Tensor, use_fed: torch.Tensor, active: torch.Tensor,
             head_rows: torch.Tensor | None = None):
        """The eager step (see the class); the graph records this."""
        x = self.model.embed(tokens[:, None])
        x = torch.where(use_fed[:, None, None], fed[:, None].to(x.dtype), x)
        h = forward_rows(self.model, x, self.cache, active)
        normed = self.model.final_norm(h[:, 0])
        return normed, head_logits(self.model, normed if head_rows is None else normed[head_rows])

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

    def run(self, tokens, fed, use_fed, active, head_rows: torch.Tensor | None = None):
        """One decode step: replayed from the graph (captured at the first step) when graphs are on, else eager.
        If the capture or the first replay raises, warn once and decode eagerly from then on, from the cache
        lengths before the attempt (rows it wrote past them are rewritten): the output is the eager one."""
        if not self.use_graph:
            return self.step(tokens, fed, use_fed, active, head_rows)
        if self.graph is not None:
            return self.replay()
        seqlens = self.cache.seqlens.clone()
        try:
            self.capture(tokens, fed, use_fed, active)
            return self.replay()
        except Exception as err:  # any failure of the graph path: the eager path shares none of its state
            warnings.warn(f"generate: CUDA-graph capture of the decode step failed ({type(err).__name__}: {err}); "
                          "decoding eagerly (use_cuda_graph=False skips the attempt)", RuntimeWarning, stacklevel=2)
            self.use_graph, self.graph = False, None
            self.cache.seqlens.copy_(seqlens)
        return self.step(tokens, fed, use_fed, active, head_rows)


# ---- generation ----------------------------------------------------------------------------------------------


def thought_topk(model, states: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What thoughts read as tokens: the ids (n, k) and probabilities (n, k) of the k most likely tokens of
    softmax(LM head(states)), for states (n, d) the normed hidden states the thoughts were made from (see
    `return_latents`): the next-token distribution the model gave where it thought. For "hidden" feedback the
    state is the fed vector itself; a "soft" or "mixture" thought is an embedding mix, which the LM head does not
    read (near-uniform), and its state's read-out is the distribution that weighted the mix."""
    p = head_logits(model, states.to(model.lm_head_weight.dtype)).softmax(-1).topk(k, dim=-1)
    return p.indices, p.values


class _Readout:
    """return_latents: the vector fed at every latent step, the normed state it was made from, and that state's
    top-k read-out through the LM head."""

    def __init__(self, k: int):
        self.k, self.latents, self.states, self.ids, self.probs = k, [], [], [], []

    def record(self, model, fed: torch.Tensor, state: torch.Tensor, in_lat: torch.Tensor) -> None:
        keep = in_lat[:, None]
        self.latents.append(torch.where(keep, fed, torch.zeros_like(fed)))
        self.states.append(torch.where(keep, state.to(fed.dtype), torch.zeros_like(fed)))
        ids, probs = thought_topk(model, state, self.k)
        self.ids.append(ids)
        self.probs.append(torch.where(keep, probs, torch.zeros_like(probs)))

    def fill(self, res: GenerateOutput) -> None:
        res.latents = torch.stack(self.latents, 1) if self.latents else None
        res.latent_states = torch.stack(self.states, 1) if self.states else None
        res.latent_topk_ids = torch.stack(self.ids, 1) if self.ids else None
        res.latent_topk_probs = torch.stack(self.probs, 1) if self.probs else None


class _Generation:
    """One generate call: the prefill, then the decode loop over a DecodeState."""

    def __init__(self, lm, fb: Feedback, rule: StopRule, sampling: Sampling, plan: DecodePlan, input_ids,
                 eos: int, use_cuda_graph: bool, readout: _Readout | None):
        self.lm, self.model, self.fb, self.rule, self.sampling = lm, lm.model, fb, rule, sampling
        self.plan, self.input_ids, self.eos, self.readout = plan, input_ids, eos, readout
        B, device = input_ids.shape[0], input_ids.device
        self.dec = DecodeStep(lm, B, plan.total, device, use_cuda_graph)
        d, dtype = self.model.config.d_model, self.model.embed_tokens.weight.dtype
        # Static step buffers (a CUDA graph replays over them).
        self.s_tok = torch.zeros(B, dtype=torch.long, device=device)
        self.s_fed = torch.zeros(B, d, dtype=dtype, device=device)
        self.s_use = torch.zeros(B, dtype=torch.bool, device=device)
        self.s_act = torch.zeros(B, dtype=torch.bool, device=device)

    def next_thought(self, normed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The next fed vector, from the step's (normed, logits); with a read-out, the state it came from is kept
        (a copy: a CUDA graph's outputs are overwritten by the next replay)."""
        B, model = normed.shape[0], self.model
        if not self.fb.sequential:
            fed = model.embed(torch.full((B,), self.lm.latent_token_id, device=normed.device))
        else:
            fed = thought_vector(model, self.fb, normed, logits, self.sampling.generator).to(self.s_fed.dtype)
        if self.readout is not None:  # pause: a <latent> embedding, made from no state, reads as itself
            self.fed_state = normed.clone() if self.fb.sequential else fed
        return fed

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill pass (each prompt up to its first latent): (normed, logits) of each prompt's last
        prefilled row (zeros where there is no prefill pass)."""
        model, plan, ids = self.model, self.plan, self.input_ids
        normed = torch.zeros_like(self.s_fed)
        logits = torch.zeros(ids.shape[0], model.embed_tokens.weight.shape[0], device=ids.device)
        if plan.width > 0:
            h = forward_rows(model, model.embed(ids.gather(1, plan.prefill_cols)), self.dec.cache, plan.prefill)
            last = h.gather(1, (plan.prefill - 1).clamp(min=0)[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
            normed = model.final_norm(last)
            logits = head_logits(model, normed)
        return normed, logits

    def step(self, it: int, state: DecodeState, forced: torch.Tensor) -> None:
        """One decode step of every example: its input row, the model step, the stop rule, the next thought
        (every example starts thinking at step 0 and has stopped by step max_latents, so later steps feed no
        vector and a noisy feedback draws no random numbers for them), then the sampled token."""
        plan = self.plan
        tok, in_lat, in_forced = state.inputs(forced, plan)
        self.s_tok.copy_(tok)
        self.s_fed.copy_(self.fed)
        self.s_use.copy_(in_lat)
        self.s_act.copy_(~state.done)
        normed, logits = self.dec.run(self.s_tok, self.s_fed, self.s_use, self.s_act)
        if self.readout is not None and it < plan.max_latents and not self.thinking_done:
            self.readout.record(self.model, self.fed, self.fed_state, in_lat)
        state.update_stop(self.rule, logits, in_lat, in_forced, self.lm.end_latent_id)
        if self.fb.sequential and it + 1 < plan.max_latents and not self.thinking_done:
            self.fed = self.next_thought(normed, logits)
        state.emit(self.sampling(logits), in_lat, plan, self.eos)

    def jacobi(self, state: DecodeState, n_latents: torch.Tensor, iters: int) -> None:
        """Every example's thoughts in `iters` Jacobi iterations (latent_jacobi.jacobi_thoughts) after the prefill;
        the state then stands after the last thought, as the decode loop would leave it, with the token of an
        example whose prompt ends with its thoughts emitted."""
        model, dev = self.model, self.input_ids.device
        width = int(n_latents.max())
        lat = model.embed(torch.full((state.rows.shape[0], width), self.lm.latent_token_id, device=dev))
        fed, normed, logits, before = jacobi_thoughts(model, self.fb, self.dec.cache, self.fed, lat, n_latents,
                                                      iters, self.sampling.generator)
        thinking = state.latent_left > 0
        last = (state.latent_left - 1).clamp(min=0)
        if self.readout is not None:
            # Row i was fed from row i - 1 of the iteration before the last (row 0: the prefill; with one
            # iteration, rows past 0 hold their <latent> embedding, which is its own state).
            states = fed.clone()
            states[:, 0] = self.fed_state.to(fed.dtype)
            if before is not None and width > 1:
                states[:, 1:] = model.final_norm(before[:, :-1]).to(fed.dtype)
            for i in range(width):
                self.readout.record(model, fed[:, i].to(self.s_fed.dtype), states[:, i], state.latent_left > i)
        state.n_latents += state.latent_left
        state.latent_left = torch.zeros_like(state.latent_left)
        last_logits = logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        state.emit(self.sampling(last_logits), thinking, self.plan, self.eos)
        self.thinking_done = True

    def run(self, max_new_tokens: int, pad_token_id: int, check_every: int,
            jacobi: tuple[torch.Tensor, int] | None = None) -> GenerateOutput:
        """The prefill, the thoughts (jacobi: (host n_latents, iterations): all at once) and the decode loop."""
        self.fed = self.next_thought(*self.prefill())
        forced = self.input_ids.gather(1, self.plan.forced_cols)
        state = DecodeState.start(self.plan, forced, max_new_tokens, pad_token_id)
        self.thinking_done = False
        if jacobi is not None:
            self.jacobi(state, *jacobi)
        for it in range(self.plan.max_steps):
            self.step(it, state, forced)
            if (it + 1) % check_every == 0 and bool(state.done.all()):  # the loop's only host sync
                break
        res = GenerateOutput(tokens=state.tokens, lengths=state.n_out, n_latents=state.n_latents)
        if self.readout is not None:
            self.readout.fill(res)
        return res


def generate(lm, fb: Feedback, rule: StopRule, sampling: Sampling, input_ids, attention_mask, *, max_new_tokens: int,
             eos_token_id: int, pad_token_id: int, return_latents: bool, use_cuda_graph: bool, check_every: int = 4,
             readout_k: int = 5, jacobi_iters: int | None = None) -> GenerateOutput:
    """LatentLM.generate (see there) on checked arguments: plan (the prompts' markers checked), prefill, the
    thoughts (one per step, or with jacobi_iters all at once), decode."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ids_h, mask_h, max_pos = input_ids.cpu(), mask.cpu(), lm.model.config.max_position
    latent_id = lm.latent_token_id if fb.sequential else -1
    validation.check_batch(ids_h, mask_h, None, None, **validation.batch_rules(lm, latent_id),
                           max_new_tokens=max_new_tokens, stop_kind=rule.kind,
                           max_latents=rule.max_latents)
    plan = plan_batch(ids_h, mask_h, latent_id)
    dplan = plan_decode(plan, max_new_tokens, rule.max_latents, max_pos, input_ids.shape[1], input_ids.device)
    run = _Generation(lm, fb, rule, sampling, dplan, input_ids, eos_token_id, use_cuda_graph,
                      _Readout(readout_k) if return_latents else None)
    with torch.no_grad():
        jacobi = (plan.n_latents, jacobi_iters) if jacobi_iters is not None and dplan.max_latents > 0 else None
        return run.run(max_new_tokens, pad_token_id, check_every, jacobi)
