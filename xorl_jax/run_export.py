"""A training run's exports at its end: the HF drop-in replacement of model.model_path (LoRA merged, serving with
the training data's chat template) or, with lora.save_lora_only, a PEFT adapter directory."""

from __future__ import annotations

import logging
import os

import jax

from xorl_jax import lora as lora_lib
from xorl_jax.checkpoint.export import export_hf, host_array
from xorl_jax.checkpoint.orbax import _root_for
from xorl_jax.data.chat import resolve_template

log = logging.getLogger("xorl_jax")


def export_run(engine, step: int) -> str:
    """`global_step_N/hf_ckpt`: a drop-in replacement of model.model_path (checkpoint.export.export_hf: tensors
    the run did not train copied from the source, trained ones in the source's dtypes; LoRA merged), or with
    lora.save_lora_only a PEFT adapter directory. Every process takes part; the main one writes."""
    out = os.path.join(engine.output_dir, f"global_step_{step}", "hf_ckpt")
    if engine.frozen is not None and engine.cfg.lora.save_lora_only:
        return export_lora_adapter(engine, step)  # every adapter, routed experts included, has a PEFT layout
    export_hf(engine.merged_model(), out,
              source_dir_or_metadata={"hf_config": engine.hf_config, "source": engine.export_source()},
              overwrite=True)
    if engine.is_main:
        carry_training_chat_template(engine.cfg, engine.tokenizer, out)
        print(f"exported HF weights to {out}", flush=True)
    return out


def carry_training_chat_template(cfg, tokenizer, out: str) -> None:
    """The model learnt the chat format of its messages datasets: where they name their own `chat_template`, the
    export serves with that one (chat_template.jinja, which transformers, vLLM and SGLang read before
    tokenizer_config.json's), not the source's. Several different templates: the source's stays, with a warning."""
    specs = [d.chat_template for d in cfg.data.datasets if d.type == "messages"]
    if not any(specs):
        return
    texts = {resolve_template(spec, tokenizer) for spec in specs}
    if len(texts) > 1:
        names = sorted({spec or "the tokenizer's own" for spec in specs})
        log.warning("export: the messages datasets use %d different chat templates (%s); the export keeps the "
                    "source's, put the one to serve with in %s/chat_template.jinja", len(texts),
                    ", ".join(names), out)
        return
    specs = [spec for spec in specs if spec]
    path = os.path.join(out, "chat_template.jinja")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(texts.pop())
    os.replace(tmp, path)
    log.info("export: chat_template.jinja is the training data's template (%s)", specs[0])


def export_lora_adapter(engine, step: int) -> str:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the HF base model."""
    out = os.path.join(engine.output_dir, f"global_step_{step}", "lora_adapter")
    lo = engine.cfg.lora
    host = jax.tree.map(host_array, engine.state.params)  # every process takes part in the gathers
    if engine.is_main:
        model = engine.model
        prefix = type(model).hf_key_map(engine.model_config, root=_root_for(engine.hf_config)).layer_prefix
        lora_lib.export_peft_adapter(
            out, host, engine.lora_targets, rank=lo.lora_rank, alpha=lo.lora_alpha,
            period=len(model.layers.pattern), repeats=model.layers.repeats, layer_prefix=prefix,
            base_model_name_or_path=engine.cfg.model.model_path)
        print(f"exported the LoRA adapter (PEFT) to {out}", flush=True)
    return out
