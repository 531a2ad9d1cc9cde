"""Optimizers (optax), learning-rate schedules and parameter masks (weight decay, frozen parameters).

Everything works on any pytree of arrays, `nnx.State` included. Masks are pytrees of Python bools with the same
structure as the parameters.

Schedules follow xorl (`lr_warmup_ratio`, `lr_decay_style`, `lr_decay_ratio`, `lr_min`): the value for optimizer
update k (k = 0 for the first update) is
- warmup, k < W = int(total_steps * warmup_ratio): lr * k / W (the first update of a warmed-up run uses lr 0);
- constant: lr;
- linear: max(lr_min, lr * (E - k) / (E - W)) with E = int(total_steps * decay_ratio) (xorl's linear ignores
  decay_ratio and floors at 1e-7; with decay_ratio 1.0 the two agree);
- cosine: lr_min + (lr - lr_min) * (1 + cos(pi * (k - W) / (E - W))) / 2 until E, then lr_min.
So decay_ratio < 1 reaches lr_min early (at fraction decay_ratio of training) and holds it.

Muon (`build_optimizer(optimizer="muon")`, `scale_by_muon`): the weight matrices (`default_muon_dims`) get
Newton-Schulz orthogonalised momentum, everything else AdamW; see docs/OPTIMIZERS.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

DECAY_STYLES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "anyprecision_adamw", "sgd", "signsgd", "muon")
_STATE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the config maps xorl's fp32 / bf16 to these
NO_DECAY_NAME_PARTS = ("norm", "bias")


# ------------------------------------------------------------------------------------------------ schedules
def build_schedule(*, lr: float, lr_min: float = 0.0, total_steps: int, warmup_ratio: float = 0.0,
                   decay_style: str = "cosine", decay_ratio: float = 1.0) -> optax.Schedule:
    """The learning rate as a function of the number of optimizer updates already applied (see module doc)."""
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"lr_decay_style {decay_style!r} is not one of {DECAY_STYLES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"lr_warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if not 0.0 <= decay_ratio <= 1.0:
        raise ValueError(f"lr_decay_ratio must be in [0, 1], got {decay_ratio}")
    if lr_min > lr:
        raise ValueError(f"lr_min ({lr_min}) is larger than lr ({lr})")
    warmup = int(total_steps * warmup_ratio)
    decay_end = int(total_steps * decay_ratio)
    span = float(max(1, decay_end - warmup))

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        warm = lr * k / max(1, warmup)
        if decay_style == "constant":
            after = jnp.full_like(k, lr)
        elif decay_style == "linear":
            after = jnp.maximum(lr_min, lr * (decay_end - k) / span)
        else:
            progress = jnp.clip((k - warmup) / span, 0.0, 1.0)
            after = lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            after = jnp.where(k > decay_end, lr_min, after)  # also when decay ends inside the warmup
        return jnp.where(k < warmup, warm, after)

    return schedule


# ------------------------------------------------------------------------------------------------ masks
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def params_with_path(params) -> list[tuple[tuple[str, ...], Any, tuple | None]]:
    """[(path names, array, logical axes or None)] of every parameter, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
    out = []
    for path, leaf in flat:
        names = tuple(_key_name(k) for k in path)
        if _is_variable(leaf):
            axes = leaf.get_metadata().get("axes")
            out.append((names, leaf.get_value(), tuple(axes) if axes is not None else None))
        else:
            out.append((names, leaf, None))
    return out


def map_params_with_path(fn: Callable[[tuple[str, ...], Any, tuple | None], Any], params) -> Any:
    """Apply fn(path_names, array, logical_axes_or_None) to every parameter; returns a pytree with the exact
    structure of `params` (nnx Variables keep their node, holding fn's result)."""
    out = [fn(*entry) for entry in params_with_path(params)]
    return jax.tree.unflatten(jax.tree.structure(params), out)


def default_decay_mask(params) -> Any:
    """True where weight decay applies. Like HF Trainer: no decay on norms and biases (any path name containing
    'norm' or 'bias'); embeddings, projections, routers decay. Also no decay on vectors (per-head scalars such
    as Gated DeltaNet's A_log); the stacked `layers` axis of scanned layers does not count as a dimension."""

    def decays(names, x, axes):
        if any(part in name.lower() for name in names for part in NO_DECAY_NAME_PARTS):
            return False
        rank = len([a for a in axes if a != "layers"]) if axes is not None else jnp.ndim(x)
        return rank >= 2

    return map_params_with_path(decays, params)


def leaf_squared_norms(tree) -> list[jax.Array]:
    """The fp32 sum of squares of every leaf, in tree order: the parts of the global norm. The train step (metrics,
    non-finite flags) and the clipping transform both take them from here, so XLA sees the same reductions twice
    and reads every gradient once for both."""
    return [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]


def global_grad_norm(grads, trainable_mask=None) -> jax.Array:
    """L2 norm over all gradients (only the trainable ones when a mask is given), in fp32."""
    if trainable_mask is not None:
        grads = jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), grads, trainable_mask)
    return jnp.sqrt(sum(leaf_squared_norms(grads), jnp.zeros((), jnp.float32)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (updates scaled by max_norm / norm when the norm exceeds max_norm), with the norm
    taken in fp32 by `global_grad_norm` from `leaf_squared_norms` (optax squares bf16 gradients in bf16, a second
    pass over them beside the step's fp32 sums)."""

    def update(updates, state, params=None):
        del params
        norm = global_grad_norm(updates)
        within = norm < max_norm
        clipped = jax.tree.map(lambda t: jnp.where(within, t, (t / norm.astype(t.dtype)) * max_norm), updates)
        return clipped, state

    return optax.GradientTransformation(lambda params: optax.ClipByGlobalNormState(), update)


# ------------------------------------------------------------------------------------------------ transforms
def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit flips about half the output
    bits (uint32 arithmetic wraps)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _element_index(shape) -> jax.Array:
    """Row-major index of every element as uint32 (wrapping past 2^32 elements). Under sharding each shard gets
    its global indices, so the noise below does not depend on the mesh."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return idx


def _rounding_noise(shape, seed: jax.Array) -> jax.Array:
    """16 uniform random bits per element, a counter-based hash of (element index, seed). Unlike jax.random's
    threefry bits it costs a few integer ops per element and fuses into the optimizer update instead of filling a
    parameter-sized buffer of random bits (XLA:CPU materialised those: 1.5 GiB of temporaries for a 64M-parameter
    leaf)."""
    return _fmix32(_fmix32(_element_index(shape) ^ seed) + seed) >> 16


def _stochastic_round_bf16(x32: jax.Array, seed: jax.Array) -> jax.Array:
    """fp32 -> bf16 rounding up or down with probability proportional to the distance (unbiased), so small
    EMA updates (e.g. (1 - b2) with b2 = 0.999) are not lost to round-to-nearest. seed: uint32 scalar, distinct
    per step and per tensor."""
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    rounded = (bits + _rounding_noise(x32.shape, seed)) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    return jnp.where(jnp.isfinite(x32), out, x32).astype(jnp.bfloat16)


def _step_seed(count: jax.Array, salt: int) -> jax.Array:
    """uint32 seed of the rounding noise for optimizer step `count`; different salts give unrelated streams."""
    return _fmix32(jnp.uint32(salt % 2**32) ^ _fmix32(count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))


_PARAM_ROUNDING_SALT = 0x5BD1E995  # the weights' stream, apart from Adam's moments (salted by their `seed`)


def apply_updates(params, updates, step: jax.Array):
    """params + updates, like optax.apply_updates, except that a bf16 parameter takes the sum in fp32 and rounds
    it stochastically (unbiased): with round-to-nearest an update below half a bf16 step of its weight is lost
    every time (at lr 1e-5 that is every update of a weight above about 0.005), so bf16 weights would stop
    learning. `step` (int32 scalar, the optimizer step) seeds the rounding noise, so a resumed run rounds as the
    uninterrupted one did. A zero update leaves a bf16 weight exactly as it was (frozen parameters)."""
    leaves, treedef = jax.tree.flatten(params)
    deltas = treedef.flatten_up_to(updates)
    seed = _step_seed(step, _PARAM_ROUNDING_SALT)
    out = []
    for i, (p, u) in enumerate(zip(leaves, deltas)):
        if p.dtype == jnp.bfloat16:
            out.append(_stochastic_round_bf16(p.astype(jnp.float32) + u.astype(jnp.float32),
                                              _fmix32(seed + jnp.uint32(i))))
        else:
            out.append((p + u).astype(p.dtype))
    return treedef.unflatten(out)


def scale_by_adam_low_precision(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, *,
                                state_dtype=jnp.bfloat16, stochastic_rounding: bool = True,
                                seed: int = 0) -> optax.GradientTransformation:
    """Adam scaling with mu and nu stored in `state_dtype` (math in fp32). The state has optax's
    ScaleByAdamState layout, so checkpoints look like the fp32 ones with smaller leaves. The update direction comes
    from the new moments before they are rounded for storage (taking it from the stored ones was measured slower
    inside the train step: docs/PERFORMANCE.md, finished investigations)."""

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), state_dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        c = count.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        step_seed = _step_seed(count, seed)
        out, new_mu, new_nu = [], [], []
        for i, (g, mu, nu) in enumerate(zip(leaves, mus, nus)):
            g32 = g.astype(jnp.float32)
            mu32 = b1 * mu.astype(jnp.float32) + (1.0 - b1) * g32
            nu32 = b2 * nu.astype(jnp.float32) + (1.0 - b2) * g32 * g32
            if stochastic_rounding and jnp.dtype(state_dtype) == jnp.bfloat16:
                new_mu.append(_stochastic_round_bf16(mu32, _fmix32(step_seed + jnp.uint32(2 * i))))
                new_nu.append(_stochastic_round_bf16(nu32, _fmix32(step_seed + jnp.uint32(2 * i + 1))))
            else:
                new_mu.append(mu32.astype(state_dtype))
                new_nu.append(nu32.astype(state_dtype))
            mu_hat = mu32 / (1.0 - b1 ** c)
            nu_hat = nu32 / (1.0 - b2 ** c)
            out.append((mu_hat / (jnp.sqrt(nu_hat) + eps)).astype(g.dtype))
        return (treedef.unflatten(out),
                optax.ScaleByAdamState(count=count, mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu)))

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------------ muon
# Newton-Schulz quintic coefficients of torch.optim.Muon (and xorl); eps floors the Frobenius norm as torch does.
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_EPS = 1e-7
MUON_ADJUST_LR_FNS = ("original", "match_rms_adamw")
# Parameters that take AdamW under muon whatever their shape (xorl: embed_tokens, lm_head, norms, the router
# "gate.weight", which also matches Qwen3.5's shared_expert_gate.weight). The Gated DeltaNet depthwise conv1d
# [channels, kernel] is no matrix product either (xorl sends Qwen3.5's split q/k/v conv1d through Muon).
MUON_ADAMW_NAME_PARTS = ("embed_tokens", "lm_head", "norm", "router", "shared_expert_gate", "conv1d")
_MUON_BATCH_AXES = ("layers", "expert", None)  # None: the (gate, up) axis of a fused gate_up_proj


@dataclasses.dataclass(frozen=True)
class MatrixDims:
    """How muon sees a parameter: a stack of matrices [fan_in, fan_out], one per index of the batch axes (scanned
    layers, experts, the gate and up halves of a fused gate_up_proj), each orthogonalised on its own."""
    batch: tuple[int, ...]
    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]


def muon_matrix_dims(names: tuple[str, ...], x, axes: tuple | None) -> MatrixDims | bool:
    """MatrixDims of a parameter muon orthogonalises, False for one that takes AdamW.

    With logical axes (the models' nnx.Params): batch axes are layers, expert and the fused (gate, up) axis;
    of the rest, the fan-in is `embed` when it comes first (q/k/v, gate/up, in_proj_*: [embed, out...]) and
    everything before `embed` when it comes last (o_proj, down_proj, out_proj: [in..., embed]). Parameters
    without an embed axis (norms, Gated DeltaNet's A_log, dt_bias, conv1d) or named in MUON_ADAMW_NAME_PARTS take
    AdamW. Plain arrays (a LoRA tree: A [*batch, in, r], B [*batch, r, out]) are matrices over their last two
    dims when they have two or more."""
    if any(part in name.lower() for name in names for part in MUON_ADAMW_NAME_PARTS):
        return False
    ndim = len(jnp.shape(x))
    if axes is None:
        if ndim < 2:
            return False
        return MatrixDims(tuple(range(ndim - 2)), (ndim - 2,), (ndim - 1,))
    batch = tuple(i for i, a in enumerate(axes) if a in _MUON_BATCH_AXES)
    rest = [i for i in range(ndim) if i not in batch]
    if len(rest) < 2 or "embed" not in (axes[rest[0]], axes[rest[-1]]):
        return False
    if axes[rest[0]] == "embed":
        return MatrixDims(batch, (rest[0],), tuple(rest[1:]))
    return MatrixDims(batch, tuple(rest[:-1]), (rest[-1],))


def default_muon_dims(params) -> Any:
    """`muon_matrix_dims` of every parameter, a pytree like `params` (MatrixDims or False leaves)."""
    return map_params_with_path(muon_matrix_dims, params)


def muon_lr_ratio(dims: MatrixDims, shape, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's learning-rate adjustment for one matrix of fan-out A and fan-in B (torch reads them
    from its [out, in] weight): original / None = sqrt(max(1, A / B)), match_rms_adamw = 0.2 * sqrt(max(A, B))."""
    fan_out = math.prod(shape[i] for i in dims.fan_out)
    fan_in = math.prod(shape[i] for i in dims.fan_in)
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, fan_out / fan_in))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    raise ValueError(f"muon_adjust_lr_fn {adjust_lr_fn!r} is not one of {MUON_ADJUST_LR_FNS} (or None)")


def orthogonalize(x: jax.Array, dims: MatrixDims, ns_steps: int = 5) -> jax.Array:
    """Newton-Schulz orthogonalisation (torch.optim.Muon's quintic iteration, in fp32) of every matrix of `x`
    (see MatrixDims), each scaled by its own Frobenius norm first. Batch axes stay separate array axes (no
    reshape merges an expert axis sharded under EP with the others), so GSPMD keeps them sharded; the matrix
    axes are contracted wherever they live."""
    a, b, c = NS_COEFFICIENTS
    perm = dims.batch + dims.fan_in + dims.fan_out
    xt = jnp.transpose(x.astype(jnp.float32), perm)
    nb = len(dims.batch)
    n_in = math.prod(xt.shape[nb:nb + len(dims.fan_in)])
    m = xt.reshape(xt.shape[:nb] + (n_in, -1))
    wide = m.shape[-2] <= m.shape[-1]  # iterate on the side with fewer rows: f(X^T) = f(X)^T
    if not wide:
        m = jnp.swapaxes(m, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1), keepdims=True))
    m = m / jnp.maximum(norm, NS_EPS)

    def step(_, m):
        gram = m @ jnp.swapaxes(m, -1, -2)
        return a * m + (b * gram + c * (gram @ gram)) @ m

    m = jax.lax.fori_loop(0, ns_steps, step, m)  # a loop, not unrolled: one copy per leaf in the compiled update
    if not wide:
        m = jnp.swapaxes(m, -1, -2)
    return jnp.transpose(m.reshape(xt.shape), tuple(np.argsort(perm)))


class MuonState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied (seeds bf16 stochastic rounding)
    mu: Any  # momentum buffers like the params; None with momentum 0 (no buffer, as in torch)


def scale_by_muon(dims: list[MatrixDims], *, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  adjust_lr_fn: str | None = None, state_dtype=jnp.float32, stochastic_rounding: bool = True,
                  seed: int = 0x2545F491) -> optax.GradientTransformation:
    """torch.optim.Muon's update direction (xorl's Muon without its sharding approximations), for the leaves
    `dims` describes (in tree order; under `optax.multi_transform` the other leaves are masked out):

        buf = momentum * buf + (1 - momentum) * g           (momentum 0: no buffer, u = g)
        u = (1 - momentum) * g + momentum * buf              (nesterov; else u = buf)
        update = muon_lr_ratio * orthogonalize(u)

    Weight decay and the learning rate follow in the chain. The buffer is stored in `state_dtype` (bf16 with
    unbiased stochastic rounding); the math is fp32."""
    if momentum == 0:
        state_dtype = None

    def init(params):
        mu = None if state_dtype is None else jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_dtype), params)
        return MuonState(count=jnp.zeros((), jnp.int32), mu=mu)

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if len(leaves) != len(dims):
            raise ValueError(f"scale_by_muon was built for {len(dims)} matrices, got {len(leaves)} updates")
        count = optax.safe_int32_increment(state.count)
        mus = [None] * len(leaves) if state.mu is None else treedef.flatten_up_to(state.mu)
        step_seed = _step_seed(count, seed)
        out, new_mu = [], []
        for i, (g, buf, d) in enumerate(zip(leaves, mus, dims)):
            g32 = g.astype(jnp.float32)
            if buf is None:
                u = g32
            else:
                buf32 = momentum * buf.astype(jnp.float32) + (1.0 - momentum) * g32
                u = (1.0 - momentum) * g32 + momentum * buf32 if nesterov else buf32
                if stochastic_rounding and jnp.dtype(state_dtype) == jnp.bfloat16:
                    new_mu.append(_stochastic_round_bf16(buf32, _fmix32(step_seed + jnp.uint32(i))))
                else:
                    new_mu.append(buf32.astype(state_dtype))
            ratio = muon_lr_ratio(d, g.shape, adjust_lr_fn)
            out.append((ratio * orthogonalize(u, d, ns_steps)).astype(g.dtype))
        mu = None if state.mu is None else treedef.unflatten(new_mu)
        return treedef.unflatten(out), MuonState(count=count, mu=mu)

    return optax.GradientTransformation(init, update)



def build_optimizer(*, schedule: optax.Schedule | float, weight_decay: float = 0.0, b1: float = 0.9,
                    b2: float = 0.95, eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                    optimizer: str = "adamw", optimizer_dtype: str = "float32", decay_mask=None,
                    trainable_mask=None, momentum: float | None = None,
                    stochastic_rounding: bool = True, muon_dims=None, muon_schedule: optax.Schedule | float = None,
                    muon_momentum: float = 0.95, muon_nesterov: bool = True, muon_ns_steps: int = 5,
                    muon_adjust_lr_fn: str | None = None) -> optax.GradientTransformation:
    """The optax chain: clip by global norm -> optimizer -> decoupled (AdamW) or L2 (SGD) weight decay -> lr.

    optimizer: adamw | anyprecision_adamw (xorl's name for AdamW with optimizer_dtype moments: the same here) |
      sgd (torch semantics: L2 decay added to the gradient; momentum = `momentum`, or b1 when that is None, as the
      config's adam_beta1 documents; 0 = plain SGD) | signsgd (sign of the gradient, decoupled decay) |
      muon (`scale_by_muon` with decoupled decay and `muon_schedule` on the leaves `muon_dims` marks as matrices,
      AdamW with `schedule` on the others; xorl's split).
    optimizer_dtype: float32 | bfloat16: storage of Adam's mu and nu and of muon's momentum;
      bf16 uses unbiased stochastic rounding unless stochastic_rounding=False.
    decay_mask: pytree of bool, True = decay (default: every parameter). Build one with `default_decay_mask`.
    trainable_mask: pytree of bool, False = frozen: frozen parameters get zero updates and no optimizer state,
      and gradient clipping sees only the trainable gradients.
    muon_dims: pytree like the params of MatrixDims or False (`default_muon_dims`); required for muon.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not supported; use one of {OPTIMIZERS}")
    if optimizer_dtype not in _STATE_DTYPES:
        raise ValueError(f"optimizer_dtype {optimizer_dtype!r} is not one of {sorted(_STATE_DTYPES)}")
    state_dtype = _STATE_DTYPES[optimizer_dtype]
    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(clip_by_global_norm(max_grad_norm))
    decay = [optax.add_decayed_weights(weight_decay, mask=decay_mask)] if weight_decay else []

    def adam():
        if state_dtype == jnp.float32:
            return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        return scale_by_adam_low_precision(b1, b2, eps, state_dtype=state_dtype,
                                           stochastic_rounding=stochastic_rounding)

    if optimizer in ("adamw", "anyprecision_adamw"):
        parts += [adam(), *decay]
    elif optimizer == "sgd":
        parts += decay
        momentum = b1 if momentum is None else momentum
        if momentum:
            parts.append(optax.trace(decay=momentum, accumulator_dtype=state_dtype))
    elif optimizer == "signsgd":
        parts += [optax.scale_by_sign(), *decay]
    if optimizer != "muon":
        parts.append(optax.scale_by_learning_rate(schedule))
    else:
        if muon_dims is None:
            raise ValueError("optimizer muon needs muon_dims (optim.default_muon_dims(params))")
        trainable = (jax.tree.map(lambda d: True, muon_dims) if trainable_mask is None else trainable_mask)
        labels = jax.tree.map(lambda d, m: "muon" if d and m else "adamw", muon_dims, trainable)
        dims = [d for d, label in zip(jax.tree.leaves(muon_dims), jax.tree.leaves(labels)) if label == "muon"]
        muon = optax.chain(
            scale_by_muon(dims, momentum=muon_momentum, nesterov=muon_nesterov, ns_steps=muon_ns_steps,
                          adjust_lr_fn=muon_adjust_lr_fn, state_dtype=state_dtype,
                          stochastic_rounding=stochastic_rounding),
            *decay, optax.scale_by_learning_rate(schedule if muon_schedule is None else muon_schedule))
        adamw = optax.chain(adam(), *decay, optax.scale_by_learning_rate(schedule))
        parts.append(optax.multi_transform({"muon": muon, "adamw": adamw}, labels))
    tx = optax.chain(*parts)
    if trainable_mask is None:
        return tx
    labels = jax.tree.map(lambda m: "trainable" if bool(m) else "frozen", trainable_mask)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def adamw_per_request() -> optax.GradientTransformation:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments, eps outside the square root) with
    every hyperparameter a run-time value in its state (optax.inject_hyperparams): the server's optim_step sets
    learning_rate, b1, b2, eps and weight_decay per request (train_step.make_request_steps). The values here only
    fill the state until the first request."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0)
