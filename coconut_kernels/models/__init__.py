"""The thin model layer: GPT-2 and the Llama family (Llama, Qwen2, Mistral) in plain PyTorch, attention
always through `KVCache` (so through the `latent_attention` op), loaded from Hugging Face checkpoint
folders without `transformers`. `latent.py` drives these models pass by pass.

Interface (both families)::

    from coconut_kernels.models import GPT2, GPT2Config, Llama, LlamaConfig, from_pretrained, load_config

    model = GPT2(config) / Llama(config)              # nn.Module, randomly initialised
    model = from_pretrained(path_or_hf_model, dtype=None, device=None)
        # a folder with config.json + model.safetensors (or model.safetensors.index.json and its shards),
        # or a transformers model object (config + state_dict, tensors copied). The family is picked
        # from model_type; unsupported model types / architectures / options and missing or unused
        # tensors raise CheckpointError (a ValueError) naming them, a missing folder or file
        # CheckpointNotFoundError (also a FileNotFoundError). dtype None keeps the checkpoint's dtype.
        # Returned in eval mode, as transformers does.
    load_config(path_or_dict_or_hf_config) -> GPT2Config | LlamaConfig

    model.config          # dataclass: vocab_size, n_layer, n_head, n_kv_head, d_model, head_dim,
                          # max_position, norm_eps, tie_embeddings, d_ff, model_type, + family fields
    model.set_dropout(p)  # every dropout probability of the config (model.dropout_fields) to p
    model.embed(input_ids) -> (B, n, d)              # token embeddings only (no positions)
    model.forward_embeds(x, cache, *, position_ids=None, new_seqlens=None) -> (B, n, d)
        # every layer on input embeddings x against `cache` (its attention per layer; the cache is NOT
        # advanced: call cache.advance(n) after), returns the hidden state BEFORE the final norm.
        # GPT-2 adds wpe[position_ids]; default position_ids = cache.seqlens - cache.leftpad + arange(n)
        # (clamped at 0 for pads). Llama: rotary inside the kernel, position = cache row - leftpad;
        # position_ids is ignored. new_seqlens (B,) int32: rows t >= new_seqlens[b] are not appended.
    model.final_norm       # nn.LayerNorm (GPT-2) | RMSNorm (Llama); .weight, .bias (None for RMSNorm), .eps
    model.norm_kind        # "layernorm" | "rmsnorm"   (for the fused latent_feedback op)
    model.lm_head_weight   # (V, d); the embedding's weight when tied.  model.lm_head_bias is None
    model.logits(hidden)   # final norm + LM head of pre-norm hidden states
    model.new_cache(batch, max_len, *, dtype=None, device=None, leftpad=None) -> KVCache
    model(input_ids, position_ids=None, attention_mask=None) -> logits (B, T, V)
        # one pass through a fresh cache; attention_mask (B, T) 0/1 with LEFT padding only (the pads
        # become the cache's leftpad)

The layers' projections are `models.linear.Linear`: nn.Linear, except inside `batched_weight_grads()` (which
LatentLM's multi-pass forward uses), where the small passes' rows are multiplied once per layer for the weight
gradient instead of one weight-sized product and sum per pass, and where a block's attention and feed-forward
(`models.linear.attention`, `models.linear.mlp`) are one autograd node each.

Dropout, in train mode only (`model.train()`; `from_pretrained` returns eval mode), as transformers applies it:
GPT-2 drops the input embeddings (token + position, so fed-back latent vectors too) with `embd_pdrop`, each block's
attention and MLP outputs before the residual additions with `resid_pdrop`, and the attention probabilities with
`attn_pdrop`; the Llama family only the attention probabilities (`attention_dropout`). The probabilities come from
the checkpoint's config.json (transformers' defaults where it has none: 0.1 for GPT-2, 0 for Llama); a config
built here defaults to 0. Embedding and residual dropout use torch's RNG (`torch.nn.functional.dropout`); the
attention dropout runs inside the fused `latent_attention` op with a seed drawn per layer and pass from torch's
default CPU generator, so `torch.manual_seed` makes a training step reproducible.

Not implemented: sliding-window
attention (Mistral / Qwen2 with a window: new_cache refuses caches longer than the window), rope types
other than default / linear / dynamic / llama3 / yarn ("dynamic" is static: identical to plain RoPE up
to max_position, unlike transformers' rescaling beyond it), partial rotary embeddings.
"""
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from .loading import from_pretrained, load_config

__all__ = ["GPT2", "GPT2Config", "Llama", "LlamaConfig", "from_pretrained", "load_config"]
