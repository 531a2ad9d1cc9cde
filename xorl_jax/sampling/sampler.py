"""`Sampler`: batched sampling from a Qwen-family model with a KV cache (see `sampling.decode` for the layout).

The host side: requests -> padded, bucketed arrays (prompt length, new tokens and batch rounded up to powers of two
so that a handful of compiled programs serve every request), one compiled prefill + decode loop per bucket, and
the results cut back to each sequence.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from xorl_jax.parallel.rules import (batch_sharding, context_parallel_size, data_parallel_size, param_shardings,
                                    use_mesh)
from xorl_jax.sampling.decode import generate
from xorl_jax.sampling.types import SampledSequence, SampleResult, SamplingParams

MIN_BUCKET = 16  # prompt and new-token lengths
MIN_ROWS = 8  # decoding reads the weights once per step for all rows: a few idle rows cost ~nothing
MIN_STOPS = 4  # stop sequences per row, and tokens per stop sequence


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()

# One jit for every Sampler: samplers of the same model (graphdef) and shapes share compiled programs.
_compiled = jax.jit(generate, static_argnums=0, static_argnames=("new_tokens", "prompt_logprobs", "scan_layers"))


class Sampler:
    """Sampler(model) or Sampler(graphdef, params); optional mesh and sharding rules (as training's: parameters
    placed by their logical axes, rows split over the data axes).

    eos_token_ids: the stop tokens when a request's `stop` is None. tokenizer: needed only for string stops.
    max_batch: rows per compiled call (more are run in several calls). scan_layers: scan the layer groups in the
    prefill and each decode step (None: as the model's `scan_layers`; False unrolls them: longer compilation, and
    no per-layer slicing of the stacked weights in the decode loop)."""

    def __init__(self, model_or_graphdef, params=None, *, mesh=None, rules=None, eos_token_ids: Sequence[int] = (),
                 tokenizer=None, max_batch: int = 64, scan_layers: bool | None = None):
        if params is None:
            graphdef, params = nnx.split(model_or_graphdef)
        else:
            graphdef = model_or_graphdef
        self.graphdef = graphdef
        self.mesh, self.rules = mesh, rules
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.tokenizer = tokenizer
        self.scan_layers = scan_layers
        # rows split over the data axes; on a context-parallel mesh, a multiple of those times its sequence axes, so
        # that a decode step's one token per row still splits over every axis the experts take tokens from
        self.rows_split = data_parallel_size(mesh) if mesh is not None else 1
        self.rows_multiple = self.rows_split * (context_parallel_size(mesh) if mesh is not None else 1)
        self.max_batch = max(bucket(max_batch, 1), self.rows_multiple)
        self.params = self._place(params)
        self._per_token_bytes, self._per_row_bytes = _cache_sizes(nnx.merge(graphdef, params))

    def _place(self, params):
        if self.mesh is None:
            return params
        shardings = param_shardings(nnx.merge(self.graphdef, params), self.mesh, self.rules)
        return jax.device_put(params, shardings)

    def set_params(self, params) -> None:
        """New weights of the same structure (e.g. after training steps); no recompilation."""
        self.params = self._place(params)

    # ------------------------------------------------------------------------------------------------ requests
    def _stop_sequences(self, stop) -> tuple[list[list[int]], list[str]]:
        """(token sequences the device matches, strings the host also matches in the decoded text)."""
        if stop is None:
            return [[t] for t in self.eos_token_ids], []
        if isinstance(stop, str):
            stop = [stop]
        seqs, strings = [], []
        for s in stop:
            if isinstance(s, str):
                if self.tokenizer is None:
                    raise ValueError(f"stop string {s!r} needs a tokenizer: give the Sampler one, or stop on token ids")
                if not s:
                    raise ValueError("sampling_params.stop: empty stop string")
                strings.append(s)
                seqs.append(list(self.tokenizer.encode(s, add_special_tokens=False)))
            elif isinstance(s, (int, np.integer)):
                seqs.append([int(s)])
            else:
                seq = [int(t) for t in s]
                if not seq:
                    raise ValueError("sampling_params.stop: empty stop token sequence")
                seqs.append(seq)
        return seqs, strings

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
               num_samples: int = 1, *, prompt_logprobs: bool = False) -> list[SampleResult]:
        """`num_samples` sequences for each prompt (token ids); `params` one for all prompts or one per prompt.
        Returns one SampleResult per prompt."""
        prompts = [[int(t) for t in p] for p in prompts]
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token")
        rows = []  # (prompt index, sample index, seed, stop sequences, stop strings)
        for i, sp in enumerate(params):
            seed = sp.seed if sp.seed is not None else secrets.randbits(32)
            seqs, strings = self._stop_sequences(sp.stop)
            rows += [(i, j, seed, seqs, strings) for j in range(num_samples)]
        results = [SampleResult(sequences=[None] * num_samples) for _ in prompts]
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start:start + self.max_batch]
            out = self._run(prompts, params, chunk, prompt_logprobs)
            for r, (i, j, _, _, strings) in enumerate(chunk):
                n = int(out["count"][r])
                seq = SampledSequence(tokens=out["tokens"][r, :n].tolist(), logprobs=out["logprobs"][r, :n].tolist(),
                                      stop_reason="stop" if out["stopped"][r] else "length")
                results[i].sequences[j] = self._cut_at_strings(seq, strings)
                if prompt_logprobs and j == 0:
                    P, n_prompt = out["prompt_logprobs"].shape[1], len(prompts[i])
                    lp = out["prompt_logprobs"][r, P - n_prompt:].tolist()
                    results[i].prompt_logprobs = [None] + lp[1:]
        return results

    def _cut_at_strings(self, seq: SampledSequence, strings: list[str]) -> SampledSequence:
        """A stop string can be spelled by other tokens than its own encoding: end at the first token whose text
        completes one (that token kept, as for token stops)."""
        def has_stop(n):
            text = self.tokenizer.decode(seq.tokens[:n])
            return any(s in text for s in strings)

        if not strings or not has_stop(len(seq.tokens)):
            return seq
        lo, hi = 1, len(seq.tokens)  # the shortest prefix whose text holds a stop string (longer ones hold it too)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        return SampledSequence(seq.tokens[:lo], seq.logprobs[:lo], "stop")

    def cache_bytes(self, rows: int, length: int) -> int:
        """Bytes of the decode cache for `rows` rows of `length` positions (prompt + new tokens), all devices."""
        return rows * (length * self._per_token_bytes + self._per_row_bytes)

    def _check_memory(self, rows: int, length: int, max_tokens: int) -> None:
        """A request whose cache cannot fit stops here, with what to change, instead of failing in the allocator."""
        free = _free_device_bytes(self.mesh)
        if free is None:
            return
        need = self.cache_bytes(rows, length) / self.rows_split
        if need > free:
            raise ValueError(f"sampling {rows} rows (batch bucket) of {length} positions needs a "
                             f"{need / 2**30:.1f} GiB cache per device and {free / 2**30:.1f} GiB is free: lower "
                             f"max_tokens ({max_tokens}), the number of samples or the prompt length")

    def _rows(self, n: int) -> int:
        """Rows of a compiled call for n rows: a power of two (at least MIN_ROWS) and a multiple of the data axes."""
        n = max(bucket(n, MIN_ROWS), self.rows_multiple)
        return -(-n // self.rows_multiple) * self.rows_multiple

    def _run(self, prompts, params, chunk, prompt_logprobs: bool) -> dict:
        distinct = sorted({i for i, *_ in chunk})  # prompts prefilled once, whatever their samples
        slot = {i: u for u, i in enumerate(distinct)}
        U, B = self._rows(len(distinct)), self._rows(len(chunk))
        P = bucket(max(len(prompts[i]) for i in distinct))
        N = bucket(max(params[i].max_tokens for i, *_ in chunk))
        NS = bucket(max(len(seqs) for *_, seqs, _ in chunk), MIN_STOPS)
        L = bucket(max([1] + [len(s) for *_, seqs, _ in chunk for s in seqs]), MIN_STOPS)
        self._check_memory(B, P + N, max(params[i].max_tokens for i, *_ in chunk))
        tokens = np.zeros((U, P), np.int32)
        lengths = np.ones((U,), np.int32)
        for i, u in slot.items():
            tokens[u, P - len(prompts[i]):] = prompts[i]
            lengths[u] = len(prompts[i])
        prompt_of = np.zeros((B,), np.int32)
        max_new = np.zeros((B,), np.int32)  # padding rows: done before the first step
        temperature = np.zeros((B,), np.float32)
        top_p = np.ones((B,), np.float32)
        top_k = np.full((B,), -1, np.int32)
        seeds = np.zeros((B,), np.uint32)
        sample_index = np.zeros((B,), np.uint32)
        stops = np.full((B, NS, L), -2, np.int32)
        stop_lens = np.zeros((B, NS), np.int32)
        for r, (i, j, seed, seqs, _) in enumerate(chunk):
            sp = params[i]
            prompt_of[r] = slot[i]
            max_new[r] = sp.max_tokens
            temperature[r], top_p[r], top_k[r] = sp.temperature, sp.top_p, sp.top_k
            seeds[r], sample_index[r] = seed % (1 << 32), j
            for s, seq in enumerate(seqs):
                stops[r, s, L - len(seq):] = seq
                stop_lens[r, s] = len(seq)
        args = (tokens, lengths, prompt_of, max_new, temperature, top_p, top_k, seeds, sample_index, stops, stop_lens)
        if self.mesh is None:
            out = _compiled(self.graphdef, self.params, *args, new_tokens=N, prompt_logprobs=prompt_logprobs,
                            scan_layers=self.scan_layers)
            out = {k: np.asarray(v) for k, v in out.items()}
        else:
            # Every process holds the whole request (it follows the same calls): each places its own devices' rows.
            # the rows over the data axes, nothing else split (a context-parallel mesh's sequence axes would not
            # fit the 1-D per-row arguments: they only split training's rows of tokens)
            rows = NamedSharding(self.mesh, PartitionSpec(batch_sharding(self.mesh).spec[0]))
            args = tuple(jax.make_array_from_callback(a.shape, rows, lambda index, a=a: a[index]) for a in args)
            with use_mesh(self.mesh, self.rules):
                out = _compiled(self.graphdef, self.params, *args, new_tokens=N, prompt_logprobs=prompt_logprobs,
                            scan_layers=self.scan_layers)
            out = {k: _to_host(v) for k, v in out.items()}
        if prompt_logprobs:  # per row, as the other outputs
            out["prompt_logprobs"] = out["prompt_logprobs"][prompt_of]
        return out


def _to_host(x) -> np.ndarray:
    """The whole array on this host, also when its rows live on other processes' devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _cache_sizes(model) -> tuple[int, int]:
    """(bytes per row and position: attention layers' k and v; bytes per row: Gated DeltaNet states and windows)."""
    stack = model.layers
    dt = jnp.dtype(model.options.compute_dtype).itemsize
    per_token = per_row = 0
    for layer in stack.groups:
        if hasattr(layer, "self_attn"):
            _, _, K, d = layer.self_attn.k_proj.shape  # [repeats, D, K, d]
            per_token += stack.repeats * 2 * K * d * dt
        if hasattr(layer, "linear_attn"):
            g = layer.linear_attn
            channels, kernel = g.conv1d.shape[1:]
            per_row += stack.repeats * (g.value_heads * g.key_dim * g.value_dim * 4 + (kernel - 1) * channels * dt)
    return per_token, per_row


def _free_device_bytes(mesh) -> int | None:
    """The least free memory among the devices used (None where the platform does not say, e.g. CPU)."""
    devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
    free = []
    for d in devices:
        if d.process_index != jax.process_index():
            continue
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None
