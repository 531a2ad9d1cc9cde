"""Sampling for the server's `asample`: the one place the server turns a prompt into sampled sequences, through
the KV-cache sampler (xorl_jax.sampling.Sampler).

One Sampler serves every sampling session (its programs compile once per shape bucket); a request whose session
holds other weights than the last one swaps them in with `set_params` (no recompilation). Log-probabilities are
those of the sampled tokens under the model at temperature 1, what a training forward computes for them, so the
Tinker losses' importance ratios start at 1.
"""

from __future__ import annotations

import numpy as np

from xorl_jax.sampling import Sampler, SamplingParams


class SessionSampler:
    def __init__(self, graphdef, params, *, mesh, rules, eos_token_ids, tokenizer=None):
        self.sampler = Sampler(graphdef, params, mesh=mesh, rules=rules, eos_token_ids=eos_token_ids,
                               tokenizer=tokenizer)
        self._loaded = params

    def sample(self, params, prompt: np.ndarray, num_samples: int, sp: dict, *, seed: int,
               prompt_logprobs: bool) -> tuple[list[dict], np.ndarray | None]:
        """([{"tokens", "logprobs", "stop_reason"}] per sample, prompt log-probabilities (NaN first) or None);
        `sp`: the SDK's SamplingParams as a dict."""
        if params is not self._loaded:
            self.sampler.set_params(params)
            self._loaded = params
        stop = sp.get("stop")
        if isinstance(stop, list) and stop and all(isinstance(s, list) for s in stop):
            stop = [tuple(s) for s in stop]
        params_ = SamplingParams(max_tokens=int(sp["max_tokens"]), temperature=float(sp["temperature"]),
                                 top_p=float(sp["top_p"]), top_k=int(sp["top_k"]), stop=stop, seed=seed)
        result = self.sampler.sample([prompt.tolist()], params_, num_samples, prompt_logprobs=prompt_logprobs)[0]
        seqs = [{"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason} for s in result.sequences]
        plp = None
        if prompt_logprobs and result.prompt_logprobs is not None:
            plp = np.array([np.nan if v is None else v for v in result.prompt_logprobs], np.float32)
        return seqs, plp
