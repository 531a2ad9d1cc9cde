"""RL on the CPU demo model through the Tinker API: sample arithmetic answers, reward exact results, train with
importance sampling (or PPO), and watch held-out exact-match accuracy rise.

    python -m xorl_jax.train --config configs/demo_cpu.yaml                  # SFT: outputs/demo_cpu/.../hf_ckpt
    python -m xorl_jax.server --config configs/demo_rl_server.yaml &         # serves that model on 127.0.0.1:8000
    python scripts/rl_demo.py                                                # this client (the tinker SDK)

Questions: one family (`--family`; default add-round: a + b with a or b a multiple of 10, whose units digit is the
other operand's) among those the SFT demo never saw; the first `--eval` are held out (only ever scored), the rest
are the RL questions. Each iteration: save the current weights for sampling, draw `--group` answers to each of
`--prompts` RL questions at temperature 1, reward 1 for the exact result, advantage = reward - the question's mean
reward, one forward_backward with the chosen loss over every answer's tokens (sampled logprobs as the loss's
`logprobs`, the advantage on each answer token), one optim_step. Every `--eval-every` iterations: held-out exact
match of the greedy answer, and of `--eval-samples` answers per question sampled at temperature 1 (the RL
objective's own measure), each with its standard error over questions.

`--family all` or `add` widen the questions (their gains are slower: the SFT model has to learn the arithmetic
itself there, not a rule it half knows); `--reward digits` or `close` trains on partial credit (held-out accuracy
still counts exact results only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import sys
import time

import numpy as np

try:
    import tinker
    from tinker import types
except ImportError:
    sys.exit("this demo drives the server with the tinker SDK: pip install tinker")


# RL task families: which questions the loop trains and scores on. The demo tokenizer writes each digit as a token
# of its own, so a rule over digits is one rule for every question: on add-round the SFT model gets the tens right
# more often than the units digit, which is a copy of the other operand's, and RL on fresh questions teaches the
# copy (README, "Online RL"). On add / all the exact answers depend on carries it is still learning.
FAMILIES = {
    "all": lambda a, op, b: True,
    "add": lambda a, op, b: op == "+",
    "add-round": lambda a, op, b: op == "+" and (a % 10 == 0 or b % 10 == 0),
}
SFT_QUESTIONS = 4200  # the SFT demo's 200 eval + 4000 training questions come first in the fixed order


def questions(family: str, start: int, stop: int | None = None):
    """(question, exact result) of the demo's arithmetic questions start..stop in its fixed order that belong to
    `family`, each in one of the demo's phrasings."""
    from xorl_jax.data.demo import _ASK, _OPS, _all_questions

    keep = FAMILIES[family]
    rng = np.random.default_rng(start)
    items = [(a, op, b, int(rng.integers(3))) for a, op, b in _all_questions(0)[start:stop]]
    return [(_ASK[k].format(a=a, op=op, b=b), _OPS[op](a, b)) for a, op, b, k in items if keep(a, op, b)]


def family_questions(family: str, n_held_out: int, rl_questions: str = "fresh"):
    """(held-out, RL training) questions of `family`. Held out: the first `n_held_out` that the SFT demo never
    used. RL: the rest of those (fresh), or the SFT demo's training questions (sft-train)."""
    unseen = questions(family, SFT_QUESTIONS)
    held_out = unseen[:n_held_out]
    return held_out, (unseen[n_held_out:] if rl_questions == "fresh" else questions(family, 200, SFT_QUESTIONS))


def answer(text: str) -> int | None:
    m = re.search(r"=\s*(-?\d+)\s*\.?\s*$", text.strip())
    return None if m is None else int(m.group(1))


def reward(text: str, result: int) -> float:
    """1 for the exact result, else 0: what the held-out accuracy counts."""
    return float(answer(text) == result)


def training_reward(text: str, result: int, kind: str) -> float:
    """The reward the loop trains on. exact: `reward`. digits: the share of the result's digits (aligned from the
    right, sign as one more) the answer gets right, 1 only for the exact result. close: 1 for the exact result,
    else 0.5 * (1 - |error| / 10) within 10 of it."""
    got = answer(text)
    if kind == "exact" or got is None:
        return reward(text, result)
    if kind == "close":
        return 1.0 if got == result else 0.5 * max(0.0, 1.0 - abs(got - result) / 10)
    want, have = f"{abs(result)}", f"{abs(got)}"
    n = max(len(want), len(have))
    want, have = want.rjust(n), have.rjust(n)
    return (sum(x == y for x, y in zip(want, have)) + ((got < 0) == (result < 0))) / (n + 1)


def prompt_tokens(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def accuracy(sampler, tok, items, pool, samples: int) -> tuple[float, float, float, float]:
    """(greedy exact match, its standard error, exact match of `samples` answers per question at temperature 1,
    its standard error) on `items`; standard errors over questions (a question's sampled answers are one unit)."""
    greedy = types.SamplingParams(max_tokens=24, temperature=0.0)
    sampled = types.SamplingParams(max_tokens=24, temperature=1.0, seed=12345)

    def score(q, r):
        prompt = types.ModelInput.from_ints(prompt_tokens(tok, q))
        g = sampler.sample(prompt, 1, greedy).result().sequences[0]
        s = sampler.sample(prompt, samples, sampled).result().sequences if samples else []
        text = lambda x: tok.decode(x.tokens, skip_special_tokens=True)  # noqa: E731
        return reward(text(g), r), (np.mean([reward(text(x), r) for x in s]) if s else 0.0)

    scores = np.array(list(pool.map(lambda item: score(*item), items)), np.float64).reshape(-1, 2)
    se = scores.std(axis=0) / np.sqrt(max(len(scores) - 1, 1))
    return float(scores[:, 0].mean()), float(se[0]), float(scores[:, 1].mean()), float(se[1])


def accuracy_text(acc) -> str:
    return f"greedy {acc[0]:.1%} +- {acc[1]:.1%}, sampled {acc[2]:.1%} +- {acc[3]:.1%}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="tml-local-demo-key", help="the server's key, if it has one")
    p.add_argument("--base-model", default=None, help="default: the server's model")
    p.add_argument("--loss", default="importance_sampling", choices=["importance_sampling", "ppo", "cispo"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm limit (0: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the training answers")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--prompts", type=int, default=64, help="questions per iteration")
    p.add_argument("--group", type=int, default=8, help="answers sampled per question")
    p.add_argument("--eval", type=int, default=300, help="held-out questions scored")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=4, help="answers sampled per held-out question (temperature 1)")
    p.add_argument("--questions", default="fresh", choices=["fresh", "sft-train"],
                   help="RL questions: ones neither SFT nor the held-out set uses, or the SFT training questions")
    p.add_argument("--advantages", default="centered", choices=["centered", "positive"],
                   help="reward - the question's mean, or only its positive part (reinforce right answers, never "
                        "push wrong ones down: steadier on a small model)")
    p.add_argument("--family", default="add-round", choices=sorted(FAMILIES),
                   help="question family of the RL questions and the held-out ones (add-round: a + b with a or b "
                        "a multiple of 10; add: every a + b; all: every question)")
    p.add_argument("--reward", default="exact", choices=["exact", "digits", "close"],
                   help="training reward (held-out accuracy always counts exact results): see training_reward")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    service = tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    base = args.base_model or tinker.RestClient(base_url=args.base_url, api_key=args.api_key) \
        .get_server_capabilities().result().supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base, rank=args.rank, seed=args.seed).result()
    tok = training.get_tokenizer()
    # held-out and RL questions: never seen by SFT (or RL on the SFT demo's training questions: --questions sft-train)
    held_out, fresh = family_questions(args.family, args.eval, args.questions)
    pool = concurrent.futures.ThreadPoolExecutor(16)
    adam = types.AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.99, eps=args.adam_eps, grad_clip_norm=args.grad_clip)
    t0 = time.time()
    sampler = training.save_weights_and_get_sampling_client().result()
    acc0 = accuracy(sampler, tok, held_out, pool, args.eval_samples)
    print(f"iteration 0: held-out exact match {accuracy_text(acc0)} ({len(held_out)} {args.family} questions, "
          f"{time.time() - t0:.0f} s)", flush=True)
    history = [(0, acc0)]
    for it in range(1, args.iterations + 1):
        batch = [fresh[(it * args.prompts + i) % len(fresh)] for i in range(args.prompts)]
        prompts = [prompt_tokens(tok, q) for q, _ in batch]
        params = types.SamplingParams(max_tokens=24, temperature=args.temperature, seed=args.seed * 100003 + it)
        futs = [pool.submit(lambda pr=pr: sampler.sample(types.ModelInput.from_ints(pr), args.group,
                                                         params).result()) for pr in prompts]
        data, rewards, exact = [], [], []
        for f, pr, (_, result) in zip(futs, prompts, batch):
            seqs = f.result().sequences
            texts = [tok.decode(s.tokens, skip_special_tokens=True) for s in seqs]
            r = np.array([training_reward(t, result, args.reward) for t in texts])
            exact.append(np.mean([reward(t, result) for t in texts]))
            rewards.append(r.mean())
            adv = r - r.mean()
            if args.advantages == "positive":
                adv = np.maximum(adv, 0.0)
            if not np.any(adv):
                continue  # every answer alike: no signal from this question
            for s, a in zip(seqs, adv):
                tokens = pr + list(s.tokens)
                n_prompt = len(pr) - 1
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": np.asarray(tokens[1:], np.int64),
                        "logprobs": np.asarray([0.0] * n_prompt + list(s.logprobs), np.float32),
                        "advantages": np.asarray([0.0] * n_prompt + [a] * len(s.tokens), np.float32)}))
        if data:
            training.forward_backward(data, args.loss).result()
            training.optim_step(adam).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        line = f"iteration {it}: train reward {np.mean(rewards):.3f} (exact {np.mean(exact):.3f}), {len(data)} answers trained"
        if it % args.eval_every == 0 or it == args.iterations:
            acc = accuracy(sampler, tok, held_out, pool, args.eval_samples)
            history.append((it, acc))
            line += f", held-out exact match {accuracy_text(acc)}"
        print(f"{line} ({time.time() - t0:.0f} s)", flush=True)
    print("held-out exact match (greedy / sampled at temperature 1): "
          + ", ".join(f"{a[0]:.1%} / {a[2]:.1%} (iteration {i})" for i, a in history)
          + f"; standard errors at the end {history[-1][1][1]:.1%} / {history[-1][1][3]:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
