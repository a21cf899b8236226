"""The reference COCONUT algorithm, re-implemented faithfully on a `transformers` causal LM.

This is the baseline of every training and generation benchmark and the oracle of the LatentLM tests. It
keeps the reference code's costs on purpose: one full HF forward per pass with the whole past K/V handed
back (HF concatenates it in every layer and keeps each copy for backward), the B x T list-and-stack rebuild
of `inputs_embeds` after every pass, logits over the whole vocabulary at every position, `.item()` syncs,
and generation one example at a time with no KV cache after the latent phase.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F


def _trim_cache(cache, length: int):
    """The reference slices every layer's past K/V to `length` columns and hands it back as a list of (k, v)
    pairs. A model that returned that legacy format (transformers 4.46's GPT-2) gets it back in kind, as the
    reference code does; one that returned a `Cache` object gets a new `DynamicCache` of the slices, built
    by whichever constructor this transformers version has (`from_legacy_cache` until 4.x, `ddp_cache_data`
    in 5.x, which no longer takes pairs)."""
    layers = [(k[:, :, :length], v[:, :, :length]) for k, v, *_ in cache]
    if isinstance(cache, (tuple, list)):
        return layers
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(ddp_cache_data=layers)


class ReferenceCoconut(nn.Module):
    """`Coconut` of the reference repository: wraps a HF causal LM; the embedding at every latent token is
    the final-normed hidden state of the previous position."""

    def __init__(self, base_causallm, latent_token_id, start_latent_id, end_latent_id, eos_token_id):
        super().__init__()
        self.base_causallm = base_causallm
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.eos_token_id = eos_token_id
        self.embedding = base_causallm.get_input_embeddings()
        # The past K/V argument and output are `past_key_values` up to transformers 5.2x and `cache` after
        # (where `past_key_values` warns, then goes).
        self._cache = "cache" if "cache" in inspect.signature(base_causallm.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, labels, position_ids):
        B, T = input_ids.shape
        latent_indices = (input_ids == self.latent_token_id).nonzero()
        latent_lists = [[idx[1].item() for idx in latent_indices if idx[0] == b] for b in range(B)]
        max_n_latents = max(len(lst) for lst in latent_lists)
        inputs_embeds = self.embedding(input_ids)
        compute_range = (0, T) if max_n_latents == 0 else (0, latent_indices[:, 1].min().item())
        kv_cache, all_logits = None, []

        for pass_idx in range(max_n_latents):
            r0, r1 = compute_range
            if kv_cache is None:
                out = self.base_causallm(inputs_embeds=inputs_embeds[:, r0:r1], attention_mask=attention_mask[:, r0:r1],
                                         position_ids=position_ids[:, r0:r1], output_hidden_states=True)
                offset = 0
            else:
                out = self.base_causallm(inputs_embeds=inputs_embeds[:, r0:r1], attention_mask=attention_mask[:, :r1],
                                         position_ids=position_ids[:, r0:r1], **{self._cache: _trim_cache(kv_cache, r0)},
                                         output_hidden_states=True)
                offset = r0
            all_logits.append(out.logits)
            compute_range = (r1, T if pass_idx + 1 >= max_n_latents else r1 + 1)
            hidden = out.hidden_states[-1]
            kv_cache = out[self._cache]
            # The reference rebuilds inputs_embeds from a B x T list of row slices ("to avoid in-place ops").
            rows = [[inputs_embeds[b, pos, :] for pos in range(T)] for b in range(B)]
            for b, lst in enumerate(latent_lists):
                if len(lst) > pass_idx:
                    pos = lst[pass_idx]
                    rows[b][pos] = hidden[b, pos - 1 - offset, :]
            inputs_embeds = torch.stack([torch.stack(r) for r in rows])

        r0, r1 = compute_range
        out = self.base_causallm(inputs_embeds=inputs_embeds[:, r0:r1], attention_mask=attention_mask[:, :r1],
                                 position_ids=position_ids[:, r0:r1],
                                 **{self._cache: _trim_cache(kv_cache, r0) if kv_cache is not None else None},
                                 output_hidden_states=True)
        all_logits.append(out.logits)
        logits = torch.cat(all_logits, dim=-2)
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        return loss, logits, inputs_embeds

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16):
        """Greedy decoding of ONE example (batch size 1), as the reference: the latent phase through
        forward(), then the whole sequence re-run for every new token, with no KV cache. Returns the new
        tokens (without the EOS that stopped it)."""
        if input_ids.shape[0] != 1:
            raise ValueError("the reference generate accepts batch size 1 only")
        T = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        labels = input_ids.clone()
        positions = torch.arange(T, device=input_ids.device)[None]
        _, logits, embeds = self.forward(input_ids, mask, labels, positions)
        tokens = [int(logits[0, -1].argmax())]
        new_embed = self.embedding(torch.tensor(tokens[-1:], device=input_ids.device))[None]
        embeds = torch.cat((embeds, new_embed), dim=1)
        for _ in range(max_new_tokens - 1):
            out = self.base_causallm(inputs_embeds=embeds)
            token = int(out.logits[0, -1].argmax())
            if token == self.eos_token_id:  # the reference stops without emitting EOS (but for a first-token EOS)
                break
            tokens.append(token)
            new_embed = self.embedding(torch.tensor(tokens[-1:], device=input_ids.device))[None]
            embeds = torch.cat((embeds, new_embed), dim=1)
        return torch.tensor(tokens, device=input_ids.device)
