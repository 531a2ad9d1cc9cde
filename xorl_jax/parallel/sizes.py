"""Arithmetic of the parallel sizes that the config check and the mesh share (no JAX here)."""

from __future__ import annotations

import math
from typing import Mapping

# Where expert ranks beyond those carved out of the FSDP group come from, first match: as xorl, which carves expert
# ranks out of every rank of a stage, context-parallel ones included (e.g. ulysses 8 x expert_parallel_size 8).
EXPERT_CONTEXT_SPANS = ((), ("ulysses",), ("ulysses", "ring"), ("ring",))


def expert_context_span(ep: int, shard: int, sizes: Mapping[str, int]) -> tuple[str, ...] | None:
    """The context axes that `ep` expert ranks take besides a divisor of the FSDP group's `shard` ranks (None when no
    split works); `sizes`: {"ring": R, "ulysses": U}."""
    for span in EXPERT_CONTEXT_SPANS:
        n = math.prod(int(sizes.get(a, 1)) for a in span)
        if span and n == 1:
            continue
        if ep % n == 0 and shard % (ep // n) == 0:
            return span
    return None
