"""Picking the next token from logits: temperature, top-k, top-p (nucleus), seeded per row; stop-sequence matching.

Shapes: B rows, V vocabulary, NS stop sequences per row, LS longest stop sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filter_top_k_top_p(scaled_BV, top_p_B, top_k_B):
    """Logits outside each row's top-k and smallest set of mass >= top_p set to -inf (the most likely token always
    stays). One descending sort of the vocabulary; only run when some row asks for it."""
    V = scaled_BV.shape[-1]
    ordered = -jnp.sort(-scaled_BV, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    rank = jnp.arange(V)[None]
    k = jnp.where(top_k_B > 0, top_k_B, V)[:, None]
    keep = (before < top_p_B[:, None]) & (rank < k)
    kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    return jnp.where(scaled_BV >= threshold, scaled_BV, -jnp.inf)


def choose_tokens(logits_BV, temperature_B, top_p_B, top_k_B, keys_B):
    """(tokens [B] int32, their log-probabilities [B] fp32 at temperature 1). temperature 0 = argmax; else a
    Gumbel-max draw from softmax(logits / temperature) restricted to top-k / top-p, with each row's own key."""
    logits = logits_BV.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = temperature_B <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature_B)[:, None]
    needs_filter = jnp.any(((top_p_B < 1) | (top_k_B > 0)) & ~greedy)
    scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, p, k: x, scaled, top_p_B, top_k_B)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys_B)
    drawn = jnp.argmax(scaled + noise, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def stop_hits(recent_BL, stops_BNL, stop_lens_BN):
    """[B] bool: the row's last generated tokens `recent_BL` (right-aligned, -1 before the first) end with one of
    its stop sequences (right-aligned in `stops_BNL`, lengths `stop_lens_BN`, 0 = unused slot)."""
    L = recent_BL.shape[-1]
    checked = jnp.arange(L)[None, None] >= (L - stop_lens_BN)[..., None]  # [B, NS, L]
    same = recent_BL[:, None, :] == stops_BNL
    return jnp.any((stop_lens_BN > 0) & jnp.all(same | ~checked, axis=-1), axis=-1)
