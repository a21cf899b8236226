"""What GPT-2 and the Llama family share: the attributes `latent.py` reads, the cache factory and the
plain full forward. Each family module defines the layers and the Hugging Face name mapping; this class
holds only what would otherwise be written twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import debug_checks
from ..cache import KVCache
from ..errors import CoconutError
from ..validation import check_device, check_dropout, check_dtype, check_ids, check_inputs, check_int, host_checks


class CausalLM(nn.Module):
    """Base of the model families: token embedding `embed_tokens`, decoder `layers`, `final_norm` and an
    optional untied `lm_head`. Subclasses set `norm_kind` and implement `forward_embeds`."""

    norm_kind: str
    dropout_fields: tuple[str, ...]  # the config's dropout probabilities
    lm_head_bias = None  # none of the supported families has an LM-head bias

    def set_dropout(self, p: float) -> None:
        """Set every dropout probability of the config (`dropout_fields`) to p in [0, 1); dropout acts in train
        mode only."""
        p = check_dropout(p, "dropout")
        for name in self.dropout_fields:
            setattr(self.config, name, p)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, n, d) of `input_ids` (B, n), without positions: GPT-2 adds those in
        `forward_embeds`, so that fed-back latent vectors get their positions the same way as tokens."""
        return self.embed_tokens(input_ids)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(vocab_size, d_model): the embedding's weight when the embeddings are tied."""
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of pre-norm hidden states (..., d) -> (..., vocab_size)."""
        return F.linear(self.final_norm(hidden), self.lm_head_weight, self.lm_head_bias)

    def prepare_cache(self, max_len: int, device: torch.device) -> None:
        """Raise when a cache of `max_len` rows could hold positions the model does not support; build
        what forwards over such a cache need, so that they allocate nothing (CUDA-graph capture)."""

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None, leftpad=None) -> KVCache:
        """An empty KV cache for this model. dtype None: the autocast dtype when autocast is on for the
        device (the projections then produce k/v in that dtype), else the parameters' dtype; device None:
        the parameters' device."""
        check_int(batch, "batch", low=1)
        check_int(max_len, "max_len", low=1)
        check_dtype(dtype)
        w = self.embed_tokens.weight
        device = check_device(device) or w.device
        self.prepare_cache(max_len, device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else w.dtype
        c = self.config
        return KVCache(c.n_layer, batch, max_len, c.n_kv_head, c.head_dim, dtype=dtype, device=device,
                       leftpad=leftpad)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of a whole batch in one pass through a fresh cache.

        attention_mask (B, T) of 0/1 may only pad on the LEFT (the pads become the cache's leftpad); pad
        positions get logits of no meaning. position_ids only matter for GPT-2 (see forward_embeds)."""
        check_inputs(input_ids, attention_mask, None, position_ids, device=self.embed_tokens.weight.device)
        if host_checks(input_ids):
            check_ids(input_ids, position_ids, self.config.vocab_size, self.config.max_position, attention_mask)
        B, T = input_ids.shape
        leftpad = None
        if attention_mask is not None:
            leftpad = (T - attention_mask.sum(-1)).to(torch.int32)
            if input_ids.device.type == "cpu" or debug_checks():
                left = torch.arange(T, device=input_ids.device)[None, :] >= leftpad[:, None]
                if not torch.equal(attention_mask.bool(), left):
                    raise CoconutError("attention_mask must be 0 on a prefix of each row and 1 after it "
                                       "(left padding only)")
        cache = self.new_cache(B, T, leftpad=leftpad)
        return self.logits(self.forward_embeds(self.embed(input_ids), cache, position_ids=position_ids))

    def _init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
