"""LoRA target names as xorl, PEFT and Axolotl write them, and which of them a model has.

No JAX here: the config loader checks `lora.lora_target_modules` / `lora_target_parameters` against the model's
config.json before any device is touched (`check_config_targets`). Which layer parts a model has comes from its
family (`FamilyConfig.lora_parts`, models/base.py; the family's module imports JAX but starts nothing).
xorl_jax/lora.py turns the names into adapters on the actual parameters; a test checks that both agree on every
family.

A name is relative to a decoder layer. A target matches a name that equals it or ends with "." + it (PEFT's rule),
so `q_proj` matches `self_attn.q_proj` and, in Qwen3.5's linear-attention layers, `linear_attn.q_proj` (xorl
splits Gated DeltaNet's in_proj_qkv into q/k/v projections and names in_proj_z `g_proj`); `self_attn.q_proj` only
the first. docs/LORA.md says what each name adapts.
"""

from __future__ import annotations

import difflib
import json
import os

from xorl_jax.models import registry

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.qkv_proj")
LINEAR_ATTENTION = (
    "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a", "linear_attn.in_proj_b",
    "linear_attn.out_proj",
    # xorl's split names (q/k/v: slices of in_proj_qkv; g, a, b, o: in_proj_z, in_proj_a, in_proj_b, out_proj)
    "linear_attn.q_proj", "linear_attn.k_proj", "linear_attn.v_proj", "linear_attn.g_proj", "linear_attn.a_proj",
    "linear_attn.b_proj", "linear_attn.o_proj",
    # fused names (Qwen3-Next's; xorl's in_proj_qkvz): one adapter across in_proj_qkv + in_proj_z, in_proj_b + _a
    "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba",
)
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj")
SHARED_EXPERT = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                 "mlp.shared_expert.gate_up_proj")
ROUTED_EXPERTS = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj",
                  "mlp.experts.gate_up_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # lora_target_parameters

PARTS = {"attention": ATTENTION, "linear_attention": LINEAR_ATTENTION, "dense_mlp": DENSE_MLP,
         "shared_expert": SHARED_EXPERT, "routed_experts": ROUTED_EXPERTS}
KNOWN_MODULES = tuple(n for names in PARTS.values() for n in names)
KNOWN_PARAMETERS = EXPERT_PARAMETERS


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def model_parts(hf_config: dict) -> set[str] | None:
    """The layer parts (keys of PARTS) a model of this config.json has, as its family says (`lora_parts` of the
    family config, models/base.py); None for a model_type not registered or a config.json the family refuses (the
    model load reports that)."""
    if hf_config.get("model_type") not in registry.MODEL_TYPES:
        return None
    try:
        return set(registry.model_class(hf_config).config_class.from_hf(hf_config).lora_parts())
    except (KeyError, ValueError, TypeError):
        return None


def available(parts) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(module names, parameter names) of a model with these layer parts."""
    modules = tuple(n for part, names in PARTS.items() if part in parts for n in names)
    return modules, (EXPERT_PARAMETERS if "routed_experts" in parts else ())


def check_target_names(kind: str, targets, valid, known, error=ValueError, lacks: str = "this model"):
    """Raise `error` (one line) for a target that matches no name in `valid`: 'did you mean' the closest known
    name, and the names this model offers."""
    for target in targets or ():
        if any(matches(n, target) for n in valid):
            continue
        offered = f"valid names: {', '.join(_short(valid)) if valid else '(none)'}"
        if any(matches(n, target) for n in known):
            raise error(f"lora.{kind}: {target!r} names no layer of {lacks}; {offered}")
        spellings = sorted({s for n in known for s in _suffixes(n)})
        close = difflib.get_close_matches(str(target), spellings, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if kind == "lora_target_modules" and any(matches(n, target) for n in KNOWN_PARAMETERS):
            hint = "routed-expert parameters go in lora_target_parameters (or name gate_proj/up_proj/down_proj " \
                   "here: one adapter per expert); "
        of = f" of {lacks}" if lacks.startswith("this model") else ""
        raise error(f"lora.{kind}: {target!r} is not a LoRA target name{of}; {hint}{offered}")


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _short(names) -> list[str]:
    """Names as a config writes them: the shortest suffix that is still unique among `names`."""
    out = []
    for n in names:
        for s in reversed(_suffixes(n)):
            if sum(matches(m, s) for m in names) == 1 or s == n:
                out.append(s)
                break
    return sorted(dict.fromkeys(out))


def check_config_targets(cfg, error=ValueError) -> None:
    """Check lora_target_modules / lora_target_parameters of a Config: against the model's config.json when
    model.config_path or model.model_path holds one, else against every name any supported family has."""
    lo = cfg.lora
    hf_config, where = None, None
    for path in (cfg.model.config_path, cfg.model.model_path):
        if not path:
            continue
        file = path if os.path.isfile(path) else os.path.join(path, "config.json")
        try:
            with open(file, encoding="utf-8") as f:
                hf_config, where = json.load(f), file
            break
        except (OSError, ValueError):
            continue  # an unreadable model directory is reported where the model is loaded
    parts = model_parts(hf_config) if hf_config else None
    if parts is None:
        modules, parameters, lacks = KNOWN_MODULES, KNOWN_PARAMETERS, "any supported model"
    else:
        (modules, parameters), lacks = available(parts), f"this model ({hf_config.get('model_type')}, {where})"
    check_target_names("lora_target_modules", lo.lora_target_modules, modules, KNOWN_MODULES, error, lacks)
    check_target_names("lora_target_parameters", lo.lora_target_parameters, parameters, KNOWN_PARAMETERS, error,
                       lacks)
