"""What the server makes of a config's keys: xorl's server-only keys it uses, those with no effect here, and the
training keys a Tinker request sets instead (one line each at start-up); the settings it cannot honour are refused
(ConfigError, one line, exit 2) rather than served with another meaning."""

from __future__ import annotations

from xorl_jax.config import SERVER_KEYS_USED, Config, ConfigError

# xorl server keys (config.SERVER_KEYS) that mean something here, and what
USED_SERVER_KEYS: dict[str, str] = {
    "model_name": "the base_model name reported and checked",
    "max_lora_rank": "largest LoRA rank a create_model may ask",
    "log_level": "the server's log level",
}
assert set(USED_SERVER_KEYS) == SERVER_KEYS_USED

# training keys whose role each request takes over (Tinker's optim_step carries AdamParams; data come with requests)
REQUEST_SET = ("train.lr", "train.adam_beta1", "train.adam_beta2", "train.adam_epsilon", "train.weight_decay",
               "train.max_grad_norm", "train.lr_warmup_ratio", "train.lr_decay_style", "data.*")

SERVED_OPTIMIZERS = ("adamw",)


def check(cfg: Config) -> None:
    """ConfigError for a setting the server would have to serve with another meaning."""
    opt = cfg.train.optimizer
    if opt not in SERVED_OPTIMIZERS:
        raise ConfigError(f"train.optimizer {opt}: the server steps with AdamW and each optim_step request's "
                          "AdamParams (the Tinker API), it does not serve a config optimizer; remove train.optimizer "
                          "(or set adamw) to serve this model")


def report(cfg: Config) -> list[str]:
    """Lines naming what the server does with the config's server keys and with the training keys requests set."""
    used = sorted(k for k in cfg.server if k in USED_SERVER_KEYS)
    unused = sorted(k for k in cfg.server if k not in USED_SERVER_KEYS)
    lines = []
    if used:
        lines.append("server keys used here: " + ", ".join(f"{k} ({USED_SERVER_KEYS[k]})" for k in used))
    if unused:
        lines.append("server keys with no effect here (xorl's worker processes, packing, routing replay, inference "
                     "weight sync; docs/SERVER.md): " + ", ".join(unused))
    lines.append("each request sets what these set for training, so they have no effect here: "
                 + ", ".join(REQUEST_SET))
    return lines
