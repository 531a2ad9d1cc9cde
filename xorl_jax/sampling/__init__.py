"""Sampling from a Qwen-family model (Qwen3, Qwen3-MoE, Qwen3.5 hybrid): batched prefill, then decoding with a KV
cache for attention layers and the recurrent state + conv window for Gated DeltaNet layers.

    sampler = Sampler(model, mesh=mesh, rules=rules, eos_token_ids=[eos], tokenizer=tok)  # or (graphdef, params)
    results = sampler.sample(prompt_token_lists, SamplingParams(max_tokens=64, temperature=0.7, top_p=0.95,
                                                                stop=["\\n\\n"], seed=0), num_samples=4)
    results[i].sequences[j].tokens / .logprobs / .stop_reason          # "stop" | "length"
    results[i].prompt_logprobs                                         # with sample(..., prompt_logprobs=True)
    sampler.set_params(new_params)                                     # new weights, same compiled programs

Log-probabilities are those of the sampled tokens under the model's distribution at temperature 1 (what the
training forward computes for the same tokens), whatever the sampling temperature. A stop sequence that ends a
sequence is part of its tokens (and has a logprob). Prompts of different lengths share a batch (left padding,
exact positions); lengths, new tokens and rows are bucketed to powers of two so few programs compile.
"""

from xorl_jax.sampling.sampler import Sampler, bucket
from xorl_jax.sampling.types import SampledSequence, SampleResult, SamplingParams

__all__ = ["Sampler", "SamplingParams", "SampledSequence", "SampleResult", "bucket"]
