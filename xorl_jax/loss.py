"""Cross-entropy of the LM head without materialising the [tokens, vocab] logits of a whole batch.

Shape letters: N tokens (all leading dims of `hidden` flattened), D hidden size, V vocabulary, n tokens per chunk,
C number of chunks, K vocab columns per chunk.

Two ways to chunk, one result:
- token chunks (the default): each chunk of n tokens gets its full-vocabulary logits [n, V], its loss, and, when
  differentiated, its gradients at once: dh for its tokens and its share of dW, accumulated in fp32. Three head
  matmuls per chunk (logits, dh, dW) and one pass over the logits; the backward only scales the saved gradients by
  the incoming cotangent. On several devices each device runs the chunks of its own tokens (shard_map over the
  batch axes) and the head gradient is summed across devices once, after the last chunk (reduce-scattered to the
  head's FSDP shards). A head that nothing differentiates (frozen under LoRA) gets no gradient matmul.
- vocabulary chunks (when a tensor-parallel mesh splits the head's vocab axis): chunk j holds the strided columns
  {j, j + C, ...}, so a block-sharded vocab stays sharded inside every chunk; the forward takes the log-sum-exp,
  and the backward recomputes each chunk's logits (four head matmuls).

Peak extra memory: a few [n, V] fp32 buffers (token chunks) or [N, K] (vocab chunks), plus an fp32 [D, V] head
gradient (token chunks) or an [N, D] dh accumulator (vocab chunks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from xorl_jax.parallel.rules import _as_tuple, current, logical_to_spec, shard_map_compat


@dataclasses.dataclass(frozen=True)
class _Plan:
    vocab: int  # V
    n_chunks: int  # C
    chunk: int  # K
    logits_dtype: str
    soft_cap: float | None

    @property
    def padded(self) -> bool:
        return self.n_chunks * self.chunk != self.vocab


_ALIGN = 128  # chunk widths that are multiples of this keep the head matmuls on the GPU's fast GEMM kernels


def _plan(vocab: int, chunk_size: int, logits_dtype, soft_cap) -> _Plan:
    """Chunk count and width for a vocabulary. Wide chunks are made multiples of 128 columns: an odd width (Qwen's
    151936 = 2^7 * 1187 split 32 ways is 4748 columns) sends every head matmul to slow unaligned GEMM kernels,
    which measured at a third of the GPU's bf16 rate; padding a few hundred columns costs far less."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = -(-vocab // chunk_size)
    width = -(-vocab // n)
    align = _ALIGN if width >= _ALIGN else 1
    # Prefer a chunk count that divides V into aligned chunks (no padded copy of the head); accept up to twice
    # the chunks for it, otherwise pad V up to n aligned chunks.
    for c in range(n, 2 * n + 1):
        if vocab % c == 0 and (vocab // c) % align == 0:
            return _Plan(vocab, c, vocab // c, jnp.dtype(logits_dtype).name, soft_cap)
    chunk = -(-width // align) * align
    return _Plan(vocab, n, chunk, jnp.dtype(logits_dtype).name, soft_cap)


def _split_vocab(w_DV, plan: _Plan):
    """[D, V] -> [C, D, K] with chunk j holding columns j, j + C, ... (zero columns pad V up to C*K)."""
    D = w_DV.shape[0]
    if plan.padded:
        w_DV = jnp.pad(w_DV, ((0, 0), (0, plan.n_chunks * plan.chunk - plan.vocab)))
    return jnp.moveaxis(w_DV.reshape(D, plan.chunk, plan.n_chunks), 2, 0)


def _merge_vocab(w_CDK, plan: _Plan):
    """Inverse of _split_vocab: [C, D, K] -> [D, V]."""
    D = w_CDK.shape[1]
    w = jnp.moveaxis(w_CDK, 0, 2).reshape(D, plan.n_chunks * plan.chunk)
    return w[:, : plan.vocab] if plan.padded else w


def _head_logits(h, w, logits_dtype, soft_cap):
    """h @ w accumulated in fp32, rounded through logits_dtype, returned in fp32 and soft-capped; also the capped
    logits over the cap (for the tanh derivative) or None. bf16 logits of a bf16 matmul come out of it already
    rounded (the same values, half the bytes written and read back)."""
    narrow = jnp.dtype(logits_dtype).itemsize < 4 and h.dtype == w.dtype == jnp.dtype(logits_dtype)
    out_dtype = logits_dtype if narrow else jnp.float32
    z = jnp.dot(h, w, preferred_element_type=out_dtype).astype(logits_dtype).astype(jnp.float32)
    if soft_cap is None:
        return z, None
    t = jnp.tanh(z / soft_cap)
    return soft_cap * t, t


def _chunk_logits(h_ND, w_DK, j, plan: _Plan):
    """Logits of vocab chunk j in fp32, soft-capped, padding columns at -inf (and tanh(z / cap) or None)."""
    z, t = _head_logits(h_ND, w_DK, plan.logits_dtype, plan.soft_cap)
    if plan.padded:
        column = jnp.arange(plan.chunk) * plan.n_chunks + j
        z = jnp.where(column[None, :] < plan.vocab, z, -jnp.inf)
    return z, t


def _label_slots(labels_N, valid_N, plan: _Plan):
    """(chunk index, column within the chunk) of every label; chunk -1 for ignored tokens."""
    safe = jnp.where(valid_N, labels_N, 0)
    return jnp.where(valid_N, safe % plan.n_chunks, -1), safe // plan.n_chunks


def _logsumexp_rows(z_nV):
    """logsumexp over the last axis in one pass over z: a reduction carrying (running max, sum of exp(z - max)),
    where jax.nn.logsumexp reads z twice (the max, then the sum). Each token chunk's [n, V] fp32 logits are the
    largest array of the loss (1.2 GiB for 2048 tokens x 151936), and the loss is memory-bound outside its matmuls."""

    def combine(a, b):
        (m_a, s_a), (m_b, s_b) = a, b
        m = jnp.maximum(m_a, m_b)
        shift = jnp.where(jnp.isneginf(m), 0.0, m)  # both empty: keep 0 * exp(-inf) = 0, not exp(nan)
        return m, s_a * jnp.exp(m_a - shift) + s_b * jnp.exp(m_b - shift)

    z = z_nV.astype(jnp.float32)
    init = (jnp.array(-jnp.inf, jnp.float32), jnp.array(0.0, jnp.float32))
    m, s = jax.lax.reduce((z, jnp.ones_like(z)), init, combine, (z.ndim - 1,))
    return m + jnp.log(s)


def _matmul_dtype(h, w):
    return jnp.result_type(h.dtype, w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce_sum(plan: _Plan, h_ND, w_DV, labels_N, valid_N):
    return _ce_forward(plan, h_ND, w_DV, labels_N, valid_N)[0]


def _ce_forward(plan, h_ND, w_DV, labels_N, valid_N):
    dt = _matmul_dtype(h_ND, w_DV)
    h = h_ND.astype(dt)
    chunk_of, col_of = _label_slots(labels_N, valid_N, plan)

    def body(label_logit_N, xs):
        j, w_DK = xs
        z_NK, _ = _chunk_logits(h, w_DK.astype(dt), j, plan)
        picked = jnp.take_along_axis(z_NK, col_of[:, None], axis=1)[:, 0]
        label_logit_N = label_logit_N + jnp.where(chunk_of == j, picked, 0.0)
        return label_logit_N, jax.nn.logsumexp(z_NK, axis=1)

    w_CDK = _split_vocab(w_DV, plan)
    label_logit, lse_CN = jax.lax.scan(body, jnp.zeros(h.shape[:1], jnp.float32),
                                       (jnp.arange(plan.n_chunks), w_CDK))
    lse_N = jax.nn.logsumexp(lse_CN, axis=0)
    loss = jnp.sum(jnp.where(valid_N, lse_N - label_logit, 0.0))
    out_of_range = valid_N & ((labels_N < 0) | (labels_N >= plan.vocab))
    return jnp.where(jnp.any(out_of_range), jnp.nan, loss), lse_N


def _ce_fwd(plan, h_ND, w_DV, labels_N, valid_N):
    loss, lse_N = _ce_forward(plan, h_ND, w_DV, labels_N, valid_N)
    return loss, (h_ND, w_DV, labels_N, valid_N, lse_N)


def _ce_bwd(plan, residuals, g):
    h_ND, w_DV, labels_N, valid_N, lse_N = residuals
    dt = _matmul_dtype(h_ND, w_DV)
    h = h_ND.astype(dt)
    chunk_of, col_of = _label_slots(labels_N, valid_N, plan)
    scale_N = jnp.where(valid_N, g, 0.0).astype(jnp.float32)

    def body(dh_ND, xs):
        j, w_DK = xs
        w_DK = w_DK.astype(dt)
        z_NK, t_NK = _chunk_logits(h, w_DK, j, plan)
        p_NK = jnp.exp(z_NK - lse_N[:, None])
        hit = (chunk_of == j)[:, None] & (jnp.arange(plan.chunk)[None, :] == col_of[:, None])
        dz_NK = (p_NK - hit.astype(jnp.float32)) * scale_N[:, None]
        if t_NK is not None:
            dz_NK = dz_NK * (1.0 - t_NK * t_NK)
        dz_NK = dz_NK.astype(dt)
        dh_ND = dh_ND + jnp.dot(dz_NK, w_DK.T, preferred_element_type=jnp.float32)
        dw_DK = jnp.dot(h.T, dz_NK, preferred_element_type=jnp.float32).astype(w_DV.dtype)
        return dh_ND, dw_DK

    dh, dw_CDK = jax.lax.scan(body, jnp.zeros(h.shape, jnp.float32),
                              (jnp.arange(plan.n_chunks), _split_vocab(w_DV, plan)))
    return dh.astype(h_ND.dtype), _merge_vocab(dw_CDK, plan), None, None


_ce_sum.defvjp(_ce_fwd, _ce_bwd)


# ------------------------------------------------------------------------------------------------ token chunks
@dataclasses.dataclass(frozen=True)
class _TokenPlan:
    chunk: int  # n, tokens per chunk
    logits_dtype: str
    soft_cap: float | None
    head_dtype: str  # dtype of head_w (and of its gradient)


def _token_chunks(plan: _TokenPlan, h_ND, w_DV, labels_N, valid_N, with_grads: bool, with_dw: bool = True):
    """Loss sum over this device's tokens and, with_grads, (dh [N, D] in h's dtype, dW [D, V] fp32 or None when
    not with_dw, e.g. a frozen head under LoRA) of that sum."""
    N, D = h_ND.shape
    V = w_DV.shape[1]
    dt, h_dtype = _matmul_dtype(h_ND, w_DV), h_ND.dtype
    n = max(1, min(plan.chunk, N))
    C = -(-N // n)
    pad = C * n - N
    if pad:  # padding tokens are ignored ones: no loss, no gradient
        h_ND = jnp.pad(h_ND, ((0, pad), (0, 0)))
        labels_N, valid_N = jnp.pad(labels_N, (0, pad)), jnp.pad(valid_N, (0, pad))
    w = w_DV.astype(dt)
    xs = (h_ND.reshape(C, n, D), labels_N.reshape(C, n), valid_N.reshape(C, n))

    def body(dw_DV, chunk):
        h_nD, labels_n, valid_n = chunk
        h_nD = h_nD.astype(dt)
        z, t = _head_logits(h_nD, w, plan.logits_dtype, plan.soft_cap)
        lse = _logsumexp_rows(z)
        safe = jnp.where(valid_n, labels_n, 0)
        picked = jnp.take_along_axis(z, safe[:, None], axis=1)[:, 0]
        loss = jnp.sum(jnp.where(valid_n, lse - picked, 0.0))
        if not with_grads:
            return dw_DV, (loss, None)
        hit = jnp.arange(V)[None, :] == safe[:, None]
        dz = jnp.where(valid_n[:, None], jnp.exp(z - lse[:, None]) - hit.astype(jnp.float32), 0.0)
        if t is not None:
            dz = dz * (1.0 - t * t)
        dz = dz.astype(dt)
        dh_nD = jnp.dot(dz, w.T, preferred_element_type=jnp.float32).astype(h_dtype)
        if with_dw:
            dw_DV = dw_DV + jnp.dot(h_nD.T, dz, preferred_element_type=jnp.float32)
        return dw_DV, (loss, dh_nD)

    dw0 = jnp.zeros((D, V) if with_grads and with_dw else (), jnp.float32)
    dw, (loss_C, dh_CnD) = jax.lax.scan(body, dw0, xs)
    out_of_range = valid_N & ((labels_N < 0) | (labels_N >= V))
    loss = jnp.where(jnp.any(out_of_range), jnp.nan, jnp.sum(loss_C))
    if not with_grads:
        return loss, None, None
    return loss, dh_CnD.reshape(C * n, D)[:N], dw if with_dw else None


def _head_grad_split(ctx, batch_axes: tuple, D: int) -> tuple[tuple, tuple]:
    """(axes to reduce-scatter dW's D rows over, axes to sum it over): the batch axes that also shard the head's
    `embed` dimension (FSDP) leave each device only its own rows of the sum, as the parameter is sharded; the others
    (data-parallel replicas) add the whole of it."""
    embed = [a for a in ctx.param_axes("embed") if a in batch_axes]
    size = math.prod(ctx.axis_size(a) for a in embed)
    scatter = tuple(embed) if embed and D % size == 0 else ()
    return scatter, tuple(a for a in batch_axes if a not in scatter)


def _on_devices(plan: _TokenPlan, h_ND, w_DV, labels_N, valid_N, with_grads: bool, with_dw: bool = True):
    """_token_chunks on each device's own tokens (split over the batch mesh axes), the loss summed across them and
    dW reduced once (reduce-scattered to the head's FSDP shards where they divide it); a plain call without a
    multi-device mesh context."""
    from jax.sharding import PartitionSpec as P

    run = functools.partial(_token_chunks, plan, with_grads=with_grads, with_dw=with_dw)
    ctx = current()
    if ctx is None or ctx.mesh.size == 1:
        return run(h_ND, w_DV, labels_N, valid_N)
    rows = logical_to_spec(("tokens", None), ctx.rules.activations, ctx.mesh, h_ND.shape)
    axes = rows[0]
    if axes is None:
        return run(h_ND, w_DV, labels_N, valid_N)
    scatter, summed = _head_grad_split(ctx, _as_tuple(axes), w_DV.shape[0])

    def reduce_dw(dw):
        if scatter:
            dw = jax.lax.psum_scatter(dw, scatter, scatter_dimension=0, tiled=True)
        return jax.lax.psum(dw, summed) if summed else dw

    def local(h, w, labels, valid):
        loss, dh, dw = run(h, w, labels, valid)
        out = (jax.lax.psum(loss, axes),)
        if with_grads:
            out += (dh,) + ((reduce_dw(dw),) if with_dw else ())
        return out

    dw_spec = P(scatter or None, None)
    outs = (P(),) + ((rows,) + ((dw_spec,) if with_dw else ()) if with_grads else ())
    got = shard_map_compat(local, ctx.mesh, (rows, P(), P(axes), P(axes)), outs)(h_ND, w_DV, labels_N, valid_N)
    return tuple(got) + (None,) * (3 - len(got))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce_tokens(plan: _TokenPlan, h_ND, w_DV, labels_N, valid_N):
    return _on_devices(plan, h_ND, w_DV, labels_N, valid_N, with_grads=False)[0]


def _ce_tokens_fwd(plan, h_ND, w_DV, labels_N, valid_N):
    # symbolic zeros: `w_DV.perturbed` is False when nothing differentiates the head (frozen under LoRA); then its
    # gradient matmul and fp32 [D, V] accumulator are skipped
    loss, dh, dw = _on_devices(plan, h_ND.value, w_DV.value, labels_N.value, valid_N.value, with_grads=True,
                               with_dw=w_DV.perturbed)
    return loss, (dh, dw)


def _ce_tokens_bwd(plan, residuals, g):
    # the gradients of the loss sum were computed in the forward: scale them by the cotangent of that sum
    dh, dw = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the loss does not reach the objective
        return None, None, None, None
    g = g.astype(jnp.float32)
    dw = None if dw is None else (dw * g).astype(plan.head_dtype)
    return (dh.astype(jnp.float32) * g).astype(dh.dtype), dw, None, None


_ce_tokens.defvjp(_ce_tokens_fwd, _ce_tokens_bwd, symbolic_zeros=True)


def _vocab_is_split() -> bool:
    """True when the current mesh splits the head's vocab axis over a tensor-parallel axis of size > 1."""
    ctx = current()
    if ctx is None:
        return False
    return any(ctx.axis_size(a) > 1 for a in ctx.param_axes("vocab"))


CE_METHODS = ("auto", "tokens", "vocab")


def chunked_cross_entropy(hidden, head_w, labels, *, chunk_size: int = 2048, ignore_index: int = -100,
                          logits_dtype=jnp.float32, soft_cap: float | None = None, method: str = "auto",
                          vocab_chunk: int | None = None):
    """Sum over tokens of -log softmax(hidden @ head_w)[label], without materialising the full logits.

    hidden [..., D] (any float dtype; matmuls run in the promoted dtype of hidden and head_w with fp32
    accumulation), head_w [D, V], labels [...] integer next-token targets in [0, V) or `ignore_index`; any other
    label makes loss_sum NaN (so a bad batch is caught as a non-finite step rather than trained on silently).
    chunk_size: tokens per chunk, i.e. about chunk_size x V logits at once. method: tokens | vocab | auto (vocab
    chunks when a tensor-parallel mesh splits the vocab, else tokens). vocab_chunk: columns per vocab chunk
    (default: as many logits as a token chunk holds).
    soft_cap: logits -> cap * tanh(logits / cap) when set.
    Returns (loss_sum fp32 scalar, n_valid int32 scalar); differentiable w.r.t. hidden and head_w.
    """
    D = hidden.shape[-1]
    if head_w.ndim != 2 or head_w.shape[0] != D:
        raise ValueError(f"head_w must be [D={D}, V], got shape {head_w.shape}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must equal hidden's leading shape {hidden.shape[:-1]}")
    if method not in CE_METHODS:
        raise ValueError(f"cross-entropy method {method!r} is not one of {CE_METHODS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    labels_N = labels.reshape(-1).astype(jnp.int32)
    valid_N = labels_N != ignore_index
    h_ND = hidden.reshape(-1, D)
    if method == "vocab" or (method == "auto" and _vocab_is_split()):
        V = head_w.shape[1]
        columns = vocab_chunk or max(1, min(V, chunk_size * V // max(1, h_ND.shape[0])))
        loss = _ce_sum(_plan(V, columns, logits_dtype, soft_cap), h_ND, head_w, labels_N, valid_N)
    else:
        plan = _TokenPlan(chunk_size, jnp.dtype(logits_dtype).name, soft_cap, jnp.dtype(head_w.dtype).name)
        loss = _ce_tokens(plan, h_ND, head_w, labels_N, valid_N)
    return loss, jnp.sum(valid_N).astype(jnp.int32)


def cross_entropy_reference(hidden, head_w, labels, *, ignore_index: int = -100, soft_cap: float | None = None):
    """The plain jnp version (full fp32 logits): the reference the chunked loss is tested against."""
    logits = jnp.einsum("...d,dv->...v", hidden, head_w, preferred_element_type=jnp.float32)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid).astype(jnp.int32)


# ---------------------------------------------------------------------------- per-token target log-probabilities
@dataclasses.dataclass(frozen=True)
class _LogprobPlan:
    positions: int  # positions of every row per chunk (a chunk is [B, positions] tokens)
    logits_dtype: str
    soft_cap: float | None


def _time_chunks(x, n: int, length: int):
    """[B, T, ...] -> [C, B, n, ...] (T padded with zeros to C * n): a scan over position chunks that keeps every
    row of the batch (and so the batch axis's sharding) in each chunk."""
    pad = -length % n
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, n, *x.shape[2:]), 1, 0)


def _time_unchunk(x, length: int):
    """Inverse of _time_chunks: [C, B, n, ...] -> [B, T, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunk_target_logits(plan: _LogprobPlan, h, w, targets):
    """(target logits - log-sum-exp, log-sum-exp, the chunk's capped logits' tanh or None, logits) of one chunk."""
    z, t = _head_logits(h, w, plan.logits_dtype, plan.soft_cap)
    lse = _logsumexp_rows(z)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return picked - lse, lse, t, z


def _lp_forward(plan: _LogprobPlan, h_BTD, w_DV, targets_BT):
    dt = _matmul_dtype(h_BTD, w_DV)
    T = h_BTD.shape[1]
    w = w_DV.astype(dt)

    def body(_, xs):
        h, targets = xs
        lp, lse, _, _ = _chunk_target_logits(plan, h.astype(dt), w, targets)
        return None, (lp, lse)

    xs = (_time_chunks(h_BTD, plan.positions, T), _time_chunks(targets_BT, plan.positions, T))
    _, (lp, lse) = jax.lax.scan(body, None, xs)
    return _time_unchunk(lp, T), _time_unchunk(lse, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _target_logprobs(plan: _LogprobPlan, h_BTD, w_DV, targets_BT):
    return _lp_forward(plan, h_BTD, w_DV, targets_BT)[0]


def _target_logprobs_fwd(plan, h_BTD, w_DV, targets_BT):
    # symbolic zeros: a head nothing differentiates (frozen under LoRA) gets no gradient matmul and no [D, V] sum
    h, w, targets = h_BTD.value, w_DV.value, targets_BT.value
    lp, lse = _lp_forward(plan, h, w, targets)
    return lp, (h, w, targets, lse, jnp.zeros(()) if w_DV.perturbed else None)


def _target_logprobs_bwd(plan, residuals, g_BT):
    """Each chunk's logits again (nothing [T, V] was kept): d lp / d z = onehot(target) - softmax(z), scaled by the
    chunk's cotangents, then through the head matmul to dh and (when the head is differentiated) dW."""
    h_BTD, w_DV, targets_BT, lse_BT, with_dw = residuals
    if isinstance(g_BT, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    dt = _matmul_dtype(h_BTD, w_DV)
    T, V = h_BTD.shape[1], w_DV.shape[1]
    w = w_DV.astype(dt)

    def body(dw, xs):
        h, targets, lse, g = xs
        h = h.astype(dt)
        z, t = _head_logits(h, w, plan.logits_dtype, plan.soft_cap)
        hit = jnp.arange(V) == targets[..., None]
        dz = g.astype(jnp.float32)[..., None] * (hit.astype(jnp.float32) - jnp.exp(z - lse[..., None]))
        if t is not None:
            dz = dz * (1.0 - t * t)
        dz = dz.astype(dt)
        dh = jnp.einsum("bnv,dv->bnd", dz, w, preferred_element_type=jnp.float32).astype(h_BTD.dtype)
        if with_dw is not None:
            dw = dw + jnp.einsum("bnd,bnv->dv", h, dz, preferred_element_type=jnp.float32)
        return dw, dh

    chunks = lambda x: _time_chunks(x, plan.positions, T)  # noqa: E731
    dw0 = jnp.zeros(w_DV.shape if with_dw is not None else (), jnp.float32)
    dw, dh = jax.lax.scan(body, dw0, (chunks(h_BTD), chunks(targets_BT), chunks(lse_BT), chunks(g_BT)))
    return _time_unchunk(dh, T), (dw.astype(w_DV.dtype) if with_dw is not None else None), None


_target_logprobs.defvjp(_target_logprobs_fwd, _target_logprobs_bwd, symbolic_zeros=True)


def chunked_target_logprobs(hidden, head_w, targets, *, chunk_size: int = 2048, logits_dtype=jnp.float32,
                            soft_cap: float | None = None):
    """log softmax(hidden @ head_w)[target] per position, fp32, without the [B, T, V] logits: hidden [B, T, D],
    head_w [D, V], targets [B, T] integer ids in [0, V) -> [B, T].

    Position chunks of every row (about `chunk_size` tokens of logits at once, as the training loss's token chunks;
    the head's logits computed, rounded through `logits_dtype` and soft-capped as there); the backward recomputes
    each chunk's logits from the saved log-sum-exp rather than keeping them, so differentiating it (the per-token
    RL losses) adds a few [chunk, V] fp32 buffers and, for a differentiated head, its fp32 [D, V] gradient."""
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, D] and targets [B, T], got {hidden.shape} and {targets.shape}")
    if head_w.ndim != 2 or head_w.shape[0] != hidden.shape[-1]:
        raise ValueError(f"head_w must be [D={hidden.shape[-1]}, V], got shape {head_w.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T = targets.shape
    positions = max(1, min(T, chunk_size // max(B, 1)))
    plan = _LogprobPlan(positions, jnp.dtype(logits_dtype).name, soft_cap)
    return _target_logprobs(plan, hidden, head_w, targets.astype(jnp.int32))
