"""examples/grpo_prosqa.py: two GRPO-style steps on generated ProsQA questions change the weights, and the
engine's next rollout uses them (no copy): its greedy answer is generate's under the new weights and its
log-probs are LatentLM.forward's under the new weights, not the old."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch

from coconut_kernels import LatentLM
from coconut_kernels.data import WordTokenizer, generate_dataset
from coconut_kernels.data.eval import extract_answer
from coconut_kernels.engine import LatentEngine, SamplingParams

spec = importlib.util.spec_from_file_location("grpo_prosqa", Path(__file__).parents[1] / "examples" / "grpo_prosqa.py")
grpo = sys.modules["grpo_prosqa"] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(grpo)

G, MAX_TOKENS = 4, 6


def test_two_grpo_steps_update_the_weights_the_engine_uses():
    torch.set_num_threads(1)
    records = generate_dataset(4, seed=3)
    tok = WordTokenizer.from_records(records)
    lm = LatentLM(grpo.tiny_model(tok.vocab_size), tokenizer=tok)
    qs = grpo.prosqa_questions(records, tok, 2)
    eng = LatentEngine(lm, 2 * G, max(len(q.prompt) for q in qs) + 2 + MAX_TOKENS + 1)
    old = copy.deepcopy(lm)
    opt = torch.optim.SGD(lm.parameters(), lr=0.5)
    stats = []
    for i, seed in ((0, 11), (2, 12)):
        # An untrained model never gives the real answers: reward instead the answer its first seeded sample
        # gives now (the step's rollout repeats it, same weights and seed), so that every group has one reward
        # 1 and the update is not 0.
        first = eng.generate([q.prompt for q in qs[i:i + 2]], SamplingParams(n=G, max_tokens=MAX_TOKENS,
                                                                            do_sample=True, seed=seed))
        for q, o in zip(qs[i:i + 2], first):
            q.answer = extract_answer(tok.decode(o.samples[0].token_ids, skip_special_tokens=True))
        stats.append(grpo.grpo_step(lm, eng, opt, tok, qs[i:i + 2], G, MAX_TOKENS, seed=seed))
    assert all(0 < s["reward"] < 1 for s in stats)  # a learning signal in both steps
    # the update's log-probs of step 1's samples at the old weights are the ones the engine reported (the samples
    # holding a thought marker, which forward refuses as a second <bot> ... block, send no gradient: left out)
    markers = {lm.start_latent_id, lm.latent_token_id, lm.end_latent_id}
    kept = [i for i, a in enumerate(stats[0]["answers"][:G]) if not markers & set(a)]
    assert kept
    with torch.no_grad():
        lp = grpo.sampled_logprobs(old, [qs[0].prompt] * len(kept), [stats[0]["answers"][i] for i in kept])
    for a, i in zip(lp, kept):
        torch.testing.assert_close(a, torch.tensor(stats[0]["old_logprobs"][i]), atol=1e-4, rtol=1e-4)
    changed = [n for (n, p), q in zip(lm.named_parameters(), old.parameters()) if not torch.equal(p, q)]
    assert changed
    out = eng.generate([qs[0].prompt], SamplingParams(max_tokens=MAX_TOKENS))[0].samples[0]
    ref = lm.generate(torch.tensor([qs[0].prompt]), max_new_tokens=MAX_TOKENS)
    assert out.token_ids == ref.tokens[0, :int(ref.lengths[0])].tolist()
    with torch.no_grad():
        new_lp = grpo.sampled_logprobs(lm, [qs[0].prompt], [out.token_ids])[0]
        old_lp = grpo.sampled_logprobs(old, [qs[0].prompt], [out.token_ids])[0]
    torch.testing.assert_close(torch.tensor(out.model_logprobs), new_lp, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(new_lp, old_lp, atol=1e-3)
