"""Argument checks of the public entry points (`LatentLM` construction, `forward`, `generate`, stop rules, model
and cache construction): pure functions that raise `CoconutError` naming the argument and what was expected,
before any work is done.

Value checks (id, label and position ranges, mask values, latent layouts) read host tensors: `latent.py` copies
`input_ids`, `attention_mask` and `labels` to the host once per call to plan its passes, and the checks run on
those copies, so they add no device sync. `position_ids` stays on the device in `LatentLM.forward`: its range is
checked when it is a CPU tensor, and for CUDA tensors only with COCONUT_DEBUG=1 (a host sync), like the ops'
index checks (see `coconut_kernels.backend`).
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch

from .backend import debug_checks
from .errors import CoconutError

IGNORE_INDEX = -100
_INDEX_DTYPES = (torch.int32, torch.int64)
STOP_KINDS = ("fixed", "eot", "entropy")
_STOP_KEYS = ("kind", "threshold", "patience", "max_latents")
MIN_TEMPERATURE = 1e-6


def host_checks(t: torch.Tensor) -> bool:
    """Whether to check t's values: host data always; CUDA data under COCONUT_DEBUG=1 (a host sync), never while
    a CUDA graph is being captured (generate captures KVCache.advance)."""
    return t.device.type == "cpu" or (debug_checks() and not torch.cuda.is_current_stream_capturing())


# ---- scalars ---------------------------------------------------------------------------------------------------


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (a Python or NumPy integer, not a bool) in [low, high]; else CoconutError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CoconutError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise CoconutError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return value


def check_real(value, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """`value` as a finite float (a Python or NumPy real, not a bool) in [low, high] ((low, high] with
    low_open); else CoconutError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CoconutError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise CoconutError(f"{name} must be finite, got {value}")
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise CoconutError(f"{name} must be in {'(' if low_open else '['}{lo}, {hi}], got {value}")
    return value


def check_dropout(value, name: str) -> float:
    """A dropout probability: a finite float in [0, 1); else CoconutError naming it."""
    value = check_real(value, name, low=0.0, high=1.0)
    if value >= 1.0:
        raise CoconutError(f"{name} must be in [0, 1), got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise CoconutError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_device(device, name: str = "device", *, meta: bool = True) -> torch.device | None:
    """None, or a torch.device for a device string / torch.device / CUDA index that this machine has; the meta
    device (shapes only) when `meta`, which a command line that computes something never wants."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise CoconutError(f"{name} must be a device string such as 'cpu' or 'cuda:0', a torch.device or None, "
                           f"got {device!r} ({type(device).__name__})")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CoconutError(f"{name} must be a device string such as 'cpu' or 'cuda:0', got {device!r} ({e})") \
            from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise CoconutError(f"{name} is {device!r} but no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= n:
            raise CoconutError(f"{name} is {device!r} but this machine has {n} CUDA device(s)")
    elif dev.type not in (("cpu", "meta") if meta else ("cpu",)):
        raise CoconutError(f"{name} must be a 'cpu' or 'cuda' device, got {device!r}")
    return dev


def check_same_device(device: torch.device, where: str, **tensors) -> None:
    """Every tensor given (None: skipped) is on `device`, described as `where` (e.g. "the cache's"): a mix with the
    meta device would otherwise run the shape-only fake kernel and return a meta tensor instead of failing."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise CoconutError(f"{name} must be on {where} device ({device}), got {t.device}")


def check_dtype(dtype, name: str = "dtype", *, floating: bool = True) -> torch.dtype | None:
    """None or a torch.dtype (floating point when `floating`)."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise CoconutError(f"{name} must be a torch.dtype such as torch.float32, got {dtype!r} "
                           f"({type(dtype).__name__})")
    if floating and not dtype.is_floating_point:
        raise CoconutError(f"{name} must be a floating-point dtype (float32, float16, bfloat16, float64), got {dtype}")
    return dtype


def check_tensor_args(optional: tuple[str, ...] = (), **tensors) -> None:
    """Each keyword argument is a torch.Tensor (or None when its name is in `optional`): the ops check this before
    the schema's argument parser, whose errors do not say what was expected."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name in optional):
            raise CoconutError(f"{name} must be a torch.Tensor{' or None' if name in optional else ''}, got "
                               f"{type(t).__name__}")


def check_writable(path, name: str, *, folder: bool, error: type[CoconutError] = CoconutError) -> Path:
    """`path` (a folder when `folder`, else a file) can be written, its missing parent folders created: checked
    without writing, so that a command fails before its work rather than when it saves the result."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            raise error(f"{name}: {path} is {'a file, not a folder' if folder else 'a folder, not a file'}")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise error(f"{name}: {path} is not writable (no write permission on {path})")
        return path
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise error(f"{name}: {path} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{name}: {path} is not writable (no write permission on {probe})")
    return path


# ---- LatentLM construction -------------------------------------------------------------------------------------


def check_special_ids(vocab_size: int, latent_token_id, start_latent_id, end_latent_id, eos_token_id) -> None:
    """The marker ids are distinct token ids of the vocabulary; eos_token_id is another one, or -1 for none (no
    token equals it: decoding then runs max_new_tokens steps)."""
    names = ("latent_token_id", "start_latent_id", "end_latent_id")
    ids = []
    for value, name in zip((latent_token_id, start_latent_id, end_latent_id), names):
        i = check_int(value, name)
        if not 0 <= i < vocab_size:
            raise CoconutError(f"{name}: {i} is outside the model's vocabulary [0, {vocab_size}); grow it with "
                               "coconut_kernels.add_latent_tokens(model, tokenizer)")
        ids.append(i)
    eos = check_int(eos_token_id, "eos_token_id", low=-1, high=vocab_size - 1)
    for j in range(3):
        for i in range(j):
            if ids[i] == ids[j]:
                raise CoconutError(f"{names[j]}: {ids[j]} equals {names[i]}; the three markers must be distinct")
        if eos == ids[j]:
            raise CoconutError(f"{names[j]}: {ids[j]} equals eos_token_id; the markers must be tokens of their own")


def check_feedback(feedback, d_model: int) -> None:
    """A Feedback module's sizes against the model's (names are checked by feedback.resolve_feedback)."""
    proj = getattr(feedback, "proj", None)
    first = proj[0] if isinstance(proj, torch.nn.Sequential) and len(proj) else None
    if isinstance(first, torch.nn.Linear) and first.in_features != d_model:
        raise CoconutError(f"feedback: a {type(feedback).__name__} for d_model={first.in_features} cannot feed a "
                           f"model with d_model={d_model}")


def check_latent_lm(model, feedback) -> None:
    """LatentLM(model, ...): a model of `coconut_kernels.models` and the feedback's sizes (the special ids:
    `check_special_ids`, once they are resolved)."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(config, "vocab_size") or \
            not hasattr(model, "forward_embeds"):
        raise CoconutError(f"model must be a model of coconut_kernels.models (GPT2, Llama, from_pretrained), got "
                           f"{type(model).__name__}")
    check_feedback(feedback, config.d_model)


def batch_rules(lm, latent_id: int) -> dict:
    """check_batch's keyword arguments for a LatentLM (latent_id: -1 when the feedback mode runs no latents)."""
    return dict(vocab_size=lm.model.config.vocab_size, max_position=lm.model.config.max_position,
                latent_id=latent_id, start_latent_id=lm.start_latent_id, end_latent_id=lm.end_latent_id)


# ---- batches (forward and generate) ----------------------------------------------------------------------------


def check_inputs(input_ids, attention_mask=None, labels=None, position_ids=None, *, device=None, **flags) -> None:
    """Types, shapes, dtypes and devices of a batch; reads no values (no device sync). device: the model's;
    flags: boolean keyword arguments of the call (e.g. return_logits)."""
    for name, value in flags.items():
        check_bool(value, name)
    check_tensor_args(input_ids=input_ids)
    if input_ids.dim() != 2:
        raise CoconutError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise CoconutError(f"input_ids must have at least one row and one column, got shape "
                           f"{tuple(input_ids.shape)} (an empty batch)")
    if input_ids.dtype not in _INDEX_DTYPES:
        raise CoconutError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if device is not None and input_ids.device != torch.device(device):
        raise CoconutError(f"input_ids must be on the model's device ({device}), got {input_ids.device}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
        if t is None:
            continue
        check_tensor_args(**{name: t})
        if t.shape != input_ids.shape:
            raise CoconutError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
        if t.device != input_ids.device:
            raise CoconutError(f"{name} must be on input_ids' device ({input_ids.device}), got {t.device}")
        if name == "attention_mask":
            if t.is_complex():
                raise CoconutError(f"attention_mask must hold 0/1 (bool, integer or float), got {t.dtype}")
        elif t.dtype not in _INDEX_DTYPES:
            raise CoconutError(f"{name} must be int64 or int32, got {t.dtype}")


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _range(t: torch.Tensor, name: str, size: int, what: str, allowed: int | None = None) -> None:
    x = t if allowed is None else t.masked_fill(t == allowed, 0)
    lo, hi = torch.aminmax(x)  # one pass when all is well; the bad entry is looked for only then
    if int(lo) >= 0 and int(hi) < size:
        return
    at = _first((x < 0) | (x >= size))
    also = f" or {allowed}" if allowed is not None else ""
    raise CoconutError(f"{name}{list(at)} = {int(t[at])} is out of range: expected {what} in [0, {size}){also}")


def _mask_values(mask: torch.Tensor) -> None:
    if mask.dtype == torch.bool:
        return
    lo, hi = torch.aminmax(mask)
    if not mask.is_floating_point() and int(lo) >= 0 and int(hi) <= 1:  # integers in [0, 1]: nothing else to see
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        at = _first(bad)
        raise CoconutError(f"attention_mask{list(at)} = {mask[at].item()}: expected only 0 and 1")


def check_ids(input_ids: torch.Tensor, position_ids, vocab_size: int, max_position: int, attention_mask=None) -> None:
    """Values of a plain model call (`model(input_ids, position_ids, attention_mask)`): token ids in
    [0, vocab_size), positions in [0, max_position), mask of 0/1 (a host sync for CUDA tensors)."""
    _range(input_ids, "input_ids", vocab_size, "token ids")
    if position_ids is not None:
        _range(position_ids, "position_ids", max_position, "positions")
    if attention_mask is not None:
        _mask_values(attention_mask)


def check_batch(ids_h: torch.Tensor, mask_h: torch.Tensor, labels_h: torch.Tensor | None, position_ids, *,
                vocab_size: int, max_position: int, latent_id: int, start_latent_id: int, end_latent_id: int,
                max_new_tokens: int | None = None, stop_kind: str = "fixed", max_latents: int | None = None,
                prompt_name: str | None = None, max_new_tokens_name: str = "max_new_tokens") -> None:
    """Values of a batch that `check_inputs` accepted, on host copies (ids_h, mask_h, labels_h):

    - input_ids in [0, vocab_size), labels -100 or in [0, vocab_size), position_ids in [0, max_position) (on the
      host or under COCONUT_DEBUG=1);
    - attention_mask of 0/1 only, each row zeros (left padding), then at least one 1, then zeros (right padding);
    - markers (at real positions): a row's block runs from its first start_latent_id <bot> to the next
      end_latent_id <eot>, with no <eot> before it and no second <bot> inside (the official data holds one
      `<bot> <latent>... <eot>` block per row, at stage 0 `<bot> <eot>`); after it markers are ordinary tokens;
    - latent tokens (latent_id >= 0, the sequential feedback modes): at real positions, contiguous, not first,
      labelled -100, and read `question <bot> <latent>... <eot>` (start_latent_id right before, end_latent_id
      right after, inside the row): the same rule in training and generation;
    - the positions fit the model: each row's tokens (forward), or prompt + latents + max_new_tokens (generate,
      with the stop rule's latent budget); a stop rule other than "fixed" needs latents in every prompt.

    prompt_name / max_new_tokens_name: the caller's own argument names (the engine checks one prompt, its
    `prompt_ids`, with `max_tokens` new tokens), used in the messages instead of "input_ids row b" and
    "max_new_tokens".
    """
    B, T = ids_h.shape

    def row(b: int) -> str:
        return prompt_name if prompt_name is not None else f"input_ids row {b}"

    if prompt_name is None:
        _range(ids_h, "input_ids", vocab_size, "token ids")
    else:
        _range(ids_h[0], prompt_name, vocab_size, "token ids")
    if labels_h is not None:
        _range(labels_h, "labels", vocab_size, "token ids", allowed=IGNORE_INDEX)
    if isinstance(position_ids, torch.Tensor) and host_checks(position_ids):
        _range(position_ids.cpu(), "position_ids", max_position, "positions")
    _mask_values(mask_h)
    mask = mask_h.to(torch.bool)
    length = mask.sum(1)
    if bool((length == 0).any()):
        raise CoconutError(f"attention_mask row {_first(length == 0)[0]} is all zeros: every example needs at least "
                           "one token")
    cols = torch.arange(T)
    first = torch.where(mask, cols, T).min(1).values
    last = torch.where(mask, cols, -1).max(1).values
    holes = (last + 1 - first) != length
    if bool(holes.any()):
        raise CoconutError(f"attention_mask row {_first(holes)[0]} must be zeros (left padding), then ones, then "
                           "zeros (right padding); got holes in the ones")
    if int(length.max()) > max_position:
        b = int(length.argmax())
        raise CoconutError(f"{row(b)} has {int(length[b])} tokens, more than the model's {max_position} positions")
    _check_markers(ids_h, mask, cols, start_latent_id, end_latent_id, row)
    n_lat = torch.zeros(B, dtype=torch.long)
    if latent_id >= 0:
        is_latent = ids_h == latent_id
        if bool((is_latent & ~mask).any()):
            raise CoconutError(f"{row(_first(is_latent & ~mask)[0])} has latent tokens (latent_token_id {latent_id}) "
                               f"at padded positions (attention_mask 0): {_COVER}")
        n_lat = is_latent.sum(1)
        has = n_lat > 0
        first_lat = torch.where(is_latent, cols, T).min(1).values
        last_lat = torch.where(is_latent, cols, -1).max(1).values
        bad = has & (last_lat - first_lat + 1 != n_lat)
        if bool(bad.any()):
            raise CoconutError(f"the latent tokens of {row(_first(bad)[0])} are not contiguous")
        bad = has & (first_lat == first)
        if bool(bad.any()):
            raise CoconutError(f"{row(_first(bad)[0])} starts with a latent token: a latent needs a previous position")
        if labels_h is not None and bool((is_latent & (labels_h != IGNORE_INDEX)).any()):
            raise CoconutError(f"labels must be {IGNORE_INDEX} at latent positions (row "
                               f"{_first(is_latent & (labels_h != IGNORE_INDEX))[0]})")
        before = ids_h.gather(1, (first_lat - 1).clamp(0, T - 1)[:, None])[:, 0]
        after = ids_h.gather(1, (last_lat + 1).clamp(0, T - 1)[:, None])[:, 0]
        masked_eot = has & (before == start_latent_id) & (last_lat + 1 < T) & (after == end_latent_id) & \
            (last_lat + 1 > last)
        if bool(masked_eot.any()):
            raise CoconutError(f"{row(_first(masked_eot)[0])}: the <eot> (end_latent_id {end_latent_id}) after its "
                               f"latents is at a padded position (attention_mask 0): {_COVER}")
        bad = has & ((before != start_latent_id) | (after != end_latent_id) | (last_lat + 1 > last))
        if bool(bad.any()):
            raise CoconutError(f"{row(_first(bad)[0])} must read question <bot> <latent>... <eot>: its latents are "
                               f"not between start_latent_id {start_latent_id} and end_latent_id {end_latent_id}")
    if max_new_tokens is None:
        return
    if stop_kind != "fixed" and bool((n_lat == 0).any()):
        raise CoconutError(f"stop={stop_kind!r} needs <bot> <latent>... <eot> in every prompt: "
                           f"{row(_first(n_lat == 0)[0])} has no latent tokens")
    k_max = int(n_lat.max())
    budget = k_max if max_latents is None else max(k_max, max_latents)
    total = length + max_new_tokens + (budget - n_lat)
    if int(total.max()) > max_position:
        budget = "" if max_latents is None else f" (stop's latent budget {max_latents})"
        raise CoconutError(f"{max_new_tokens_name}: prompt + latents{budget} + {max_new_tokens_name} = "
                           f"{int(total.max())} positions exceed the model's {max_position}")


# What the mask may pad (see check_batch): both sides are supported, so a marker outside the ones is the mask's fault.
_COVER = ("attention_mask must be one run of ones per row covering the question and its <bot> <latent>... <eot>, "
          "with zeros only before it (left padding) and after it (right padding)")


def _check_markers(ids_h, mask, cols, start_latent_id: int, end_latent_id: int, row) -> None:
    """A row's block is its first <bot> up to the first <eot> after it: no <eot> before that <bot> and no second
    <bot> inside the block. After the block's <eot> the markers are ordinary tokens, as in the official forward
    (which finds thoughts by the latent token alone): a sampled answer may hold them."""
    T = ids_h.shape[1]
    at_bot = (ids_h == start_latent_id) & mask
    at_eot = (ids_h == end_latent_id) & mask
    has_bot = at_bot.any(1)
    bot = torch.where(at_bot, cols, T).min(1).values
    bad = has_bot & (torch.where(at_eot, cols, T).min(1).values < bot)
    if bool(bad.any()):
        raise CoconutError(f"{row(_first(bad)[0])} has an <eot> (end_latent_id {end_latent_id}) before its <bot> "
                           f"(start_latent_id {start_latent_id}): a row reads question <bot> <latent>... <eot>")
    after_bot = cols[None] > bot[:, None]
    eot = torch.where(at_eot & after_bot, cols, T).min(1).values
    inside = (at_bot & after_bot & (cols[None] < eot[:, None])).sum(1)
    if bool((inside > 0).any()):
        b = _first(inside > 0)[0]
        raise CoconutError(f"{row(b)} has {int(inside[b]) + 1} <bot> tokens (start_latent_id {start_latent_id}) "
                           "before the <eot> that closes its block: a row reads question <bot> <latent>... <eot> "
                           "(after that <eot>, markers are ordinary tokens)")


# ---- latent schedule -------------------------------------------------------------------------------------------

LATENT_SCHEDULES = ("sequential", "jacobi")


def check_schedule(latent_schedule, jacobi_iters, *, stop=None) -> None:
    """latent_schedule and jacobi_iters of LatentLM.forward / generate (stop: generate's, checked before): the
    Jacobi schedule needs jacobi_iters >= 1 and a thought count known up front (stop None / "fixed" without a
    larger latent budget): "eot" and "entropy" decide each thought's end from the one before."""
    if not isinstance(latent_schedule, str) or latent_schedule not in LATENT_SCHEDULES:
        raise CoconutError(f"latent_schedule must be one of {LATENT_SCHEDULES}, got {latent_schedule!r}")
    if latent_schedule == "sequential":
        if jacobi_iters is not None:
            check_int(jacobi_iters, "jacobi_iters", low=1)
        return
    if jacobi_iters is None:
        raise CoconutError('jacobi_iters must be an int >= 1 with latent_schedule="jacobi", got None')
    check_int(jacobi_iters, "jacobi_iters", low=1)
    kind, _, _, budget = check_stop(stop)
    if kind != "fixed" or budget is not None:
        raise CoconutError(f'latent_schedule="jacobi" needs the prompt\'s latent count (stop None or "fixed"): '
                           f"stop={stop!r} decides each thought's end from the previous thought, sequentially")


# ---- generate --------------------------------------------------------------------------------------------------


def check_generate(lm, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                   eos_token_id, pad_token_id, feedback, stop, return_latents, use_cuda_graph, generator) -> None:
    """LatentLM.generate's arguments before any work: the batch's types and shapes (its values are checked by
    check_batch on the host copies) and every scalar."""
    check_inputs(input_ids, attention_mask, device=lm.model.lm_head_weight.device)
    check_sampling(vocab_size=lm.model.config.vocab_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id, return_latents=return_latents, use_cuda_graph=use_cuda_graph,
                   generator=generator, stop=stop)
    if feedback is not None:
        check_feedback(feedback, lm.model.config.d_model)


def check_sampling(*, vocab_size: int, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                   pad_token_id, return_latents, use_cuda_graph, generator, stop,
                   max_new_tokens_name: str = "max_new_tokens") -> None:
    """generate's scalar arguments: types, finiteness and ranges (eos_token_id / pad_token_id None: the model's).
    max_new_tokens_name: the caller's name of that argument (the engine's `max_tokens`)."""
    check_int(max_new_tokens, max_new_tokens_name, low=1)
    check_bool(do_sample, "do_sample")
    # Below MIN_TEMPERATURE, logits / temperature overflow float32 (NaN probabilities); greedy is do_sample=False.
    check_real(temperature, "temperature", low=MIN_TEMPERATURE)
    check_int(top_k, "top_k", low=0)
    check_real(top_p, "top_p", low=0.0, high=1.0, low_open=True)
    if eos_token_id is not None:
        check_int(eos_token_id, "eos_token_id", low=-1, high=vocab_size - 1)
    if pad_token_id is not None:
        # pad only fills the output after each end: any int, e.g. -100 or -1 for "no token"
        check_int(pad_token_id, "pad_token_id")
    check_bool(return_latents, "return_latents")
    check_bool(use_cuda_graph, "use_cuda_graph")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise CoconutError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_stop(stop)


def _budget(max_latents, name: str = "stop max (latent budget)") -> int | None:
    return None if max_latents is None else check_int(max_latents, name, low=1)


def check_stop(stop) -> tuple[str, float, int, int | None]:
    """A stop rule as (kind, threshold, patience, max_latents); the grammar is `latent.parse_stop`'s: None /
    "fixed", "eot", ("eot", max), "entropy", ("entropy", tau, m[, max]) or a dict of those keys."""
    grammar = ("None, 'fixed', 'eot', 'entropy', ('eot', max), ('entropy', tau, m[, max]) or a dict with keys "
               f"{_STOP_KEYS}")
    if stop is None or (isinstance(stop, str) and stop == "fixed"):
        return "fixed", 0.0, 1, None
    if isinstance(stop, str):
        if stop == "eot":
            return "eot", 0.0, 1, None
        if stop == "entropy":
            return "entropy", 0.1, 2, None
        raise CoconutError(f"stop must be {grammar}; got {stop!r}")
    if isinstance(stop, dict):
        unknown = sorted(map(repr, set(stop) - set(_STOP_KEYS)))
        if unknown:
            raise CoconutError(f"stop: unknown key(s) {', '.join(unknown)}; expected {_STOP_KEYS}")
        kind = stop.get("kind")
        if not isinstance(kind, str) or kind not in STOP_KINDS:
            raise CoconutError(f"stop['kind'] must be one of {STOP_KINDS}, got {kind!r}")
        threshold = check_real(stop.get("threshold", 0.0), "stop['threshold']", low=0.0)
        patience = check_int(stop.get("patience", 1), "stop['patience']", low=1)
        return kind, threshold, patience, _budget(stop.get("max_latents"), "stop['max_latents']")
    if isinstance(stop, (tuple, list)) and stop and isinstance(stop[0], str) and stop[0] in ("eot", "entropy"):
        if stop[0] == "eot":
            if len(stop) > 2:
                raise CoconutError(f"stop ('eot', max) takes at most one number, got {stop!r}")
            return "eot", 0.0, 1, _budget(stop[1] if len(stop) > 1 else None)
        if not 2 <= len(stop) <= 4:
            raise CoconutError(f"stop ('entropy', tau, m[, max]) takes one to three numbers, got {stop!r}")
        threshold = check_real(stop[1], "stop tau (entropy threshold)", low=0.0)
        patience = check_int(stop[2], "stop m (patience)", low=1) if len(stop) > 2 else 1
        return "entropy", threshold, patience, _budget(stop[3] if len(stop) > 3 else None)
    raise CoconutError(f"stop must be {grammar}; got {stop!r}")


# ---- model configurations --------------------------------------------------------------------------------------


def check_model_config(config, ints: tuple[str, ...], reals: tuple[str, ...] = (),
                       optional: tuple[str, ...] = ()) -> None:
    """A model config's sizes are ints >= 1 (None allowed for the `optional` ones, which have a derived default)
    and its named reals finite and >= 0 (eps, init std)."""
    where = type(config).__name__
    for name in ints:
        value = getattr(config, name)
        if value is not None or name not in optional:
            check_int(value, f"{where}.{name}", low=1)
    for name in reals:
        check_real(getattr(config, name), f"{where}.{name}", low=0.0)
