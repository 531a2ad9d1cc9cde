"""The compiled part of sampling: prefill of left-padded prompts, then a `lax.while_loop` of one-token decode steps
over the cache, ending early once every row has stopped.

Layout. Prompts are left-padded to a bucket P (row b has pad_b = P - len_b pad tokens, segment 0), so every row's
next token goes to the same cache index and the prefill's last position is every row's last prompt token. Positions
are exact: token i of a prompt has position i, the j-th new token position len_b + j. The cache holds S = P + N
entries (N the new-token bucket): attention layers keep k, v [repeats, B, K, S, d], written at index P + t for
step t (the loop carries the buffers and XLA updates them in place); Gated DeltaNet layers keep their recurrent
state and conv window (`layers.gdn.DeltaNetState`), replaced each step. Pad tokens never count: attention masks
cache index < pad_b, and the DeltaNet state restarts at a row's first token (its segment starts there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xorl_jax.layers.attention import KVEntries
from xorl_jax.loss import chunked_target_logprobs
from xorl_jax.models.common import constrain
from xorl_jax.sampling.choose import choose_tokens, stop_hits

_KV_NAMES = (None, "batch", "kv_heads", None, None)  # [repeats, B, K, S, d]


def _heads_major(x):
    """New entries [repeats, B, T, K, d] -> [repeats, B, K, T, d], the cache layout."""
    return jnp.swapaxes(x, 2, 3)


def cache_from_prefill(updates, length: int):
    """The decode cache from the prefill's per-layer entries: k, v placed in zeroed [.., S = length, ..] buffers;
    DeltaNet states as they are."""

    def one(entry):
        if isinstance(entry, KVEntries):
            def grow(x):
                R, B, P, K, d = x.shape
                buf = constrain(jnp.zeros((R, B, K, length, d), x.dtype), _KV_NAMES)
                return constrain(jax.lax.dynamic_update_slice(buf, _heads_major(x), (0, 0, 0, 0, 0)), _KV_NAMES)
            return KVEntries(grow(entry.k), grow(entry.v))
        return entry

    return tuple(one(e) for e in updates)


def write_cache(caches, updates, index):
    """`caches` with one decode step's entries: new k, v written at sequence index `index`, states replaced."""

    def one(cache, entry):
        if isinstance(cache, KVEntries):
            put = lambda buf, x: constrain(jax.lax.dynamic_update_slice(  # noqa: E731
                buf, _heads_major(x).astype(buf.dtype), (0, 0, 0, index, 0)), _KV_NAMES)
            return KVEntries(put(cache.k, entry.k), put(cache.v, entry.v))
        return entry

    return tuple(one(c, e) for c, e in zip(caches, updates))


def next_token_logprobs(h_BTD, head_DV, targets_BT, chunk: int = 128):
    """log softmax(h @ head)[target] per position, in chunks of `chunk` positions of every row (the training
    requests' loss.chunked_target_logprobs): the [B, T, V] logits of a long prompt never exist at once (64 x 2048 x
    152k in fp32 would be 80 GB)."""
    return chunked_target_logprobs(h_BTD, head_DV, targets_BT, chunk_size=chunk * h_BTD.shape[0])


def row_keys(seeds_B, sample_index_B):
    """Each row's PRNG key from its seed and sample index (so a sequence does not depend on its batch)."""
    base = jax.random.PRNGKey(0)
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(base, s), i))(seeds_B, sample_index_B)


def generate(graphdef, params, tokens_UP, lengths_U, prompt_of_B, max_new_B, temperature_B, top_p_B, top_k_B,
             seeds_B, sample_index_B, stops_BNL, stop_lens_BN, *, new_tokens: int, prompt_logprobs: bool = False,
             scan_layers: bool | None = None):
    """Prefill of the U distinct prompts, then decoding of the B rows; row b continues prompt `prompt_of_B[b]`
    (its samples share one prefill); scan_layers: scan or unroll the layers (None: as the model says).

    Returns a dict: tokens [B, N] int32 and logprobs [B, N] fp32 (valid up to count), count [B] (tokens generated),
    stopped [B] (ended on a stop sequence), and with prompt_logprobs, prompt_logprobs [U, P] (at padded index i:
    log p(token i | before), meaningful from the prompt's second token)."""
    model = nnx.merge(graphdef, params)
    U, P = tokens_UP.shape
    B = prompt_of_B.shape[0]
    N = new_tokens
    S = P + N
    pad_U = P - lengths_U
    idx = jnp.arange(P)[None]
    segments = (idx >= pad_U[:, None]).astype(jnp.int32)
    positions = jnp.maximum(idx - pad_U[:, None], 0)
    out = {}
    if prompt_logprobs:
        h, updates = model.cached_forward(tokens_UP, positions, segments, None, hidden=True, scan=scan_layers)
        head = model.head_weight(h.dtype)
        scored = next_token_logprobs(h[:, :-1], head, tokens_UP[:, 1:])
        out["prompt_logprobs"] = jnp.pad(scored, ((0, 0), (1, 0)))
        logits = jnp.einsum("bd,dv->bv", h[:, -1], head, preferred_element_type=jnp.float32)
    else:
        logits, updates = model.cached_forward(tokens_UP, positions, segments, None, scan=scan_layers)
    pad = pad_U[prompt_of_B]
    logits = logits[prompt_of_B]
    # each row's prompt entries: [repeats, U, ...] -> [repeats, B, ...]
    updates = jax.tree.map(lambda x: jnp.take(x, prompt_of_B, axis=1), updates)
    caches = cache_from_prefill(updates, S)
    keys = row_keys(seeds_B, sample_index_B)
    L = stops_BNL.shape[-1]

    state = dict(
        t=jnp.zeros((), jnp.int32), caches=caches, logits=logits,
        tokens=jnp.full((B, N), -1, jnp.int32), logprobs=jnp.zeros((B, N), jnp.float32),
        count=jnp.zeros((B,), jnp.int32), stopped=jnp.zeros((B,), bool), done=max_new_B <= 0,
        recent=jnp.full((B, max(L, 1)), -1, jnp.int32),
    )

    def running(s):
        return (s["t"] < N) & ~jnp.all(s["done"])

    def step(s):
        t = s["t"]
        live = ~s["done"]
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        tok, lp = choose_tokens(s["logits"], temperature_B, top_p_B, top_k_B, step_keys)
        recent = jnp.concatenate([s["recent"][:, 1:], tok[:, None]], axis=1)
        hit = stop_hits(recent[:, -L:], stops_BNL, stop_lens_BN) & live if L else jnp.zeros((B,), bool)
        count = s["count"] + live
        done = s["done"] | hit | (count >= max_new_B)
        # the next logits: token t sits at cache index P + t; this row's valid entries are pad_b .. P + t - 1
        cache_idx = jnp.arange(S)[None]
        cache_valid = (cache_idx >= pad[:, None]) & (cache_idx < P + t)
        logits, updates = model.cached_forward(tok[:, None], (P + t - pad)[:, None], None, s["caches"], cache_valid,
                                               scan=scan_layers)
        return dict(
            t=t + 1, caches=write_cache(s["caches"], updates, P + t), logits=logits,
            tokens=s["tokens"].at[:, t].set(jnp.where(live, tok, -1)),
            logprobs=s["logprobs"].at[:, t].set(jnp.where(live, lp, 0.0)),
            count=count, stopped=s["stopped"] | hit, done=done, recent=recent,
        )

    s = jax.lax.while_loop(running, step, state)
    out.update(tokens=s["tokens"], logprobs=s["logprobs"], count=s["count"], stopped=s["stopped"])
    return out
