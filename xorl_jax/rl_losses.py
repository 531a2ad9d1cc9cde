"""The per-token losses of the Tinker API (`forward_backward(data, loss_fn)`), on the learner's log-probabilities.

Every loss is a sum over tokens (no normalisation: the caller scales advantages or weights as it wants), from
arrays aligned with the model input: position i holds the log-probability the model gives to `target_tokens[i]`.
With `lp` the learner's log-probabilities (differentiated), `q` the sampler's (`logprobs` input), `A` the
`advantages` and `w` the `weights`:

- cross_entropy:        -sum(w * lp)
- importance_sampling:  -sum(exp(lp - q) * A)
- ppo:                  -sum(min(r * A, clip(r, lo, hi) * A)),  r = exp(lp - q); lo, hi default 0.8, 1.2
- cispo:                -sum(stop_gradient(clip(r, lo, hi)) * lp * A);  lo, hi default 0.0, 4.0
- dro:                  -sum(lp * A - beta / 2 * (lp - q)^2);  beta default 1.0

`lo`/`hi` are `clip_low_threshold`/`clip_high_threshold` and `beta` is `beta` of `loss_fn_config` (or, for the
thresholds, per-token inputs of the same name). The RL losses take `weights` too when a datum carries them (a 0/1
mask on the per-token objective, 1 where absent), so prompt tokens can be left out either by zero advantages (as
the Tinker cookbook does) or by zero weights. Padding positions always have `mask` 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# inputs each loss needs (beyond those it may take)
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": (),
    "importance_sampling": ("weights",),
    "ppo": ("weights", "clip_low_threshold", "clip_high_threshold"),
    "cispo": ("weights", "clip_low_threshold", "clip_high_threshold"),
    "dro": ("weights",),
}
# loss_fn_config keys each loss reads, with their defaults
CONFIG_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 1.0},
}
LOSS_NAMES = tuple(REQUIRED_INPUTS)
FLOAT_INPUTS = ("weights", "logprobs", "advantages", "clip_low_threshold", "clip_high_threshold")


def resolved_config(loss_fn: str, config: dict | None) -> dict[str, float]:
    """The loss's config with defaults filled in; ValueError naming an unknown key."""
    defaults = CONFIG_DEFAULTS[loss_fn]
    out = dict(defaults)
    for k, v in (config or {}).items():
        if k not in defaults:
            known = ", ".join(defaults) or "none"
            raise ValueError(f"loss_fn_config.{k}: not a setting of {loss_fn} (its settings: {known})")
        out[k] = float(v)
    return out


def token_objective(loss_fn: str, lp, inputs: dict, config: dict[str, float]):
    """Per-token loss [..., T] (sum it for the loss). `lp`: learner log-probabilities of the targets; `inputs`:
    the float inputs the loss uses plus `mask` (1 on real tokens, 0 on padding); `config` from resolved_config."""
    mask = inputs["mask"].astype(lp.dtype)
    if loss_fn == "cross_entropy":
        return -(inputs["weights"] * lp) * mask
    w = inputs.get("weights")
    mask = mask if w is None else mask * w
    q, adv = inputs["logprobs"], inputs["advantages"]
    if loss_fn == "importance_sampling":
        obj = jnp.exp(lp - q) * adv
    elif loss_fn in ("ppo", "cispo"):
        lo = inputs.get("clip_low_threshold", config["clip_low_threshold"])
        hi = inputs.get("clip_high_threshold", config["clip_high_threshold"])
        ratio = jnp.exp(lp - q)
        clipped = jnp.clip(ratio, lo, hi)
        if loss_fn == "ppo":
            obj = jnp.minimum(ratio * adv, clipped * adv)
        else:
            obj = jax.lax.stop_gradient(clipped) * lp * adv
    elif loss_fn == "dro":
        obj = lp * adv - 0.5 * config["beta"] * jnp.square(lp - q)
    else:
        raise ValueError(f"unknown loss {loss_fn!r}; one of {', '.join(LOSS_NAMES)}")
    # where() rather than a product: a padded position's exp(lp - q) may overflow, and inf * 0 is nan
    return jnp.where(mask != 0, -obj * mask, 0.0)


def token_objective_by_index(loss_index, lp, inputs: dict):
    """token_objective with the loss chosen at run time (`loss_index` into LOSS_NAMES, a traced int), so one
    compiled program serves every loss. `inputs` holds all of mask, weights, logprobs, advantages,
    clip_low_threshold, clip_high_threshold (per token: the config's values broadcast where a request gives none)
    and beta (a scalar)."""
    mask = inputs["mask"].astype(lp.dtype)
    w, q, adv = inputs["weights"], inputs["logprobs"], inputs["advantages"]
    ratio = jnp.exp(lp - q)
    clipped = jnp.clip(ratio, inputs["clip_low_threshold"], inputs["clip_high_threshold"])
    objectives = [
        w * lp,  # cross_entropy
        ratio * adv,  # importance_sampling
        jnp.minimum(ratio * adv, clipped * adv),  # ppo
        jax.lax.stop_gradient(clipped) * lp * adv,  # cispo
        lp * adv - 0.5 * inputs["beta"] * jnp.square(lp - q),  # dro
    ]
    obj = jnp.select([loss_index == i for i in range(len(objectives))], objectives)
    mask = jnp.where(loss_index == 0, mask, mask * w)  # cross_entropy has w in its objective already
    return jnp.where(mask != 0, -obj * mask, 0.0)


def loss_sum(loss_fn: str, lp, inputs: dict, config: dict[str, float]):
    return jnp.sum(token_objective(loss_fn, lp, inputs, config))


def target_logprobs(logits, targets):
    """log softmax(logits)[targets] in fp32: [..., T, V], [..., T] -> [..., T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
