"""The jitted training and evaluation steps: micro-batch gradient accumulation inside one step, chunked
cross-entropy normalised by the global count of valid label tokens, MoE aux loss, skip-on-non-finite updates.

Batch arrays have shape [A, B, T]: A micro-batches of B rows (the global micro-batch) of T tokens.

The Tinker API's steps (make_request_steps, for the server) split the same work across calls instead: a
forward / backward of any loss of xorl_jax.rl_losses on a [B, T] batch, gradients accumulated over calls, then an
AdamW step with the request's hyperparameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from xorl_jax import rl_losses
from xorl_jax.loss import chunked_cross_entropy, chunked_target_logprobs
from xorl_jax.optim import apply_updates, global_grad_norm, leaf_squared_norms
from xorl_jax.parallel.context import from_ring_order, to_ring_order

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "positions", "segment_ids")
# Batch entry (not an array): the packed attention layout the host fixed for the batch
# (kernels.attention.AttentionLayout); absent = the layout is picked on the device.
LAYOUT_KEY = "attention_layout"


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any  # nnx.State of the trainable + frozen parameters
    opt_state: Any
    nonfinite_streak: jax.Array  # int32: updates skipped in a row because loss or gradients were not finite
    skipped_total: jax.Array  # int32: all skipped updates


@dataclasses.dataclass(frozen=True)
class LossConfig:
    aux_loss_coef: float = 0.0
    ce_chunk_size: int = 2048  # tokens per chunk of the loss
    compute_dtype: Any = jnp.bfloat16
    logits_dtype: Any = jnp.float32  # logits are rounded through this before the softmax (model.lm_head_fp32)


def merged(merge_fn, params, frozen):
    """(the parameters the model runs on, the layer transform for its call): merge_fn(params, frozen) with LoRA,
    else (params, None)."""
    return (params, None) if merge_fn is None else merge_fn(params, frozen)


def run_model(graphdef, params, batch, compute_dtype, layer_transform=None, attention_layout=None):
    """(the model's output with its last hidden states, its output head in `compute_dtype`) on a batch's input_ids,
    positions and segment_ids. `layer_transform` (models.common.LayerTransform) goes to the model call: it rewrites
    each layer group's parameters inside the layer scan (LoRA). `attention_layout`: the packed attention layout
    fixed on the host (kernels.attention.AttentionLayout)."""
    model = nnx.merge(graphdef, params)
    kwargs = {} if layer_transform is None else {"layer_transform": layer_transform}
    if attention_layout is not None:
        kwargs["attention_layout"] = attention_layout
    out = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True, **kwargs)
    return out, model.head_weight(compute_dtype)


def forward_loss(graphdef, params, micro, loss_cfg: LossConfig, layer_transform=None, attention_layout=None):
    """Sum of token cross-entropies of one micro-batch, its valid-token count and its aux loss (run_model's
    arguments)."""
    out, head = run_model(graphdef, params, micro, loss_cfg.compute_dtype, layer_transform, attention_layout)
    loss_sum, n_valid = chunked_cross_entropy(
        # hidden states come in the model's token order: ring order under ring attention (parallel/context.py)
        out.hidden_states, head, to_ring_order(micro["labels"]), chunk_size=loss_cfg.ce_chunk_size, ignore_index=IGNORE_INDEX,
        logits_dtype=loss_cfg.logits_dtype,
    )
    return loss_sum, n_valid, out.aux_loss


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_cfg: LossConfig, *,
                    max_grad_norm: float | None = None, merge_fn=None, attention_layout=None):
    """train_step(state, batch) -> (state, metrics). Pure; jit it with shardings and donation.

    `attention_layout` (kernels.attention.AttentionLayout): the packed attention layout of every batch this step is
    called with (the host planned it); None leaves the choice to the device, per step.

    With `merge_fn(trainable, frozen) -> (params, layer_transform)` (LoRA), the step is
    train_step(state, batch, frozen): `state.params` holds only the trainable tree (the only thing differentiated
    and updated), `frozen` is passed through unchanged (not donated), and the model runs on `params` with
    `layer_transform` (or None) passed to its call, so the merge can happen per layer inside the layer scan."""

    def train_step(state: TrainState, batch, frozen=None):
        n_micro = batch["input_ids"].shape[0]
        total_valid = jnp.maximum(jnp.sum(batch["labels"] != IGNORE_INDEX), 1).astype(jnp.float32)

        def micro_objective(params, micro):
            params, transform = merged(merge_fn, params, frozen)
            loss_sum, n_valid, aux = forward_loss(graphdef, params, micro, loss_cfg, transform, attention_layout)
            # Normalising each micro-batch by the count over the whole step makes accumulation exact:
            # 4 x micro-batch 1 gives the same gradient as micro-batch 4.
            objective = loss_sum / total_valid + loss_cfg.aux_loss_coef * aux / n_micro
            return objective, (loss_sum, aux)

        grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

        def accumulate(carry, micro):
            grads_acc, loss_acc, aux_acc = carry
            (_, (loss_sum, aux)), grads = grad_fn(state.params, micro)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, aux_acc + aux), None

        if n_micro == 1:
            # One micro-batch: its gradients are the sum (a zero-filled tree plus an add would write and read every
            # gradient once more for nothing).
            (_, (loss_sum, aux_sum)), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch))
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss_sum, aux_sum), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), batch
            )
        loss = loss_sum / total_valid
        # One sum of squares per parameter leaf (fp32) gives the global norm and, for free, which gradients went
        # non-finite (a NaN or inf element makes its leaf's sum non-finite, and so does a leaf whose squares
        # overflow): the host names those on a skipped step. No extra pass over the gradients and no conditional
        # (an XLA:GPU conditional makes the host wait for its predicate: here, the whole backward pass).
        squares = jnp.stack(leaf_squared_norms(grads))
        grad_norm = jnp.sqrt(jnp.sum(squares))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        bad_grads = ~jnp.isfinite(squares)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = apply_updates(state.params, updates, state.step)  # bf16 weights: stochastic rounding
        # A non-finite step changes nothing but the counters (the update is skipped, not applied).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "aux_loss": aux_sum / n_micro,
            "grad_norm": grad_norm,
            "valid_tokens": total_valid,
            "finite": finite,
            "nonfinite_grads": bad_grads,  # [parameter leaves], in jax.tree.leaves order of the params
            # the counters as of this step, so the host can read them while the next step already runs
            "step": state.step,
            "nonfinite_streak": state.nonfinite_streak,
            "skipped_total": state.skipped_total,
        }
        return state, metrics

    return train_step


def make_eval_step(graphdef, loss_cfg: LossConfig, *, merge_fn=None):
    """eval_step(params, micro) -> (loss_sum, n_valid) for one [B, T] batch (with merge_fn, as in make_train_step:
    eval_step(trainable, micro, frozen))."""

    def eval_step(params, micro, frozen=None):
        params, transform = merged(merge_fn, params, frozen)
        loss_sum, n_valid, _ = forward_loss(graphdef, params, micro, loss_cfg, transform)
        return loss_sum, n_valid

    return eval_step


def stack_micro_batches(rows: dict, n_micro: int) -> dict:
    """[A*B, T] host arrays -> [A, B, T] (micro-batch major)."""
    return {k: v.reshape(n_micro, v.shape[0] // n_micro, *v.shape[1:]) for k, v in rows.items() if k in BATCH_KEYS}


# ------------------------------------------------------------------------------------- the Tinker API's steps
def token_logprobs(graphdef, params, batch, loss_cfg: LossConfig, layer_transform=None):
    """[B, T] log-probabilities the model gives batch["targets"] at each position of batch["input_ids"] (with
    "positions" and "segment_ids"), in fp32, in chunks of positions as the training loss (loss_cfg.ce_chunk_size
    tokens of logits at once, rounded through loss_cfg.logits_dtype): the [B, T, V] logits never exist at once, in
    the forward or the backward."""
    out, head = run_model(graphdef, params, batch, loss_cfg.compute_dtype, layer_transform)
    # hidden states come in the model's token order (ring order under ring attention): so do the targets, and the
    # logprobs go back to the batch's order
    lp = chunked_target_logprobs(out.hidden_states, head, to_ring_order(batch["targets"]),
                                 chunk_size=loss_cfg.ce_chunk_size, logits_dtype=loss_cfg.logits_dtype)
    return from_ring_order(lp)


class RequestSteps(NamedTuple):
    forward: Callable
    forward_backward: Callable
    update: Callable


def make_request_steps(graphdef, optimizer: optax.GradientTransformation, loss_cfg: LossConfig, *,
                       merge_fn=None) -> RequestSteps:
    """The Tinker API's steps, pure (jit them), with the loss and the optimizer's hyperparameters run-time values,
    so one compile serves every request of a shape:
    - forward(params, batch, loss_index, frozen=None) -> (summed loss, [B, T] log-probabilities of the targets);
      the loss is rl_losses.LOSS_NAMES[loss_index] (token_objective_by_index: the batch holds every loss input);
    - forward_backward(params, grads, batch, loss_index, frozen=None) -> (summed loss, log-probabilities,
      grads + the loss's gradient); grads None starts an accumulation;
    - update(state, grads, hyperparams, clip) -> (state, global gradient norm): one step of `optimizer` (an
      optax.inject_hyperparams one, optim.adamw_per_request: `hyperparams` replaces its values), the gradients
      scaled to norm `clip` first when clip > 0 and their norm is larger.
    With `merge_fn` (LoRA), params is the adapter tree and frozen the base, as in make_train_step."""

    def loss(params, batch, loss_index, frozen=None):
        params, transform = merged(merge_fn, params, frozen)
        lp = token_logprobs(graphdef, params, batch, loss_cfg, transform)
        return jnp.sum(rl_losses.token_objective_by_index(loss_index, lp, batch)), lp

    def forward_backward(params, grads, batch, loss_index, frozen=None):
        (value, lp), g = jax.value_and_grad(loss, has_aux=True)(params, batch, loss_index, frozen)
        return value, lp, (g if grads is None else jax.tree.map(jnp.add, grads, g))

    def update(state: TrainState, grads, hyperparams: dict, clip):
        norm = global_grad_norm(grads)
        factor = jnp.where((clip > 0) & (norm > clip), clip / (norm + 1e-6), 1.0)
        grads = jax.tree.map(lambda g: g * factor, grads)
        opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, **hyperparams})
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), norm

    return RequestSteps(forward=loss, forward_backward=forward_backward, update=update)
