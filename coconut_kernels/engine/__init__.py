"""Continuous batching of latent generation: requests join and leave one shared KVCache of slots at every
step (`LatentEngine`), with per-request sampling, stop rules, seeds, and what RL needs (log-probs, latents)."""
from .engine import LatentEngine
from .params import RequestOutput, Sample, SamplingParams

__all__ = ["LatentEngine", "RequestOutput", "Sample", "SamplingParams"]
