"""Sampling for the server's `asample`: the one place the server turns a prompt into sampled sequences.

`sample` decodes `num_samples` continuations of one prompt with temperature / top-k / top-p, stop tokens and
max_tokens, and returns each token's log-probability under the model's distribution at temperature 1 (what a
training forward computes for the same tokens, so the Tinker losses' importance ratios start at 1).

This implementation re-runs the model over a fixed-size token buffer for every new token (one compiled forward
for all steps, no KV cache): right for small models and short answers. The KV-cache sampler (xorl_jax.sampling)
takes its place behind this same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_STEP_CACHE: dict = {}


def _bucket(n: int, least: int) -> int:
    return 1 << max(int(n) - 1, least - 1).bit_length()


def _step_fn(graphdef):
    fn = _STEP_CACHE.get(graphdef)
    if fn is None:
        @jax.jit
        def step(params, tokens, cur, key, temperature, top_k, top_p):
            B, L = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
            logits = nnx.merge(graphdef, params)(tokens, positions, jnp.ones((B, L), jnp.int32)).logits
            last = jnp.take_along_axis(logits, (cur - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
            logp = jax.nn.log_softmax(last, axis=-1)
            V = last.shape[-1]
            scaled = last / jnp.maximum(temperature, 1e-6)
            order = jnp.argsort(-scaled, axis=-1)
            sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
            ranks = jnp.arange(V)[None, :]
            keep = jnp.where(top_k > 0, ranks < top_k, True)
            probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            keep = keep & (before < top_p)
            filtered = jnp.where(keep, sorted_logits, -jnp.inf)
            pick = jax.random.categorical(key, filtered, axis=-1)
            sampled = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
            greedy = jnp.argmax(last, axis=-1)
            tok = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
            return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]

        fn = _STEP_CACHE[graphdef] = step
    return fn


def _stops(stop, eos_ids) -> list[tuple[int, ...]]:
    """The stop sequences as token tuples: None -> the end-of-sequence tokens, [] -> none."""
    if stop is None:
        return [(int(t),) for t in eos_ids]
    if isinstance(stop, str) or (stop and isinstance(stop[0], str)):
        raise ValueError("sampling_params.stop: string stop sequences need the tokenizer; pass token ids")
    out = []
    for s in stop:
        out.append(tuple(int(t) for t in s) if isinstance(s, (list, tuple)) else (int(s),))
    return out


def sample(graphdef, params, prompt: np.ndarray, num_samples: int, sp: dict, *, seed: int, eos_ids) -> list[dict]:
    """[{"tokens", "logprobs", "stop_reason"}] for each sample; `sp`: max_tokens, temperature, top_k, top_p,
    stop (the SDK's SamplingParams as a dict)."""
    max_tokens = int(sp.get("max_tokens") or 16)
    stops = _stops(sp.get("stop"), eos_ids)
    P = len(prompt)
    B, L = _bucket(num_samples, 1), _bucket(P + max_tokens, 16)
    buf = np.zeros((B, L), np.int32)
    buf[:, :P] = prompt
    cur = np.full(B, P, np.int32)
    out = [{"tokens": [], "logprobs": [], "stop_reason": "length"} for _ in range(num_samples)]
    done = np.zeros(B, bool)
    done[num_samples:] = True
    step = _step_fn(graphdef)
    key = jax.random.PRNGKey(seed)
    temperature = jnp.float32(sp.get("temperature", 1.0))
    top_k, top_p = jnp.int32(sp.get("top_k", -1) or -1), jnp.float32(sp.get("top_p", 1.0))
    for i in range(max_tokens):
        tok, lp = step(params, jnp.asarray(buf), jnp.asarray(cur), jax.random.fold_in(key, i), temperature, top_k,
                       top_p)
        tok, lp = np.asarray(tok), np.asarray(lp)
        for r in np.nonzero(~done)[0]:
            seq = out[r]
            seq["tokens"].append(int(tok[r]))
            seq["logprobs"].append(float(lp[r]))
            buf[r, cur[r]] = tok[r]
            cur[r] += 1
            if any(tuple(seq["tokens"][-len(s):]) == s for s in stops if len(seq["tokens"]) >= len(s)):
                seq["stop_reason"] = "stop"
                done[r] = True
        if done.all():
            break
    return out


def prompt_logprobs(graphdef, params, prompt: np.ndarray, compute_dtype) -> np.ndarray:
    """log p(prompt[i] | prompt[:i]) for i >= 1 (the first token has none: NaN, the SDK reads it as None)."""
    P = len(prompt)
    L = _bucket(P, 16)
    buf = np.zeros((1, L), np.int32)
    buf[0, :P] = prompt
    positions = jnp.arange(L, dtype=jnp.int32)[None]
    logits = nnx.merge(graphdef, params)(jnp.asarray(buf), positions, jnp.ones((1, L), jnp.int32)).logits
    logp = jax.nn.log_softmax(logits[0, : P - 1].astype(jnp.float32), axis=-1)
    got = np.asarray(jnp.take_along_axis(logp, jnp.asarray(prompt[1:], jnp.int32)[:, None], axis=-1)[:, 0])
    return np.concatenate([[np.nan], got]).astype(np.float32)
