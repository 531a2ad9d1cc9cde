"""RL on the CPU demo model through the Tinker API: sample arithmetic answers, reward exact results, train with
importance sampling (or PPO), and watch held-out exact-match accuracy.

    python -m xorl_jax.train --config configs/demo_cpu.yaml                  # SFT: outputs/demo_cpu/.../hf_ckpt
    python -m xorl_jax.server --config configs/demo_rl_server.yaml &         # serves that model on 127.0.0.1:8000
    python scripts/rl_demo.py                                                # this client (the tinker SDK)

Each iteration: save the current weights for sampling, draw `--group` answers to each of `--prompts` fresh
questions (never seen in SFT or in the held-out set) at temperature 1, reward 1 for the exact result, advantage =
reward - the question's mean reward, one forward_backward with the chosen loss over every answer's tokens (sampled
logprobs as the loss's `logprobs`, the advantage on each answer token), one optim_step. Held-out accuracy on the
demo's 200 eval questions (the first `--eval` of them): exact results of the greedy answer, and of `--eval-samples`
answers sampled at temperature 1 (the RL objective's own measure, with 8x the answers: less noise).

`--family add-round` trains and scores on one family instead (a + b, a or b a multiple of 10): the first `--eval`
such questions after the SFT demo's 4200 are held out, the other ~1200 are the RL questions. `--reward digits` or
`close` trains on partial credit (held-out accuracy still counts exact results only).
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


def questions(start: int, n: int, seed: int = 0):
    """(question, exact result) of the demo's arithmetic questions start..start+n in its fixed order (the SFT
    data uses the first 4200: 200 eval, 4000 train)."""
    from xorl_jax.data.demo import _ASK, _OPS, _all_questions

    items = _all_questions(seed)[start:start + n]
    rng = np.random.default_rng(start)
    return [(_ASK[int(rng.integers(3))].format(a=a, op=op, b=b), _OPS[op](a, b)) for a, op, b in items]


# RL task families: which questions the loop trains and scores on. The SFT model puts its greedy result within 9
# of the truth ~90% of the time but its units digit is right only at chance (~10%); on "round" additions (one
# operand a multiple of 10) the units digit is the other operand's, a rule right samples show (it was not learned
# in the runs so far: README, "Online RL").
FAMILIES = {
    "all": lambda a, op, b: True,
    "add-round": lambda a, op, b: op == "+" and (a % 10 == 0 or b % 10 == 0),
}


def family_questions(family: str, n_held_out: int):
    """(held-out, RL training) questions of `family` among those the SFT demo never used (its first 4200):
    the first `n_held_out` are only ever scored, the rest are the RL loop's."""
    from xorl_jax.data.demo import _ASK, _OPS, _all_questions

    keep = FAMILIES[family]
    rng = np.random.default_rng(4200)
    items = [(_ASK[int(rng.integers(3))].format(a=a, op=op, b=b), _OPS[op](a, b))
             for a, op, b in _all_questions(0)[4200:] if keep(a, op, b)]
    return items[:n_held_out], items[n_held_out:]


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


def accuracy(sampler, tok, items, pool, samples: int) -> tuple[float, float]:
    """(greedy exact match, exact match of `samples` answers per question at temperature 1) on `items`."""
    greedy = types.SamplingParams(max_tokens=24, temperature=0.0)
    sampled = types.SamplingParams(max_tokens=24, temperature=1.0, seed=12345)

    def score(q, r):
        prompt = types.ModelInput.from_ints(prompt_tokens(tok, q))
        g = sampler.sample(prompt, 1, greedy).result().sequences[0]
        s = sampler.sample(prompt, samples, sampled).result().sequences if samples else []
        text = lambda x: tok.decode(x.tokens, skip_special_tokens=True)  # noqa: E731
        return reward(text(g), r), [reward(text(x), r) for x in s]

    scores = list(pool.map(lambda item: score(*item), items))
    return float(np.mean([g for g, _ in scores])), float(np.mean([x for _, s in scores for x in s] or [0.0]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="tml-local-demo-key", help="the server's key, if it has one")
    p.add_argument("--base-model", default=None, help="default: the server's model")
    p.add_argument("--loss", default="importance_sampling", choices=["importance_sampling", "ppo", "cispo"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm limit (0: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the training answers")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--prompts", type=int, default=32, help="questions per iteration")
    p.add_argument("--group", type=int, default=16, help="answers sampled per question")
    p.add_argument("--eval", type=int, default=200, help="held-out questions scored")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=8, help="answers sampled per held-out question (temperature 1)")
    p.add_argument("--questions", default="fresh", choices=["fresh", "sft-train"],
                   help="RL questions: ones neither SFT nor the held-out set uses, or the SFT training questions")
    p.add_argument("--advantages", default="centered", choices=["centered", "positive"],
                   help="reward - the question's mean, or only its positive part (reinforce right answers, never "
                        "push wrong ones down: steadier on a small model)")
    p.add_argument("--family", default="all", choices=sorted(FAMILIES),
                   help="question family of the RL questions and the held-out ones (add-round: a + b with a or b "
                        "a multiple of 10; all: every question, the SFT demo's eval split held out)")
    p.add_argument("--reward", default="exact", choices=["exact", "digits", "close"],
                   help="training reward (held-out accuracy always counts exact results): see training_reward")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    service = tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    base = args.base_model or tinker.RestClient(base_url=args.base_url, api_key=args.api_key) \
        .get_server_capabilities().result().supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base, rank=args.rank, seed=args.seed).result()
    tok = training.get_tokenizer()
    if args.family == "all":
        held_out = questions(0, args.eval)  # the SFT demo's eval split
    # RL questions: never seen by SFT nor in the held-out set (fresh), or the SFT demo's training questions
        fresh = questions(4200, 17000) if args.questions == "fresh" else questions(200, 4000)
    else:
        held_out, fresh = family_questions(args.family, args.eval)
    pool = concurrent.futures.ThreadPoolExecutor(16)
    adam = types.AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.99, eps=args.adam_eps, grad_clip_norm=args.grad_clip)
    t0 = time.time()
    sampler = training.save_weights_and_get_sampling_client().result()
    acc0 = accuracy(sampler, tok, held_out, pool, args.eval_samples)
    print(f"iteration 0: held-out exact match greedy {acc0[0]:.1%}, sampled {acc0[1]:.1%} "
          f"({time.time() - t0:.0f} s)", flush=True)
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
            line += f", held-out exact match greedy {acc[0]:.1%}, sampled {acc[1]:.1%}"
        print(f"{line} ({time.time() - t0:.0f} s)", flush=True)
    print("held-out exact match (greedy / sampled at temperature 1): "
          + ", ".join(f"{g:.1%} / {s:.1%} (iteration {i})" for i, (g, s) in history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
