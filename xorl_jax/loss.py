"""Cross-entropy of the LM head computed in vocabulary chunks: the [tokens, vocab] logits never exist at once,
neither in the forward nor in the backward (a custom VJP recomputes each chunk's logits).

Shape letters: N tokens (all leading dims of `hidden` flattened), D hidden size, V vocabulary, C number of vocab
chunks, K vocab columns per chunk (V <= C*K).

Why vocabulary chunks and not token chunks: each chunk's weight gradient dW[:, chunk] is complete after one
matmul over all tokens, so under data/FSDP sharding it is reduced across devices once in total (token chunks
would all-reduce the full [D, V] gradient once per chunk), and dh accumulates locally. Chunk j holds the strided
columns {j, j + C, j + 2C, ...}: a vocab axis sharded in blocks (tensor parallel) stays sharded inside every chunk.

Peak extra memory is a few [N, K] fp32 buffers (logits, probabilities, their gradient) plus an fp32 [N, D]
accumulator for dh: choose chunk_size so that N * chunk_size * 4 bytes fits comfortably.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


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


def _chunk_logits(h_ND, w_DK, j, plan: _Plan):
    """Logits of chunk j in fp32 (rounded through logits_dtype), soft-capped, padding columns at -inf.
    Also returns the capped logits divided by the cap (for the tanh derivative) or None."""
    z = jnp.dot(h_ND, w_DK, preferred_element_type=jnp.float32)
    z = z.astype(plan.logits_dtype).astype(jnp.float32)
    t = None
    if plan.soft_cap is not None:
        t = jnp.tanh(z / plan.soft_cap)
        z = plan.soft_cap * t
    if plan.padded:
        column = jnp.arange(plan.chunk) * plan.n_chunks + j
        z = jnp.where(column[None, :] < plan.vocab, z, -jnp.inf)
    return z, t


def _label_slots(labels_N, valid_N, plan: _Plan):
    """(chunk index, column within the chunk) of every label; chunk -1 for ignored tokens."""
    safe = jnp.where(valid_N, labels_N, 0)
    return jnp.where(valid_N, safe % plan.n_chunks, -1), safe // plan.n_chunks


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


def chunked_cross_entropy(hidden, head_w, labels, *, chunk_size: int = 8192, ignore_index: int = -100,
                          logits_dtype=jnp.float32, soft_cap: float | None = None):
    """Sum over tokens of -log softmax(hidden @ head_w)[label], without materialising the full logits.

    hidden [..., D] (any float dtype; matmuls run in the promoted dtype of hidden and head_w with fp32
    accumulation), head_w [D, V], labels [...] integer next-token targets in [0, V) or `ignore_index`; any other
    label makes loss_sum NaN (so a bad batch is caught as a non-finite step rather than trained on silently).
    chunk_size: vocabulary columns per chunk. soft_cap: logits -> cap * tanh(logits / cap) when set.
    Returns (loss_sum fp32 scalar, n_valid int32 scalar); differentiable w.r.t. hidden and head_w.
    """
    D = hidden.shape[-1]
    if head_w.ndim != 2 or head_w.shape[0] != D:
        raise ValueError(f"head_w must be [D={D}, V], got shape {head_w.shape}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must equal hidden's leading shape {hidden.shape[:-1]}")
    plan = _plan(head_w.shape[1], chunk_size, logits_dtype, soft_cap)
    labels_N = labels.reshape(-1).astype(jnp.int32)
    valid_N = labels_N != ignore_index
    loss = _ce_sum(plan, hidden.reshape(-1, D), head_w, labels_N, valid_N)
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
