"""Gated delta rule backends: `gated_delta_rule(..., implementation=...)` picks one.

"recurrent": token scan (the definition). "chunked": jnp WY form (CPU backend and reference).
"pallas": Pallas GPU kernels for the sequential state pass (checked on an H100 against the fp32 reference, including
run-to-run equality; see tests/test_gdn_pallas.py and docs/PERFORMANCE.md).
"auto": pallas on NVIDIA GPUs where its shape rules hold (dk, dv powers of two >= 16), chunked elsewhere.
"""

from __future__ import annotations

from xorl_jax.kernels.gdn.pallas import CHECKPOINT_NAME
from xorl_jax.kernels.gdn.pallas_entry import gated_delta_rule_pallas
from xorl_jax.kernels.gdn.reference import gated_delta_rule_chunked, gated_delta_rule_recurrent

IMPLEMENTATIONS = ("auto", "pallas", "chunked", "recurrent")


def auto_implementation(dk: int | None = None, dv: int | None = None) -> str:
    """What "auto" runs on this device for key/value head dims dk, dv (None: dims the kernels take)."""
    import jax

    pow2 = lambda d: d is None or (d >= 16 and not d & (d - 1))
    on_gpu = jax.default_backend() == "gpu"
    return "pallas" if on_gpu and pow2(dk) and pow2(dv) else "chunked"


def gated_delta_rule(q, k, v, g, beta, *, segment_ids=None, scale=None, use_qk_l2norm=True, initial_state=None,
                     output_final_state=False, implementation="auto"):
    """o [B,T,Hv,dv] (v.dtype), final_state [B,Hv,dk,dv] fp32 or None. See reference.py for the math and shapes."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"gdn implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = auto_implementation(q.shape[-1], v.shape[-1])
    kwargs = dict(segment_ids=segment_ids, scale=scale, use_qk_l2norm=use_qk_l2norm, initial_state=initial_state,
                  output_final_state=output_final_state)
    if implementation == "recurrent":
        return gated_delta_rule_recurrent(q, k, v, g, beta, **kwargs)
    if implementation == "chunked":
        return gated_delta_rule_chunked(q, k, v, g, beta, **kwargs)
    return gated_delta_rule_pallas(q, k, v, g, beta, **kwargs)


__all__ = ["CHECKPOINT_NAME", "gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_recurrent",
           "IMPLEMENTATIONS"]
