"""COCONUT on the model layer: `LatentLM`, the multi-pass training forward and batched latent decoding.

A batch is planned once on the host (`latent_plan`: where the latents are, which rows each pass computes);
every pass then runs the model over its rows against one preallocated KVCache (ragged: each example at its own
positions, no compute on pads), feeds the final-normed last hidden state back with the fused `latent_feedback`
op, and the loss is taken at labelled positions only, in chunks (`linear_cross_entropy`). The steps that run a
plan are shared with generation (`latent_steps`, `latent_decode`).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import latent_decode, latent_jacobi, validation
from .errors import CoconutError
from .feedback import Feedback, resolve_feedback
from .latent_decode import GenerateOutput, Sampling, parse_stop, sample_tokens
from .latent_plan import IGNORE_INDEX, BatchPlan, PassRows, jacobi_passes, pass_rows, plan_batch
from .latent_steps import EmbedRows, feed_hidden, forward_rows, head_logits, labelled_loss, pass_input, scale_grad
from .markers import LatentIds, resolve_ids
from .models.linear import batched_weight_grads

__all__ = ["LatentLM", "LatentOutput", "GenerateOutput", "plan_batch", "sample_tokens", "parse_stop",
           "IGNORE_INDEX"]


@dataclass
class LatentOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None = None  # (B, T, V), only with return_logits=True
    n_tokens: int = 0  # labelled positions the loss averages over


@dataclass
class KeptRows:
    """What the passes keep for the loss and the logits: the pre-norm hidden rows that have a label with those
    labels, and (return_logits) every real row with its (example, column)."""
    hidden: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    logit_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, h: torch.Tensor, rows: PassRows, with_logits: bool) -> None:
        h2 = h.reshape(-1, h.shape[-1])
        # A pass without labelled rows (every one-row latent pass, as a rule) adds nothing; the first pass always
        # adds its (possibly empty) rows, so the loss has something to concatenate.
        if rows.loss_rows.numel() or not self.hidden:
            self.hidden.append(h2.index_select(0, rows.loss_rows))
            self.targets.append(rows.targets)
        if with_logits:
            valid = rows.valid_rows
            self.logit_rows.append((h2.index_select(0, valid), valid // rows.width, rows.col_flat[valid]))


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

    latent_schedule (forward and generate): "sequential" (default, the official algorithm: one pass per thought)
    or "jacobi" with jacobi_iters=T (PCCoT, `coconut_kernels.latent_jacobi`: T passes that each compute all n
    thoughts of every example, row s + i fed from row s + i - 1 of the previous iteration; the first iteration
    feeds the thoughts after the first one the <latent> token's embedding). With T >= n the result equals the
    sequential schedule's. "pause" feedback has no thought chain: both schedules are its one plain pass.

    feedback_grad_scale (forward, 0..1): the gradient from each fed vector into the hidden state it was made from
    is multiplied by it; the forward is unchanged. 1 (default) is the official full gradient through the chain
    of thoughts. Below 1 the gradient that reaches a thought through k feedback steps is damped by scale**k (the
    thought's rows still get the full gradient of every later row that attends to them): truncated
    backpropagation through the chain, 0 stops it. (On README "Walking back from the options"'s runs it
    lowered the gradient spikes of long soft chains but did not prevent their collapse.)
    """

    def __init__(self, model: nn.Module, latent_token_id: int | None = None, start_latent_id: int | None = None,
                 end_latent_id: int | None = None, eos_token_id: int | None = None, *, tokenizer=None,
                 feedback: str | Feedback = "hidden"):
        validation.check_latent_lm(model, feedback)
        super().__init__()
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
        return LatentIds(self.start_latent_id, self.end_latent_id, self.latent_token_id)

    @classmethod
    def from_pretrained(cls, path, *, latent_token_id: int | None = None, start_latent_id: int | None = None,
                        end_latent_id: int | None = None, eos_token_id: int | None = None, tokenizer=None,
                        dtype=None, device=None, **kwargs) -> "LatentLM":
        """A Hugging Face folder (config.json + safetensors) and its tokenizer (tokenizer.json, or vocab.json +
        merges.txt): ids not given are read from the tokenizer, the three markers added to it and to the
        model in the official order when it lacks them (`coconut_kernels.add_latent_tokens`). In eval mode, as
        transformers returns a model: `.train()` turns the checkpoint's dropout on."""
        from .models.loading import load_pretrained

        if not isinstance(path, (str, os.PathLike)):
            raise CoconutError(f"path must be a Hugging Face checkpoint folder (a str or os.PathLike path), got "
                               f"{type(path).__name__}")
        unknown = sorted(set(kwargs) - {"feedback"})
        if unknown:
            raise CoconutError(f"from_pretrained got unknown keyword argument(s) {unknown}: expected the ids, "
                               "tokenizer, dtype, device or feedback")
        model, tokenizer = load_pretrained(path, tokenizer=tokenizer, dtype=dtype, device=device,
                                           need_tokenizer=None in (latent_token_id, start_latent_id, end_latent_id,
                                                                   eos_token_id))
        lm = cls(model, latent_token_id, start_latent_id, end_latent_id, eos_token_id, tokenizer=tokenizer, **kwargs)
        return lm.eval()

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, normed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                return_logits: bool = False, latent_schedule: str = "sequential",
                jacobi_iters: int | None = None, feedback_grad_scale: float = 1.0) -> LatentOutput:
        validation.check_inputs(input_ids, attention_mask, labels, position_ids,
                                device=self.model.lm_head_weight.device, return_logits=return_logits)
        validation.check_schedule(latent_schedule, jacobi_iters)
        feedback_grad_scale = validation.check_real(feedback_grad_scale, "feedback_grad_scale", low=0.0, high=1.0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        jacobi = latent_schedule == "jacobi"
        plan, passes = self.plan_passes(input_ids, attention_mask, labels, position_ids, jacobi=jacobi)
        kept = self.run_passes(input_ids, position_ids, plan, passes, with_logits=return_logits,
                               jacobi_iters=jacobi_iters if jacobi else None,
                               feedback_grad_scale=feedback_grad_scale)
        loss, n_tok = (None, 0) if labels is None else labelled_loss(self.model, kept.hidden, kept.targets)
        logits = self._scatter_logits(kept.logit_rows, input_ids) if return_logits else None
        return LatentOutput(loss=loss, logits=logits, n_tokens=n_tok)

    def plan_passes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, *,
                    jacobi: bool = False) -> tuple[BatchPlan, list[PassRows]]:
        """The batch's plan, and every pass's index tensors (sequential, or the Jacobi passes when jacobi and the
        batch has latents) on input_ids' device (one copy). The training step's one host sync: the pass structure
        depends on where the latents are; the batch's values are checked on the same host copies
        (validation.check_batch)."""
        ids_h, mask_h = input_ids.cpu(), attention_mask.cpu()
        labels_h = labels.cpu() if labels is not None else None
        latent_id = self.latent_token_id if self.feedback.sequential else -1
        validation.check_batch(ids_h, mask_h, labels_h, position_ids, **validation.batch_rules(self, latent_id))
        plan = plan_batch(ids_h, mask_h, latent_id)
        spans = jacobi_passes(plan) if jacobi and len(plan.passes) > 1 else None
        return plan, pass_rows(plan, labels_h, input_ids.shape[1], input_ids.device, spans)

    def run_passes(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, plan: BatchPlan,
                   passes: list[PassRows], *, with_logits: bool = False,
                   jacobi_iters: int | None = None, feedback_grad_scale: float = 1.0) -> KeptRows:
        """Run the plan's passes against one fresh cache: each pass's input rows (the latent step writes the
        vectors the previous pass fed), the model over them, then the feedback its hidden state produces. With
        jacobi_iters, `passes` are the Jacobi passes (plan_passes(jacobi=True)) and run as latent_jacobi says.
        feedback_grad_scale multiplies the gradient from each fed vector into the hidden state it was made from
        (forward unchanged; 1 is the official full gradient, see `forward`)."""
        model = self.model
        embeds = EmbedRows(model.embed(input_ids))
        fed, kept = None, KeptRows()
        # Several passes under grad: each layer's weight gradient is one product over every pass's rows
        # (models.linear), not one per pass plus a sum.
        multi_pass = torch.is_grad_enabled() and sum(rows.width > 0 for rows in passes) > 1
        with batched_weight_grads() if multi_pass else nullcontext():
            if jacobi_iters is not None and len(passes) > 1:
                latent_jacobi.run_jacobi(model, self.feedback, embeds, position_ids, plan, passes, jacobi_iters,
                                         lambda h, rows: kept.add(h, rows, with_logits), feedback_grad_scale)
                return kept
            cache = model.new_cache(plan.batch, max(plan.max_len, 1), device=input_ids.device)
            for rows in passes:
                if rows.width == 0:
                    continue
                pos = position_ids.gather(1, rows.col) if position_ids is not None else None
                h = forward_rows(model, pass_input(embeds, rows, fed), cache, rows.count, pos)
                if rows.produce.numel():
                    dst = h.new_zeros(plan.batch, 1, h.shape[-1]) if fed is None else fed
                    fed = feed_hidden(model, self.feedback, dst, scale_grad(h, feedback_grad_scale), rows.produce,
                                      rows.src)
                kept.add(h, rows, with_logits)
        return kept

    def _scatter_logits(self, logit_rows, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits, zero at pads, from the rows the passes kept."""
        model = self.model
        V = model.lm_head_weight.shape[0]
        acc = torch.float64 if model.lm_head_weight.dtype == torch.float64 else torch.float32
        logits = torch.zeros(*input_ids.shape, V, dtype=acc, device=input_ids.device)
        for rows, b, c in logit_rows:
            logits = logits.index_put((b, c), self._logits(model.final_norm(rows)))
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, feedback=None, stop=None,
                 return_latents: bool = False, use_cuda_graph: bool = True,
                 generator: torch.Generator | None = None, pad_token_id: int | None = None,
                 latent_schedule: str = "sequential", jacobi_iters: int | None = None) -> GenerateOutput:
        """Batched latent reasoning then KV-cached decoding of the answer.

        input_ids (B, T): prompts `question <bot> <latent>*k <eot>`, left-padded (attention_mask 0 on the left)
        or right-padded, k differing per example (0 allowed with stop=None). One ragged prefill up to each
        first latent, then one token per example per step: the fed-back vector while the example thinks,
        its remaining prompt tokens (<eot>), then its own tokens until eos_token_id or max_new_tokens.

        feedback: None (this model's mode) or a mode name / Feedback module (see `coconut_kernels.feedback`).
        stop: None / "fixed" (the prompt's k latents), "eot" (end the thought when <eot> is the argmax at a
        latent step), "entropy" / ("entropy", tau, m[, max]) (after m consecutive steps with entropy < tau);
        ("eot", max) and the entropy form's max raise the latent budget above the prompt's k.
        latent_schedule="jacobi" with jacobi_iters=T: every example's k thoughts in T iterations over the batch
        (see the class docstring; only with the prompt's k latents, stop None / "fixed"), then decoding as above.
        Sampling: greedy (do_sample=False) or temperature / top_k / top_p with an optional seeded generator.
        On CUDA with use_cuda_graph the model step is captured once as a CUDA graph over static buffers (if
        the capture or its first replay raises, one RuntimeWarning and eager decoding, with the same output);
        the loop syncs the host only to check, every few steps, whether every example has ended.

        Returns GenerateOutput: tokens (B, max_new_tokens) padded with pad_token_id (default: EOS), lengths
        (EOS included when emitted), n_latents, and with return_latents the vector fed at every latent step
        (latents), the normed hidden state it was made from (latent_states: for "hidden" feedback the same
        vector) and that state's top-5 read-out through the LM head (probabilities, ids): the distribution the
        model gave where it thought, which for "soft" / "mixture" is what weighted the fed embedding mix.
        """
        validation.check_generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, feedback=feedback, stop=stop,
                                  return_latents=return_latents, use_cuda_graph=use_cuda_graph, generator=generator)
        validation.check_schedule(latent_schedule, jacobi_iters, stop=stop)
        fb = self.feedback if feedback is None else resolve_feedback(feedback, self.model.config.d_model)
        rule = parse_stop(stop)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        sampling = Sampling(do_sample, temperature, top_k, top_p, generator)
        return latent_decode.generate(self, fb, rule, sampling, input_ids, attention_mask,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      pad_token_id=eos if pad_token_id is None else pad_token_id,
                                      return_latents=return_latents, use_cuda_graph=use_cuda_graph,
                                      jacobi_iters=jacobi_iters if latent_schedule == "jacobi" else None)
