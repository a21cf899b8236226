"""GRPO-style reinforcement learning of a COCONUT model on the ProsQA generator, rolled out by LatentEngine.

One step: sample G answers per question with the engine (one prefill per question, the cache forked into G
slots), reward each by exact match of its extracted answer (`data.eval.is_correct`), normalise the rewards
within each question's group (advantage = (r - mean) / (std + eps); a group whose answers all score alike
teaches nothing), then a policy-gradient update through `LatentLM.forward`: the log-probabilities of the
sampled tokens given the prompt and its continuous thoughts, recomputed with gradients (the thoughts are in
the graph, so the update also shapes what the model thinks). The engine holds the same module as the
optimizer, so the next rollout uses the updated weights with no copy.

    python examples/grpo_prosqa.py --steps 3 --questions 4 --group 8          # a tiny model from scratch
    python examples/grpo_prosqa.py --checkpoint runs/my_coconut_hf --steps 20  # a LatentLM.from_pretrained folder

A model trained from scratch answers nothing correctly, so its rewards are all 0 and its updates are zero:
start from a checkpoint trained with the curriculum (coconut-train) to learn anything.
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch

from coconut_kernels import LatentLM
from coconut_kernels.data import WordTokenizer, generate_dataset
from coconut_kernels.data.eval import extract_answer, normalize_answer
from coconut_kernels.data.stages import StageConfig, build_prompt, tokenize_record
from coconut_kernels.engine import LatentEngine, SamplingParams
from coconut_kernels.models import GPT2, GPT2Config


@dataclass
class Question:
    prompt: list[int]  # question <bot> <latent>*k <eot>
    answer: str        # what extract_answer of a correct output equals


def prosqa_questions(records: list[dict], tokenizer, n_latents_stage: int) -> list[Question]:
    """The inference prompts of `records` at curriculum stage `n_latents_stage` (coconut, one thought per
    step), as coconut-eval builds them."""
    cfg = StageConfig(method="coconut", max_latent_stage=n_latents_stage)
    out = []
    for i, r in enumerate(records):
        rec = tokenize_record(r, tokenizer, i)
        out.append(Question(build_prompt(rec, n_latents_stage, cfg, tokenizer).input_ids, rec.expected_answer))
    return out


def rewards_exact_match(tokenizer, questions: list[Question], outputs) -> torch.Tensor:
    """(Q, G): 1.0 where a sample's extracted answer equals its question's answer, else 0.0."""
    return torch.tensor([[float(extract_answer(tokenizer.decode(s.token_ids, skip_special_tokens=True))
                                == normalize_answer(q.answer)) for s in o.samples]
                         for q, o in zip(questions, outputs)])


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's standard deviation."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + eps)


def sampled_logprobs(lm: LatentLM, prompts: list[list[int]], answers: list[list[int]]) -> list[torch.Tensor]:
    """log p(answer token | prompt, its thoughts, the answer before it) of every sampled token, one tensor per
    sequence, through LatentLM.forward (differentiable: thoughts and all). Sequences run one at a time, so
    that no padding enters the forward; a batched version would collate them (data.RaggedCollator)."""
    out = []
    for p, a in zip(prompts, answers):
        if not a:
            out.append(torch.zeros(0))
            continue
        ids = torch.tensor([p + a])
        logits = lm(ids, return_logits=True).logits[0, len(p) - 1:len(p) - 1 + len(a)]
        out.append(logits.float().log_softmax(-1).gather(1, torch.tensor(a)[:, None])[:, 0])
    return out


def grpo_step(lm: LatentLM, engine: LatentEngine, opt: torch.optim.Optimizer, tokenizer,
              questions: list[Question], group: int, max_tokens: int, seed: int,
              reward_fn=rewards_exact_match) -> dict:
    """One GRPO-style step (see the module docstring); returns the step's statistics. Sampling is at
    temperature 1 (on-policy: the log-probabilities of the update are those of the sampling distribution)."""
    lm.eval()  # rollouts and the update see the same function (no dropout)
    params = SamplingParams(n=group, max_tokens=max_tokens, do_sample=True, temperature=1.0, seed=seed)
    outputs = engine.generate([q.prompt for q in questions], params)
    for o in outputs:
        if o.error is not None:
            raise o.error
    rewards = reward_fn(tokenizer, questions, outputs)
    adv = group_advantages(rewards)
    prompts = [q.prompt for q in questions for _ in range(group)]
    answers = [s.token_ids for o in outputs for s in o.samples]
    # An answer holding a thought marker cannot be fed back through forward (its markers would be malformed):
    # it keeps its reward in its group's statistics but sends no gradient. Untrained models draw such tokens.
    markers = {lm.start_latent_id, lm.latent_token_id, lm.end_latent_id}
    keep = [i for i, a in enumerate(answers) if not markers & set(a)]
    logp = sampled_logprobs(lm, [prompts[i] for i in keep], [answers[i] for i in keep])
    n_tokens = max(1, sum(len(answers[i]) for i in keep))
    # sum over a sequence's tokens, weighted by its advantage, averaged over every sampled token (DAPO's
    # token-level mean: long answers are not down-weighted per token)
    flat = adv.flatten()
    loss = -sum((flat[i] * lp.sum() for i, lp in zip(keep, logp)), torch.zeros(())) / n_tokens
    if keep:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"reward": float(rewards.mean()), "loss": loss.item(), "tokens": n_tokens, "answers": answers,
            "old_logprobs": [s.model_logprobs for o in outputs for s in o.samples]}


def tiny_model(vocab_size: int, seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=64, max_position=768))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a LatentLM.from_pretrained folder (default: a tiny "
                                                       "GPT-2 from scratch with a word tokenizer)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--questions", type=int, default=4, help="questions per step")
    ap.add_argument("--group", type=int, default=8, help="G: answers sampled per question")
    ap.add_argument("--latents", type=int, default=4, help="thoughts per prompt (curriculum stage)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    records = generate_dataset(a.steps * a.questions, seed=a.seed)
    if a.checkpoint:
        lm = LatentLM.from_pretrained(a.checkpoint)
        tokenizer = lm.tokenizer
    else:
        tokenizer = WordTokenizer.from_records(records)
        lm = LatentLM(tiny_model(tokenizer.vocab_size, a.seed), tokenizer=tokenizer)
    questions = prosqa_questions(records, tokenizer, a.latents)
    engine = LatentEngine(lm, max_batch=a.questions * a.group, max_tokens=max(len(q.prompt) for q in questions)
                          + a.latents + a.max_tokens + 1)
    opt = torch.optim.AdamW(lm.parameters(), lr=a.lr)
    rng = random.Random(a.seed)
    for step in range(a.steps):
        batch = questions[step * a.questions:(step + 1) * a.questions]
        stats = grpo_step(lm, engine, opt, tokenizer, batch, a.group, a.max_tokens, seed=rng.randrange(2**31))
        print(f"step {step}: mean reward {stats['reward']:.3f}  loss {stats['loss']:+.4f}  "
              f"sampled tokens {stats['tokens']}")


if __name__ == "__main__":
    main()
