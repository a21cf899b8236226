"""The distributed side of a run: which process this is (torchrun's environment), its device, the process
group, and the wrapper the training step calls (the LatentLM itself, DDP, or FSDP2), with the full state dicts
and collectives the rest of the trainer needs so that no other unit has to know which wrapper is in use.
"""
from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["world_info", "device_of", "process_group", "Parallel"]


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 when not launched by it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def device_of(cfg: TrainConfig, local_rank: int) -> torch.device:
    """`cfg.device` (checked against this machine), else this rank's GPU when there is one, else the CPU."""
    if cfg.device is not None:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"config key 'device': {cfg.device!r} asked for, but CUDA is not available here")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device': {cfg.device!r} asked for, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextmanager
def process_group(world: int, device: torch.device):
    """Join torchrun's process group for the duration (unless the caller already has one)."""
    own = world > 1 and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        if own:
            _closing_barrier()
    finally:
        if own:
            dist.destroy_process_group()


def _closing_barrier(timeout_s: float = 60.0) -> None:
    """Every rank done with its collectives before any tears the group down (a rank that destroyed its gloo
    group while its peer's last work was in flight was seen to abort at exit under load). Bounded, and never
    an error of its own: a peer that failed has already made the run fail, and its error is the one to read."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception as e:  # noqa: BLE001 - the run's own result stands; say why the exit was not in step
        print(f"[dist] rank {dist.get_rank()}: the closing barrier failed ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); a peer may have failed", file=sys.stderr, flush=True)


class Parallel:
    """How the LatentLM `lm` is spread over the `world` processes (`mode`: "ddp" or "fsdp"; one process:
    neither; `wrap=False`: evaluation only, every rank keeps the whole model). `module` is what the training
    step calls; `lm` stays the unwrapped model."""

    def __init__(self, lm, mode: str, rank: int, world: int, device: torch.device, wrap: bool = True):
        self.lm, self.rank, self.world, self.device = lm, rank, world, device
        self.fsdp = wrap and world > 1 and mode == "fsdp"
        self.module = self._wrap(mode) if wrap else lm

    def _wrap(self, mode: str):
        if self.world == 1:
            return self.lm
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # a projected feedback is unused at stage 0 (no latents)
            unused = any(True for _ in self.lm.feedback.parameters())
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(self.lm, device_ids=ids, find_unused_parameters=unused)
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit: LatentLM's multi-pass forward reads the embedding, final norm and LM head between
        # the layer stacks of every pass, so the parameters are gathered for the whole forward; gradients
        # and optimizer states stay sharded.
        fully_shard(self.lm)
        return self.lm

    # --- state dicts (collective under FSDP: every rank calls them) ---------------------------------------
    def model_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.lm.state_dict()

    def optimizer_state(self, optimizer) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.lm, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_optimizer(self, optimizer, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.lm, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    # --- collectives ----------------------------------------------------------------------------------
    @contextmanager
    def whole(self):
        """The parameters whole on this rank for the duration (evaluation calls the unwrapped model)."""
        gather = self.fsdp and hasattr(self.lm, "unshard")
        if gather:
            self.lm.unshard()
        try:
            yield self.lm
        finally:
            if gather:
                self.lm.reshard()

    def no_sync(self, last_in_group: bool):
        """Skip the gradient all-reduce on the micro-batches before the last one of an accumulation group."""
        if last_in_group or not hasattr(self.module, "no_sync"):
            return nullcontext()
        return self.module.no_sync()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (a collective: every rank calls it)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        return float(self.sum(flag)) == 0.0

    def close(self) -> None:
        """Drop the DDP wrapper while the process group is still alive: a DDP object freed after
        `destroy_process_group` takes the group's last reference and tears gloo down with the GIL held,
        which can deadlock with gloo's work thread (seen under load)."""
        self.module = self.lm

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
