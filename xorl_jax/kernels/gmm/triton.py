"""Grouped GEMM Triton kernels called through jax-triton (NVIDIA GPUs): forward, dgrad, wgrad and a custom_vjp.

Shapes: M rows (sorted by group), K input features, N output features, E groups (experts).
  forward  y_MN[rows of g]  = x_MK[rows of g] @ w_EKN[g]
  dgrad    dx_MK[rows of g] = dy_MN[rows of g] @ w_EKN[g]^T   (the forward kernel reading w transposed)
  wgrad    dw_EKN[g]        = x_MK[rows of g]^T @ dy_MN[rows of g]   (zero for an empty group)
Gathered rows (`gmm_gather_triton`): row r of x is x_SK[source_M[r]], read by the forward and wgrad kernels straight
from the unsorted source (the MoE's token copies sorted by expert never go to memory).

Schedule: no host synchronisation. Every program of the forward/dgrad kernel reads group_sizes (E int32) and finds
its own (group, row tile) from the cumulative per-group tile counts, so the launch grid is a static upper bound:
cdiv(M, BM) + E + 1 row tiles (each group wastes at most one partial tile). The rows past sum(group_sizes) form
an extra padding group whose tiles store zeros. Programs past the last tile return at once.
Tiles are autotuned among a few configs at the first run of each call site (jax-triton runtime autotuning).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
import jax_triton as jt

# Hopper (H100/H200) bf16 tiles, chosen by a per-kernel sweep on an H100 (benchmarks/bench_gmm.py --sweep); the
# runtime autotuner picks one per call site and caches it for the process.
_MM_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_stages=4, num_warps=8),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_stages=3, num_warps=4),
    triton.Config({"BM": 256, "BN": 128, "BK": 64}, num_stages=3, num_warps=8),
]
_WGRAD_CONFIGS = [  # BM is the reduction (row) step, BK x BN the dw tile
    triton.Config({"BM": 32, "BK": 128, "BN": 128}, num_stages=4, num_warps=4),
    triton.Config({"BM": 64, "BK": 128, "BN": 128}, num_stages=3, num_warps=4),
    triton.Config({"BM": 64, "BK": 128, "BN": 256}, num_stages=3, num_warps=8),
]
# fp32 inputs use exact (ieee) products: small tiles that fit shared memory, no autotuning.
_FP32_MM = dict(BM=64, BN=64, BK=32, num_stages=3, num_warps=4)
_FP32_WGRAD = dict(BM=32, BK=64, BN=64, num_stages=3, num_warps=4)
# XORL_JAX_GMM_AUTOTUNE=0: the first config of each list, no runtime autotuning (a diagnosis switch: it takes the
# autotuner, which runs each config on the live buffers at the first call, out of the picture).
AUTOTUNE_ENV = "XORL_JAX_GMM_AUTOTUNE"


def _untuned(config) -> dict | None:
    if os.environ.get(AUTOTUNE_ENV, "1") != "0":
        return None
    return dict(config.kwargs, num_stages=config.num_stages, num_warps=config.num_warps)


@triton.jit
def _tile_of_program(gs_ptr, t, M: tl.constexpr, E: tl.constexpr, E_BLOCK: tl.constexpr, BM: tl.constexpr):
    """(group, first row, end row) of row tile t; group E is the padding rows, group > E means no tile."""
    offs = tl.arange(0, E_BLOCK)
    sizes = tl.maximum(tl.load(gs_ptr + offs, mask=offs < E, other=0), 0)
    total = tl.sum(sizes, axis=0)
    sizes = tl.where(offs == E, tl.maximum(M - total, 0), sizes)
    row_ends = tl.cumsum(sizes, axis=0)
    tiles = (sizes + BM - 1) // BM
    tile_ends = tl.cumsum(tiles, axis=0)
    g = tl.sum((tile_ends <= t).to(tl.int32), axis=0)
    sel = offs == g
    first_tile = tl.sum(tl.where(sel, tile_ends - tiles, 0), axis=0)
    row_end = tl.sum(tl.where(sel, row_ends, 0), axis=0)
    row_start = row_end - tl.sum(tl.where(sel, sizes, 0), axis=0) + (t - first_tile) * BM
    return g, row_start, tl.minimum(row_end, M)


@triton.jit
def _gmm_kernel(x_ptr, w_ptr, gs_ptr, src_ptr, y_ptr,
                M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr, E_BLOCK: tl.constexpr,
                stride_we: tl.constexpr, stride_wk: tl.constexpr, stride_wn: tl.constexpr, IEEE: tl.constexpr,
                GATHER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[rows] = x[rows, :K] @ W_g with W_g[k, n] at w_ptr + g*stride_we + k*stride_wk + n*stride_wn; GATHER: row r
    of x is x[src[r]] (src_ptr: M int32)."""
    pid = tl.program_id(0)
    N_TILES: tl.constexpr = (N + BN - 1) // BN
    t = pid // N_TILES
    pid_n = pid % N_TILES
    g, row_start, row_end = _tile_of_program(gs_ptr, t, M, E, E_BLOCK, BM)
    # g == E: padding rows (zeros, no products); g > E: no tile (nothing stored)
    rows = row_start + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = (rows < row_end) & (g <= E)
    col_ok = cols < N
    g_safe = tl.minimum(g, E - 1)
    k_iters = tl.where(g < E, tl.cdiv(K, BK), 0)
    offs_k = tl.arange(0, BK)
    if GATHER:
        x_rows = tl.load(src_ptr + rows, mask=row_ok & (rows < M), other=0)
    else:
        x_rows = rows
    x_ptrs = x_ptr + x_rows[:, None].to(tl.int64) * K + offs_k[None, :]
    w_ptrs = w_ptr + g_safe.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, k_iters):
        if K % BK == 0:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k * BK < K
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BK
        w_ptrs += BK * stride_wk
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gmm_wgrad_kernel(x_ptr, dy_ptr, gs_ptr, src_ptr, dw_ptr,
                      M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr, E_BLOCK: tl.constexpr,
                      IEEE: tl.constexpr, GATHER: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """dw[g, k tile, n tile] = sum over the rows of group g of x[row, k]^T dy[row, n]; GATHER: x[src[row], k]."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    N_TILES: tl.constexpr = (N + BN - 1) // BN
    pid_k = pid // N_TILES
    pid_n = pid % N_TILES
    offs = tl.arange(0, E_BLOCK)
    sizes = tl.maximum(tl.load(gs_ptr + offs, mask=offs < E, other=0), 0)
    row_ends = tl.cumsum(sizes, axis=0)
    row_end = tl.minimum(tl.sum(tl.where(offs == g, row_ends, 0), axis=0), M)
    row_start = tl.minimum(tl.sum(tl.where(offs == g, row_ends - sizes, 0), axis=0), M)
    ks = pid_k * BK + tl.arange(0, BK)
    ns = pid_n * BN + tl.arange(0, BN)
    k_ok = ks < K
    n_ok = ns < N
    rows = row_start + tl.arange(0, BM)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    dy_ptrs = dy_ptr + rows[:, None].to(tl.int64) * N + ns[None, :]
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for _ in range(0, tl.cdiv(row_end - row_start, BM)):
        row_ok = rows < row_end
        if GATHER:
            x_rows = tl.load(src_ptr + rows, mask=row_ok, other=0)
            x_ptrs = x_ptr + x_rows[:, None].to(tl.int64) * K + ks[None, :]
        if K % BK == 0:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if N % BN == 0:
            b = tl.load(dy_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            b = tl.load(dy_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
        rows += BM
        x_ptrs += BM * K
        dy_ptrs += BM * N
    dw_ptrs = dw_ptr + g.to(tl.int64) * K * N + ks[:, None] * N + ns[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


_gmm_autotuned = triton.autotune(configs=_MM_CONFIGS, key=["M", "K", "N", "E", "GATHER"])(_gmm_kernel)
_wgrad_autotuned = triton.autotune(configs=_WGRAD_CONFIGS, key=["M", "K", "N", "E", "GATHER"])(_gmm_wgrad_kernel)


def _e_block(E: int) -> int:
    """Power-of-two block holding the E group sizes and the padding group."""
    return max(16, 1 << E.bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x, w_dtype):
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"triton gmm supports bf16, fp16 and fp32 inputs, got {x.dtype}; cast x and w first")
    if x.dtype != w_dtype:
        raise TypeError(f"triton gmm needs x and w of one dtype, got {x.dtype} and {w_dtype}")


def _matmul(x_MK, w, group_sizes_E, *, K: int, N: int, transpose_w: bool, source_M=None, config=None):
    """Rows of x (width K) times per-group matrices of w: w [E, K, N], or w [E, N, K] read transposed. With
    source_M (int32 [M]), row r is x[source_M[r]] and x may have any number of rows."""
    M = x_MK.shape[0] if source_M is None else source_M.shape[0]
    gather = source_M is not None
    E = w.shape[0]
    if transpose_w:  # w is [E, N_w, K_w] = [E, N, K] here: reduction over its last axis
        strides = dict(stride_we=K * N, stride_wk=1, stride_wn=K)
    else:
        strides = dict(stride_we=K * N, stride_wk=N, stride_wn=1)
    ieee = x_MK.dtype == jnp.float32
    config = config or _untuned(_MM_CONFIGS[0])
    if ieee or config is not None:
        params = dict(_FP32_MM if ieee else config)
        kernel = _gmm_kernel
    else:
        params = {}
        kernel = _gmm_autotuned
    return jt.triton_call(
        x_MK, w, group_sizes_E, source_M if gather else group_sizes_E,  # an unread stand-in without gather
        kernel=kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), x_MK.dtype),
        grid=lambda meta: ((_cdiv(M, meta["BM"]) + E + 1) * _cdiv(N, meta["BN"]),),
        name="gmm_dgrad" if transpose_w else ("gmm_gather_fwd" if gather else "gmm_fwd"),
        M=M, K=K, N=N, E=E, E_BLOCK=_e_block(E), IEEE=ieee, GATHER=gather, **strides, **params,
    )


def _wgrad(x_MK, dy_MN, group_sizes_E, E: int, out_dtype, source_M=None, config=None):
    M, N = dy_MN.shape
    K = x_MK.shape[1]
    gather = source_M is not None
    ieee = x_MK.dtype == jnp.float32
    config = config or _untuned(_WGRAD_CONFIGS[0])
    if ieee or config is not None:
        params = dict(_FP32_WGRAD if ieee else config)
        kernel = _gmm_wgrad_kernel
    else:
        params = {}
        kernel = _wgrad_autotuned
    return jt.triton_call(
        x_MK, dy_MN, group_sizes_E, source_M if gather else group_sizes_E,  # an unread stand-in without gather
        kernel=kernel,
        out_shape=jax.ShapeDtypeStruct((E, K, N), out_dtype),
        grid=lambda meta: (_cdiv(K, meta["BK"]) * _cdiv(N, meta["BN"]), E),
        name="gmm_gather_wgrad" if gather else "gmm_wgrad",
        M=M, K=K, N=N, E=E, E_BLOCK=_e_block(E), IEEE=ieee, GATHER=gather, **params,
    )


def gmm_forward(x_MK, w_EKN, group_sizes_E, config=None, source_M=None):
    E, K, N = w_EKN.shape
    return _matmul(x_MK, w_EKN, group_sizes_E, K=K, N=N, transpose_w=False, source_M=source_M, config=config)


def gmm_dgrad(dy_MN, w_EKN, group_sizes_E, config=None):
    E, K, N = w_EKN.shape
    return _matmul(dy_MN, w_EKN, group_sizes_E, K=N, N=K, transpose_w=True, config=config)


def gmm_wgrad(x_MK, dy_MN, group_sizes_E, num_groups: int, out_dtype=None, config=None, source_M=None):
    return _wgrad(x_MK, dy_MN, group_sizes_E, num_groups, out_dtype or x_MK.dtype, source_M=source_M, config=config)


@jax.custom_vjp
def gmm_triton(x_MK, w_EKN, group_sizes_E):
    """Grouped GEMM on the Triton kernels; differentiable in x and w."""
    _check(x_MK, w_EKN.dtype)
    return gmm_forward(x_MK, w_EKN, group_sizes_E.astype(jnp.int32))


def _gmm_fwd(x_MK, w_EKN, group_sizes_E):
    return gmm_triton(x_MK, w_EKN, group_sizes_E), (x_MK, w_EKN, group_sizes_E)


def _gmm_bwd(res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    gs = group_sizes_E.astype(jnp.int32)
    dy_MN = dy_MN.astype(x_MK.dtype)
    dx_MK = gmm_dgrad(dy_MN, w_EKN, gs)
    dw_EKN = gmm_wgrad(x_MK, dy_MN, gs, w_EKN.shape[0], w_EKN.dtype)
    return dx_MK, dw_EKN, np.zeros(group_sizes_E.shape, jax.dtypes.float0)


gmm_triton.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gmm_gather_triton(x_SK, w_EKN, group_sizes_E, source_M, inverse_M, copies: int):
    """Grouped GEMM of gathered rows: row r is x_SK[source_M[r]], where source_M = order // copies for a permutation
    `order` of S * copies entries (copy c of source row s is entry s * copies + c) whose inverse is `inverse_M`.
    The forward and weight-gradient kernels read the source rows in place; the input gradient sums each source
    row's copies in fp32. Differentiable in x and w."""
    _check(x_SK, w_EKN.dtype)
    return gmm_forward(x_SK, w_EKN, group_sizes_E.astype(jnp.int32), source_M=source_M.astype(jnp.int32))


def _gather_fwd(x_SK, w_EKN, group_sizes_E, source_M, inverse_M, copies):
    y = gmm_gather_triton(x_SK, w_EKN, group_sizes_E, source_M, inverse_M, copies)
    return y, (x_SK, w_EKN, group_sizes_E, source_M, inverse_M)


def _gather_bwd(copies, res, dy_MN):
    x_SK, w_EKN, group_sizes_E, source_M, inverse_M = res
    gs = group_sizes_E.astype(jnp.int32)
    dy_MN = dy_MN.astype(x_SK.dtype)
    dx_MK = gmm_dgrad(dy_MN, w_EKN, gs)
    dx_SK = jnp.sum(dx_MK[inverse_M].reshape(-1, copies, dx_MK.shape[1]).astype(jnp.float32), axis=1)
    dw_EKN = gmm_wgrad(x_SK, dy_MN, gs, w_EKN.shape[0], w_EKN.dtype, source_M=source_M.astype(jnp.int32))
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return dx_SK.astype(x_SK.dtype), dw_EKN, zero(group_sizes_E), zero(source_M), zero(inverse_M)


gmm_gather_triton.defvjp(_gather_fwd, _gather_bwd)
