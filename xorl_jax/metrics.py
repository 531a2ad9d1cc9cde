"""Training FLOPs per token, MFU, and the metrics logger (progress line, metrics.jsonl, TensorBoard).

FLOPs per token (training = forward + backward = 3 x forward; a matmul of a token through an [a, b] weight is
2ab FLOPs forward, so 6ab for training):
- 6 x (matmul parameters a token passes through): attention projections, dense MLP, or for MoE layers the router,
  the top-k routed experts and the shared expert (active parameters only), Gated DeltaNet projections and its
  depthwise causal conv, and the LM head (whether or not it is tied: the head matmul runs either way; the
  embedding lookup costs nothing).
- Causal softmax attention: forward QK^T and PV cost 2 * 2 * H * d per key, a token sees T/2 keys on average:
  12 * H * d * T / 2 = 6 * H * d * T per full-attention layer.
- Gated DeltaNet, chunked (WY) form with chunk C, per value head, forward per token:
  2C(3 dk + 2 dv) (K K^T, Q K^T, W = T(bK), U = T(bV), intra-chunk P V) + 6 dk dv (state read for the new values,
  state read for the output, state update) + 2C^2/3 (the triangular inverse); x3 for training.
MFU = tokens/s * FLOPs per token / (devices * peak bf16 dense FLOP/s).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12, "a100": 312e12}
_H100_PCIE_PEAK = 756e12


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Dense bf16 peak of the first device (or of `device_kind`), or None when unknown (CPU): MFU not shown."""
    if device_kind is None:
        import jax

        device = jax.devices()[0]
        if device.platform != "gpu":
            return None
        device_kind = device.device_kind
    kind = device_kind.lower()
    if "h100" in kind and "pcie" in kind:
        return _H100_PCIE_PEAK
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_BF16_FLOPS[name]
    return None


def flops_per_token(*, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                    vocab: int, seq_len: int, tied: bool = False, moe_active_intermediate: int | None = None,
                    n_active_experts: int | None = None, n_experts: int = 0, moe_layers: int | None = None,
                    shared_intermediate: int = 0, gated_attention: bool = False, linear_attn_layers: int = 0,
                    linear_attn_dims: Mapping[str, int] | None = None) -> float:
    """Training FLOPs per token (see the module doc for the formula).

    layers: all decoder layers; `linear_attn_layers` of them are Gated DeltaNet (the rest softmax attention).
    MoE: moe_active_intermediate is one routed expert's intermediate size, n_active_experts the top-k,
      n_experts the router width, moe_layers how many layers are MoE (default all; the others use `intermediate`),
      shared_intermediate the shared expert's size (0 = none; it comes with a [D, 1] gate).
    gated_attention: q_proj also emits a per-head output gate (Qwen3.5), doubling its width.
    linear_attn_dims: {key_heads, value_heads, key_dim, value_dim, conv_kernel=4, chunk=64}.
    `tied` does not change the count (the head matmul runs either way); it is accepted for symmetry.
    """
    del tied
    D = hidden
    full_layers = layers - linear_attn_layers
    if full_layers < 0:
        raise ValueError(f"linear_attn_layers ({linear_attn_layers}) exceeds layers ({layers})")
    attn_params = D * heads * head_dim * (2 if gated_attention else 1) + 2 * D * kv_heads * head_dim \
        + heads * head_dim * D
    dense_mlp = 3 * D * intermediate
    if moe_active_intermediate:
        if not n_active_experts:
            raise ValueError("moe_active_intermediate is set but n_active_experts is not")
        moe_mlp = D * n_experts + n_active_experts * 3 * D * moe_active_intermediate
        if shared_intermediate:
            moe_mlp += 3 * D * shared_intermediate + D
        n_moe = layers if moe_layers is None else moe_layers
    else:
        moe_mlp, n_moe = 0, 0
    matmul_params = vocab * D + full_layers * attn_params + n_moe * moe_mlp + (layers - n_moe) * dense_mlp
    extra = full_layers * 6.0 * heads * head_dim * seq_len
    if linear_attn_layers:
        if not linear_attn_dims:
            raise ValueError("linear_attn_layers > 0 needs linear_attn_dims {key_heads, value_heads, key_dim, "
                             "value_dim}")
        g = {"conv_kernel": 4, "chunk": 64, **linear_attn_dims}
        Hk, Hv, dk, dv, C = g["key_heads"], g["value_heads"], g["key_dim"], g["value_dim"], g["chunk"]
        conv_channels = 2 * Hk * dk + Hv * dv
        gdn_params = D * (2 * Hk * dk + 2 * Hv * dv) + D * 2 * Hv + Hv * dv * D + conv_channels * g["conv_kernel"]
        matmul_params += linear_attn_layers * gdn_params
        per_head = 2 * C * (3 * dk + 2 * dv) + 6 * dk * dv + 2 * C * C / 3
        extra += linear_attn_layers * 3.0 * Hv * per_head
    return 6.0 * matmul_params + extra


def mfu(tokens_per_s: float, flops_per_token_: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token_ / (n_devices * peak)


def estimate_memory_per_device(param_count: int, n_devices: int, train_cfg: Any = None) -> float:
    """Bytes per device for fp32 params + fp32 grads + optimizer state, fully sharded over `n_devices`."""
    optimizer = getattr(train_cfg, "optimizer", "adamw")
    state_bytes = 2 if str(getattr(train_cfg, "optimizer_dtype", "float32")) in ("bfloat16", "bf16") else 4
    n_states = {"sgd": 1, "signsgd": 0}.get(optimizer, 2)
    return param_count * (4 + 4 + n_states * state_bytes) / max(1, n_devices)


# ------------------------------------------------------------------------------------------------ logger
def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Progress line, metrics.jsonl and (if tensorboardX is installed) TensorBoard events, on process 0 only.

    On a TTY the train line is rewritten in place every step; otherwise a plain line is printed every `log_steps`
    steps and at the last step. Every train call is appended to `output_dir/metrics.jsonl` (flushed per line).
    """

    _LINE_KEYS = (("loss", "loss {:.4f}"), ("aux_loss", "aux {:.4f}"), ("lr", "lr {:.2e}"),
                  ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"))

    def __init__(self, output_dir: str, *, log_steps: int = 1, total_steps: int | None = None,
                 process_index: int | None = None, use_tensorboard: bool = True, stream=None, clock=time.monotonic):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.active = process_index == 0
        self.log_steps = max(1, int(log_steps or 1))
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self._jsonl = None
        self._tb = None
        self._line_open = False
        self._start: tuple[float, int] | None = None
        if not self.active:
            return
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        os.makedirs(output_dir, exist_ok=True)
        self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self.info("tensorboardX is not installed: TensorBoard logging is off (pip install tensorboardX)")
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    # -------------------------------------------------------------------------------------------- output
    def _print(self, text: str, *, in_place: bool = False):
        if in_place:
            self.stream.write("\r\033[K" + text)
            self._line_open = True
        else:
            self._end_line()
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self):
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def info(self, message: str):
        if self.active:
            self._print(message)

    def _record(self, split: str, step: int, metrics: Mapping[str, Any]):
        row = {"split": split, "step": int(step), "time": time.time()}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                v = _jsonable(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))
            self._tb.flush()

    def _eta(self, step: int) -> str:
        now = self.clock()
        if self._start is None:
            self._start = (now, step)  # the first call includes compilation: time from here on
            return "?"
        t0, s0 = self._start
        if not self.total_steps or step <= s0:
            return "?"
        return _fmt_eta((now - t0) / (step - s0) * (self.total_steps - step))

    def format_train(self, step: int, metrics: Mapping[str, Any], eta: str) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}"]
        for key, fmt in self._LINE_KEYS:
            if metrics.get(key) is not None:
                parts.append(fmt.format(float(metrics[key])))
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    # -------------------------------------------------------------------------------------------- API
    def log_train(self, step: int, metrics: Mapping[str, Any]):
        if not self.active:
            return
        self._record("train", step, metrics)
        eta = self._eta(step)
        last = self.total_steps is not None and step >= self.total_steps
        line = self.format_train(step, metrics, eta)
        if self.tty:
            self._print(line, in_place=True)
            if last:
                self._end_line()
        elif step % self.log_steps == 0 or last:
            self._print(line)

    def log_eval(self, step: int, metrics: Mapping[str, Any]):
        if not self.active:
            return
        self._record("eval", step, metrics)
        body = " | ".join(f"{k} {float(v):.4f}" if isinstance(_jsonable(v), float) else f"{k} {v}"
                          for k, v in metrics.items())
        self._print(f"eval step {step} | {body}")

    def close(self):
        if not self.active:
            return
        self._end_line()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
