"""Greedy answers for quick looks at a trained model (the demo's held-out answers, smoke checks), decoded with the
KV-cache sampler (`xorl_jax.sampling`)."""

from __future__ import annotations

from xorl_jax.sampling import Sampler, SamplingParams


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant reply: the tokenizer's EOS and the chat template's <|im_end|>."""
    ids = (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return sorted({int(t) for t in ids if t is not None})


def greedy_generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 24,
                    chat_template: str | None = None, chat_template_kwargs: dict | None = None) -> list[str]:
    """The assistant's greedy reply to each conversation, rendered with `chat_template` (template text; default the
    tokenizer's) and its extra variables, as the data pipeline renders the training conversations. The reply ends
    before the first end-of-turn token (or after `max_new_tokens`)."""
    extra = dict(chat_template_kwargs or {})
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template, **extra) for c in conversations]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop = end_of_turn_ids(tokenizer)
    results = Sampler(model).sample(ids, SamplingParams(max_tokens=max_new_tokens, temperature=0.0,
                                                        stop=[[t] for t in stop]))
    answers = []
    for r in results:
        seq = r.sequences[0]
        tokens = seq.tokens[:-1] if seq.stop_reason == "stop" else seq.tokens  # the end-of-turn token itself
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers
