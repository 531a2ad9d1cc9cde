"""Greedy decoding for quick looks at a trained model (the demo's held-out answers, smoke checks).

No KV cache: every new token re-runs the whole fixed-size buffer, so one compiled forward serves all steps. Fine
for tiny models and short answers; not a serving path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 24,
                    chat_template: str | None = None, chat_template_kwargs: dict | None = None) -> list[str]:
    """The assistant's greedy reply to each conversation, rendered with `chat_template` (template text; default the
    tokenizer's) and its extra variables, as the data pipeline renders the training conversations."""
    extra = dict(chat_template_kwargs or {})
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template, **extra) for c in conversations]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(len(x) for x in ids) + max_new_tokens
    buf = np.zeros((len(ids), length), np.int32)
    for r, x in enumerate(ids):
        buf[r, :len(x)] = x
    cur = np.asarray([len(x) for x in ids])
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    graphdef, state = nnx.split(model)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), buf.shape)
    segments = jnp.ones(buf.shape, jnp.int32)  # causal attention: tokens never see the empty tail

    @jax.jit
    def next_tokens(state, tokens, cur):
        logits = nnx.merge(graphdef, state)(tokens, positions, segments).logits
        last = jnp.take_along_axis(logits, (cur - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    done = np.zeros(len(ids), bool)
    out = [[] for _ in ids]
    for _ in range(max_new_tokens):
        tok = np.asarray(next_tokens(state, jnp.asarray(buf), jnp.asarray(cur)))
        for r in np.nonzero(~done)[0]:
            if int(tok[r]) in stop:
                done[r] = True
                continue
            out[r].append(int(tok[r]))
            buf[r, cur[r]] = tok[r]
            cur[r] += 1
        if done.all():
            break
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in out]
