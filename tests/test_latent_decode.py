"""generate's CUDA-graph path falls back to eager decoding when the capture or its first replay raises: one
warning, and the output of eager decoding. The graph path is forced on the CPU through the
`latent_decode._graphs_supported` seam; the failures are simulated (and, unpatched, real: the CPU build of torch
cannot capture)."""
from __future__ import annotations

import warnings

import pytest
import torch

from coconut_kernels import LatentLM, latent_decode
from coconut_kernels.data import RaggedCollator
from coconut_kernels.models import GPT2, GPT2Config

V = 61
EOS, BOT, LAT, EOT = V - 4, V - 3, V - 2, V - 1


def tiny_lm():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_position=64)).eval()
    return LatentLM(model, LAT, BOT, EOT, EOS)


def prompts():
    ex = [{"input_ids": [3, 4, 5, BOT] + [LAT] * k + [EOT]} for k in (2, 0, 3)]
    batch = RaggedCollator(EOS, LAT)(ex)
    return batch["input_ids"], batch["attention_mask"]


def run(lm, use_cuda_graph, **kw):
    ids, mask = prompts()
    gen = torch.Generator().manual_seed(7)
    return lm.generate(ids, mask, max_new_tokens=6, use_cuda_graph=use_cuda_graph, do_sample=True, top_k=8,
                       generator=gen, **kw)


def same(a, b):
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths) and \
        torch.equal(a.n_latents, b.n_latents)


def fallback_warnings(record):
    return [w for w in record if "CUDA-graph capture" in str(w.message)]


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(latent_decode, "_graphs_supported", lambda device: True)


def test_no_graph_attempt_on_cpu_by_default():
    lm = tiny_lm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(run(lm, True), run(lm, False))


def test_capture_failure_falls_back_with_one_warning(graphs_on_cpu, monkeypatch):
    lm = tiny_lm()
    eager = run(lm, False)
    calls = []

    def broken_capture(self, *buffers):
        calls.append(1)
        self.step(*buffers)  # like the real warm-up: writes the step's rows and advances the cache
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(latent_decode.DecodeStep, "capture", broken_capture)
    with pytest.warns(RuntimeWarning) as record:
        out = run(lm, True, return_latents=True)
    assert len(fallback_warnings(record)) == 1 and len(calls) == 1  # tried once, then eager to the end
    assert same(out, eager)
    assert torch.equal(out.latents, run(lm, False, return_latents=True).latents)


def test_first_replay_failure_falls_back(graphs_on_cpu, monkeypatch):
    lm = tiny_lm()
    eager = run(lm, False, feedback="soft")

    def fake_capture(self, *buffers):
        self.graph = object()

    def broken_replay(self):
        self.cache.advance(1)  # a replay that ran part of the step before failing
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(latent_decode.DecodeStep, "capture", fake_capture)
    monkeypatch.setattr(latent_decode.DecodeStep, "replay", broken_replay)
    with pytest.warns(RuntimeWarning) as record:
        out = run(lm, True, feedback="soft")
    assert len(fallback_warnings(record)) == 1
    assert same(out, eager)


def test_real_capture_failure_on_a_cpu_build(graphs_on_cpu):
    if torch.cuda.is_available():
        pytest.skip("capture succeeds where CUDA is available")
    lm = tiny_lm()
    with pytest.warns(RuntimeWarning) as record:
        out = run(lm, True)
    assert len(fallback_warnings(record)) == 1
    assert same(out, run(lm, False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_fills_the_model_positions_to_the_last(family):
    """prompt + latents + max_new_tokens == max_position is allowed (generate's own check) and runs: the decode
    cache holds exactly the positions the answer needs, which GPT-2's learned positions also bound."""
    from coconut_kernels import LatentLM
    from coconut_kernels.models import GPT2, GPT2Config, Llama, LlamaConfig
    torch.manual_seed(0)
    model = (GPT2(GPT2Config(vocab_size=16, n_layer=1, n_head=2, d_model=8, max_position=32)) if family == "gpt2"
             else Llama(LlamaConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, d_ff=16, max_position=32)))
    lm = LatentLM(model.eval(), 13, 12, 14, 15)
    ids = torch.tensor([[1, 2, 12, 13, 13, 14], [0, 3, 4, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
    full = lm.generate(ids, mask, max_new_tokens=26, eos_token_id=-1)
    assert full.lengths.tolist() == [26, 26]
    short = lm.generate(ids, mask, max_new_tokens=20, eos_token_id=-1)
    assert torch.equal(full.tokens[:, :20], short.tokens)
