"""GPT-2 (the COCONUT paper's model) in plain PyTorch: learned absolute positions, pre-LayerNorm blocks,
fused qkv projection; attention always goes through the KV cache and so through `latent_attention`.
The Hugging Face names of its tensors are mapped in `hf_tensor_plan` (Conv1D weights transposed).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CoconutError
from ..ops.latent_attention import MAX_HEAD_DIM, draw_dropout_seed
from ..validation import check_dropout, check_model_config
from .base import CausalLM
from .linear import Linear, attention, embedding, mlp

# HF's activation_function names -> models.linear.ACTIVATIONS (gelu_new is the tanh approximation)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "silu"}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    max_position: int = 1024
    d_ff: int | None = None  # None: 4 * d_model
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    activation: str = "gelu_new"
    scale_attn_weights: bool = True  # False: no 1/sqrt(head_dim) in the softmax
    scale_attn_by_inverse_layer_idx: bool = False  # softmax scale further divided by layer index + 1
    initializer_range: float = 0.02
    # dropout in train mode, as HF GPT-2: on the input embeddings (token + position), on each block's attention
    # and MLP outputs before the residual additions, and on the attention probabilities. 0 here; from_hf reads a
    # checkpoint's (transformers' default 0.1 where config.json has none).
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    model_type: str = "gpt2"

    def __post_init__(self):
        check_model_config(self, ("vocab_size", "n_layer", "n_head", "d_model", "max_position", "d_ff"),
                           ("norm_eps", "initializer_range"), optional=("d_ff",))
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            setattr(self, name, check_dropout(getattr(self, name), f"GPT2Config.{name}"))
        if self.d_model % self.n_head:
            raise CoconutError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.head_dim > MAX_HEAD_DIM:
            raise CoconutError(f"d_model / n_head: the head dim {self.d_model} / {self.n_head} = {self.head_dim} "
                               f"exceeds the attention kernels' {MAX_HEAD_DIM}; use more heads")
        if not isinstance(self.activation, str) or self.activation not in _ACTIVATIONS:
            raise CoconutError(f"unsupported GPT-2 activation {self.activation!r}; supported: {sorted(_ACTIVATIONS)}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    @property
    def n_kv_head(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        """From a Hugging Face GPT-2 config.json dict; raises on options this model does not implement."""
        if hf.get("add_cross_attention"):
            raise CoconutError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        return cls(
            vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
            max_position=hf["n_positions"], d_ff=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            activation=hf.get("activation_function", "gelu_new"),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            initializer_range=hf.get("initializer_range", 0.02),
            embd_pdrop=hf.get("embd_pdrop", 0.1), resid_pdrop=hf.get("resid_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1),
        )


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        d = config.d_model
        self.layer = layer
        self.ln_1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.c_attn = Linear(d, 3 * d)
        self.c_proj = Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=config.norm_eps)
        self.c_fc = Linear(d, config.d_ff)
        self.mlp_proj = Linear(config.d_ff, d)
        self.act = _ACTIVATIONS[config.activation]
        self.n_head, self.head_dim = config.n_head, config.head_dim
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        self.softmax_scale = scale
        self.config = config  # the dropout probabilities are read at each call (set_dropout changes them)

    def forward(self, x, cache, new_seqlens):
        heads = (self.n_head, self.n_head, self.head_dim)
        train, resid_p = self.training, self.config.resid_pdrop
        attn_p = self.config.attn_pdrop if train else 0.0
        a = attention(self.ln_1(x), self.c_attn, self.c_proj, cache, self.layer, heads, new_seqlens=new_seqlens,
                      softmax_scale=self.softmax_scale, dropout_p=attn_p,
                      dropout_seed=draw_dropout_seed() if attn_p > 0 else 0)
        x = x + F.dropout(a, resid_p, train)
        return x + F.dropout(mlp(self.ln_2(x), self.c_fc, self.mlp_proj, self.act), resid_p, train)


class GPT2(CausalLM):
    """GPT-2 language model. See `coconut_kernels.models` for the interface."""

    norm_kind = "layernorm"
    dropout_fields = ("embd_pdrop", "resid_pdrop", "attn_pdrop")
    hf_prefix = "transformer."
    # buffers that old checkpoints carry (causal mask), and the tied LM head that some save
    hf_ignored = re.compile(r"(^|\.)attn\.(masked_)?bias$|^lm_head\.weight$")

    def __init__(self, config: GPT2Config):
        if not isinstance(config, GPT2Config):
            raise CoconutError(f"config must be a GPT2Config, got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_position, config.d_model)
        self.layers = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        std = config.initializer_range
        self.apply(lambda m: self._init_weights(m, std))
        # GPT-2's scaling of the residual projections by the depth
        for block in self.layers:
            for proj in (block.c_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * config.n_layer))

    def prepare_cache(self, max_len: int, device: torch.device) -> None:
        if max_len > self.config.max_position:
            raise CoconutError(f"GPT-2 has {self.config.max_position} learned positions; a cache of "
                               f"max_len={max_len} would need more")

    def forward_embeds(self, x: torch.Tensor, cache, *, position_ids: torch.Tensor | None = None,
                       new_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Run every layer on input embeddings x (B, n, d) against `cache` (not advanced); returns the
        hidden state before the final norm. Adds wpe[position_ids]; the default positions continue each
        sequence from the cache (cache row - leftpad, pads clamped to 0 as the official collator does).
        In train mode, the config's dropout (embeddings, residual branches, attention probabilities)."""
        if position_ids is None:
            start = cache.seqlens.long() - cache.leftpad.long()
            position_ids = (start[:, None] + torch.arange(x.shape[1], device=x.device)).clamp_min(0)
        x = F.dropout(x + embedding(position_ids, self.wpe), self.config.embd_pdrop, self.training)
        for block in self.layers:
            x = block(x, cache, new_seqlens)
        return x

    @staticmethod
    def hf_tensor_plan(config: GPT2Config) -> dict:
        """Our tensor name -> (the HF names it is built from, function building it). HF's Conv1D stores
        (in, out): transposed to nn.Linear's (out, in)."""
        t = lambda w: w.t()  # noqa: E731
        plan = {"embed_tokens.weight": (("wte.weight",), None), "wpe.weight": (("wpe.weight",), None),
                "final_norm.weight": (("ln_f.weight",), None), "final_norm.bias": (("ln_f.bias",), None)}
        ours = {"ln_1": ("ln_1", None), "c_attn": ("attn.c_attn", t), "c_proj": ("attn.c_proj", t),
                "ln_2": ("ln_2", None), "c_fc": ("mlp.c_fc", t), "mlp_proj": ("mlp.c_proj", t)}
        for i in range(config.n_layer):
            for name, (hf, fn) in ours.items():
                plan[f"layers.{i}.{name}.weight"] = ((f"h.{i}.{hf}.weight",), fn)
                plan[f"layers.{i}.{name}.bias"] = ((f"h.{i}.{hf}.bias",), None)
        if not config.tie_embeddings:
            plan["lm_head.weight"] = (("lm_head.weight",), None)
        return plan
