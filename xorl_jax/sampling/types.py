"""What a sampling request asks for and what it gets back (the shapes of the Tinker SDK's SamplingParams and
SampledSequence, as plain dataclasses)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence, Union

StopSpec = Union[None, str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """max_tokens: new tokens at most (stop tokens included). temperature: 0 = greedy. top_p: nucleus mass kept
    (1 = all). top_k: most likely tokens kept (-1 or 0 = all). stop: None = the sampler's end-of-sequence tokens;
    [] = none (run to max_tokens); token ids (each a one-token stop), token-id lists (multi-token stops) or strings
    (need the sampler's tokenizer). seed: same seed, prompt and sample index -> same tokens (None: random)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: StopSpec = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"sampling_params.max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"sampling_params.top_k must be an integer (-1 = no limit), got {self.top_k!r}")


StopReason = Literal["length", "stop"]


@dataclasses.dataclass
class SampledSequence:
    """New tokens (a matched stop sequence included, as the end-of-turn token the chat renderers parse), the
    log-probability of each under the model's distribution at temperature 1 (what training's forward computes), and
    why it ended: "stop" (a stop sequence) or "length" (max_tokens)."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason


@dataclasses.dataclass
class SampleResult:
    """One prompt's samples; prompt_logprobs[i] = log p(prompt[i] | prompt[:i]) (None at i = 0), when asked."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
