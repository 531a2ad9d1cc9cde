"""Deterministic arithmetic chat dataset and the tiny ChatML tokenizer of the demo."""
from __future__ import annotations

import json
import os
import random

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_ASK = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"]


def _all_questions(seed: int = 0):
    """Every (a, op, b) in a fixed shuffled order."""
    items = [(a, op, b) for op in _OPS for a in range(100) for b in range(100 if op != "*" else 13)]
    random.Random(seed).shuffle(items)
    return items


def _conversation(a, op, b, phrasing: int):
    question = _ASK[phrasing % len(_ASK)].format(a=a, op=op, b=b)
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": f"{a} {op} {b} = {_OPS[op](a, b)}."}]


def make_dataset(n_train: int = 4000, n_eval: int = 200, seed: int = 0):
    """(train, eval) lists of {"messages": [...]}; eval questions never appear in train."""
    items = _all_questions(seed)
    rng = random.Random(seed + 1)
    eval_items, train_items = items[:n_eval], items[n_eval:n_eval + n_train]
    return ([{"messages": _conversation(*q, rng.randrange(3))} for q in train_items],
            [{"messages": _conversation(*q, rng.randrange(3))} for q in eval_items])


def held_out_questions(n: int = 5) -> list[tuple[str, str]]:
    """(question, expected answer) pairs from the eval split, for greedy-decoding checks."""
    _, eval_rows = make_dataset()
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in eval_rows[:n]]


def write_jsonl(rows, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def train_tokenizer(texts, vocab_size: int = 768, split_digits: bool = True):
    """Byte-level BPE over `texts` with the ChatML special tokens, as a transformers fast tokenizer.

    split_digits: every digit is a token of its own, as in Qwen's tokenizer (its pre-tokenizer isolates each \\p{N}).
    Without it BPE learns whole numbers as single tokens, and a model must memorise each result as one symbol
    instead of computing it digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_assets(out_dir: str = DEMO_DIR, n_train: int = 4000, n_eval: int = 200):
    os.makedirs(out_dir, exist_ok=True)
    train, evals = make_dataset(n_train, n_eval)
    write_jsonl(train, os.path.join(out_dir, "train.jsonl"))
    write_jsonl(evals, os.path.join(out_dir, "eval.jsonl"))
    texts = []
    for r in train:
        for m in r["messages"]:
            texts += [m["role"], m["content"]]
    tok = train_tokenizer(texts)
    tok.save_pretrained(out_dir)
    return tok
