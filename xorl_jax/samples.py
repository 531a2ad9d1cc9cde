"""Greedy answers to held-out conversations, printed at the end of a run (train.sample_eval_prompts)."""

from __future__ import annotations

import logging

from xorl_jax.data.chat import resolve_template
from xorl_jax.data.sources import iter_rows
from xorl_jax.generate import greedy_generate

log = logging.getLogger("xorl_jax")


def held_out_conversations(data_cfg, n: int) -> tuple[object, list[list[dict]]]:
    """(the first messages-type eval dataset, its first `n` conversations ending with an assistant turn); (None, [])
    without such a dataset."""
    ds = next((d for d in data_cfg.eval_datasets if d.type == "messages"), None)
    if ds is None:
        return None, []
    convs = []
    for _, row in iter_rows(ds.path, split=ds.split, data_files=ds.data_files):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if msgs and msgs[-1].get("role") == "assistant":
            convs.append(msgs)
        if len(convs) == n:
            break
    return ds, convs


def print_samples(engine, n: int) -> list[tuple[str, str, str]]:
    """Greedy answers of the engine's model to the first `n` held-out conversations: (question, expected, answer)
    triples, printed by the main process. Prompts use the eval dataset's own chat template, as in training."""
    ds, convs = held_out_conversations(engine.cfg.data, n)
    if ds is None:
        log.info("train.sample_eval_prompts: no messages-type eval dataset to take prompts from")
        return []
    tokenizer = engine.tokenizer
    template = resolve_template(ds.chat_template, tokenizer) if ds.chat_template else None
    answers = greedy_generate(engine.merged_model(), tokenizer, [c[:-1] for c in convs], chat_template=template,
                              chat_template_kwargs=ds.chat_template_kwargs)
    out = [(c[-2]["content"], c[-1]["content"], a) for c, a in zip(convs, answers)]
    if engine.is_main:
        print("held-out questions, greedy answers:", flush=True)
        for q, want, got in out:
            mark = "ok " if got == want else "   "
            print(f"  {mark}{q!r} -> {got!r} (reference {want!r})", flush=True)
    return out
