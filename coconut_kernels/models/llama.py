"""The Llama family (Llama 1-3, Qwen2, Mistral) in plain PyTorch: RMSNorm, rotary positions applied inside
the attention kernel from precomputed cos/sin tables, grouped-query attention, SwiGLU MLP. q/k/v and
gate/up are fused into one projection each; `hf_tensor_plan` maps the Hugging Face tensor names.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CoconutError
from ..ops.latent_attention import MAX_HEAD_DIM, draw_dropout_seed
from ..validation import check_dropout, check_model_config, check_real
from .base import CausalLM
from .linear import Linear, attention, mlp

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    d_model: int = 4096
    d_ff: int = 11008
    n_kv_head: int | None = None  # None: n_head (no GQA)
    head_dim: int | None = None  # None: d_model // n_head
    max_position: int = 4096
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    # None for plain RoPE, else HF's rope parameters: {"rope_type": "linear" | "dynamic" | "llama3" | "yarn",
    # "factor": ..., ...} ("dynamic" is applied statically: identical to plain RoPE up to max_position)
    rope_scaling: dict | None = None
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral / Qwen2: caches longer than this are refused
    initializer_range: float = 0.02
    attention_dropout: float = 0.0  # on the attention probabilities in train mode (HF's only dropout here)
    model_type: str = "llama"

    def __post_init__(self):
        check_model_config(self, ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "n_kv_head", "head_dim",
                                  "max_position", "sliding_window"), ("norm_eps", "initializer_range"),
                           optional=("n_kv_head", "head_dim", "sliding_window"))
        check_real(self.rope_theta, f"{type(self).__name__}.rope_theta", low=0.0, low_open=True)
        self.attention_dropout = check_dropout(self.attention_dropout, f"{type(self).__name__}.attention_dropout")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise CoconutError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}) "
                                   "unless head_dim is given")
            self.head_dim = self.d_model // self.n_head
        if self.head_dim > MAX_HEAD_DIM:
            raise CoconutError(f"head_dim ({self.head_dim}) exceeds the attention kernels' {MAX_HEAD_DIM}")
        if self.n_head % self.n_kv_head:
            raise CoconutError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise CoconutError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise CoconutError(f"unsupported rope_scaling type {rope_type!r}; supported: {ROPE_TYPES}")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face Llama / Qwen2 / Mistral config.json dict (transformers 4.x `rope_scaling` +
        `rope_theta` or 5.x `rope_parameters`); raises on options this model does not implement."""
        model_type = hf["model_type"]
        if hf.get("hidden_act", "silu") != "silu":
            raise CoconutError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise CoconutError("per-layer-type rope parameters are not supported")
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("type", None)
        partial_rotary = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial_rotary != 1.0:
            raise CoconutError(f"partial rotary embeddings (partial_rotary_factor={partial_rotary}) are not supported")
        if rope_type in ("llama3", "yarn"):
            rope.setdefault("original_max_position_embeddings",
                            hf.get("original_max_position_embeddings", hf["max_position_embeddings"]))

        bias = {"qkv_bias": hf.get("attention_bias", False), "o_bias": hf.get("attention_bias", False),
                "mlp_bias": hf.get("mlp_bias", False)}
        window = hf.get("sliding_window")
        if model_type == "qwen2":
            bias = {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
            layer_types = hf.get("layer_types")
            if layer_types is not None:
                sliding = "sliding_attention" in layer_types
            else:
                sliding = (hf.get("use_sliding_window", False)
                           and hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
            window = window if sliding else None
        elif model_type == "llama":
            window = None
        return cls(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], n_kv_head=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), max_position=hf["max_position_embeddings"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=theta, rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            sliding_window=window, initializer_range=hf.get("initializer_range", 0.02),
            attention_dropout=hf.get("attention_dropout", 0.0), model_type=model_type,
            **bias,
        )


def rope_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) in fp32 and the factor scaling cos/sin, computed in the same
    fp32 operations as transformers so that logits agree to rounding."""
    dim, theta = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (theta ** exponents)
    s = config.rope_scaling or {}
    rope_type = s.get("rope_type", "default")
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = s.get("factor")
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    original = s["original_max_position_embeddings"]
    if rope_type == "llama3":
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate the low frequencies, extrapolate the high ones, ramp in between
    if factor is None:
        factor = config.max_position / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = theta ** exponents
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RMSNorm(nn.Module):
    """RMSNorm computing in at least fp32 (as the checkpoints were trained); `bias` is None so the fused
    latent_feedback op can read weight / bias / eps from any final norm alike."""

    bias = None

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.qkv_proj = Linear(c.d_model, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.n_head * c.head_dim, c.d_model, bias=c.o_bias)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.gate_up_proj = Linear(c.d_model, 2 * c.d_ff, bias=c.mlp_bias)
        self.down_proj = Linear(c.d_ff, c.d_model, bias=c.mlp_bias)
        self.config = c  # the dropout probability is read at each call (set_dropout changes it)

    def forward(self, x, cache, new_seqlens, cos, sin):
        heads = (self.n_head, self.n_kv_head, self.head_dim)
        p = self.config.attention_dropout if self.training else 0.0
        x = x + attention(self.attn_norm(x), self.qkv_proj, self.o_proj, cache, self.layer, heads,
                          new_seqlens=new_seqlens, rotary_cos=cos, rotary_sin=sin, dropout_p=p,
                          dropout_seed=draw_dropout_seed() if p > 0 else 0)
        return x + mlp(self.mlp_norm(x), self.gate_up_proj, self.down_proj, "swiglu")


class Llama(CausalLM):
    """Llama / Qwen2 / Mistral language model. See `coconut_kernels.models` for the interface."""

    norm_kind = "rmsnorm"
    dropout_fields = ("attention_dropout",)
    hf_prefix = "model."
    hf_ignored = re.compile(r"rotary_emb\.inv_freq$|^lm_head\.weight$")

    def __init__(self, config: LlamaConfig):
        if not isinstance(config, LlamaConfig):
            raise CoconutError(f"config must be a LlamaConfig, got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.n_layer))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(lambda m: self._init_weights(m, config.initializer_range))
        # plain attributes, not buffers: the tables are built per (device, dtype) on first use
        self.inv_freq, self.attention_factor = rope_frequencies(config)
        self._rotary: dict = {}

    def prepare_cache(self, max_len: int, device: torch.device) -> None:
        window = self.config.sliding_window
        if window is not None and max_len > window:
            raise CoconutError(f"sliding-window attention is not implemented: a cache of max_len={max_len} "
                               f"exceeds the model's sliding_window={window}")
        self.rotary_tables(max_len, device, self.embed_tokens.weight.dtype)

    def rotary_tables(self, n_positions: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (>= n_positions, head_dim / 2) in `dtype`, as transformers computes them (fp32 angles,
        times the scaling's attention factor, then cast)."""
        key = (torch.device(device), dtype)
        tables = self._rotary.get(key)
        if tables is None or tables[0].shape[0] < n_positions:
            n = max(n_positions, 2 * tables[0].shape[0] if tables else 0)
            angles = torch.arange(n, dtype=torch.float32, device="cpu")[:, None] * self.inv_freq[None, :]
            tables = tuple((f(angles) * self.attention_factor).to(device=device, dtype=dtype)
                           for f in (torch.cos, torch.sin))
            self._rotary[key] = tables
        return tables

    def forward_embeds(self, x: torch.Tensor, cache, *, position_ids: torch.Tensor | None = None,
                       new_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Run every layer on input embeddings x (B, n, d) against `cache` (not advanced); returns the
        hidden state before the final norm. Positions come from the cache (row - leftpad, rotated inside
        the attention kernel); position_ids is ignored."""
        cos, sin = self.rotary_tables(cache.max_len, x.device, x.dtype)
        for block in self.layers:
            x = block(x, cache, new_seqlens, cos, sin)
        return x

    @staticmethod
    def hf_tensor_plan(config: LlamaConfig) -> dict:
        """Our tensor name -> (the HF names it is built from, function building it)."""
        cat = lambda *ts: torch.cat(ts, dim=0)  # noqa: E731
        plan = {"embed_tokens.weight": (("embed_tokens.weight",), None),
                "final_norm.weight": (("norm.weight",), None)}
        for i in range(config.n_layer):
            ours, hf = f"layers.{i}.", f"layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            plan[ours + "attn_norm.weight"] = ((hf + "input_layernorm.weight",), None)
            plan[ours + "mlp_norm.weight"] = ((hf + "post_attention_layernorm.weight",), None)
            kinds = ["weight"] + (["bias"] if config.qkv_bias else [])
            for kind in kinds:
                plan[ours + f"qkv_proj.{kind}"] = (tuple(f"{attn}{p}_proj.{kind}" for p in "qkv"), cat)
            for kind in ["weight"] + (["bias"] if config.o_bias else []):
                plan[ours + f"o_proj.{kind}"] = ((f"{attn}o_proj.{kind}",), None)
            for kind in ["weight"] + (["bias"] if config.mlp_bias else []):
                plan[ours + f"gate_up_proj.{kind}"] = ((f"{mlp}gate_proj.{kind}", f"{mlp}up_proj.{kind}"), cat)
                plan[ours + f"down_proj.{kind}"] = ((f"{mlp}down_proj.{kind}",), None)
        if not config.tie_embeddings:
            plan["lm_head.weight"] = (("lm_head.weight",), None)
        return plan
