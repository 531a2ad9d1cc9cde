"""MFU, peak FLOP/s per device, memory estimates, and the metrics logger (progress line, metrics.jsonl,
TensorBoard).

FLOPs per token come from the model family (`config.flops_per_token(seq_len)`, formulas in models/flops.py).
MFU = tokens/s * FLOPs per token / (devices * peak bf16 dense FLOP/s).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


def mfu(tokens_per_s: float, flops_per_token_: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token_ / (n_devices * peak)


def estimate_memory_per_device(param_count: int, n_devices: int, train_cfg: Any = None, *,
                               param_dtype: str = "float32", trainable: int | None = None) -> float:
    """Bytes per device for the parameters, the gradients and the optimizer state of the `trainable` ones (all by
    default; LoRA: the adapters), fully sharded over `n_devices`. Gradients take the parameter dtype."""
    optimizer = getattr(train_cfg, "optimizer", "adamw")
    state_bytes = 2 if str(getattr(train_cfg, "optimizer_dtype", "float32")) in ("bfloat16", "bf16") else 4
    param_bytes = 2 if str(param_dtype) in ("bfloat16", "bf16", "float16") else 4
    n_states = {"sgd": 1, "signsgd": 0}.get(optimizer, 2)
    trainable = param_count if trainable is None else trainable
    return (param_count * param_bytes + trainable * (param_bytes + n_states * state_bytes)) / max(1, n_devices)


def peak_memory_gib() -> float | None:
    """The most device memory any local device has held so far (GiB); None where the backend keeps no count (CPU)."""
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 2**30 if peaks else None


class CompletionClock:
    """When each dispatched step finished on the devices, taken by a helper thread that waits on the step's outputs.
    The training loop reads results a step late, and XLA:GPU can hold the host at a conditional until the device
    gets there, so the time a result is read may be a whole step after it was ready (a 2 x H200 MoE run printed
    its last step at 0.05 s, its others at 0.4 s); completion times have no such lag."""

    def __init__(self, wait=None):
        import jax

        self._wait = wait or jax.block_until_ready
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xorl-step-clock")

    def watch(self, outputs) -> Future:
        """A future of `time.perf_counter()` at the moment `outputs` are ready (steps finish in dispatch order)."""
        return self._pool.submit(self._ready_at, outputs)

    def _ready_at(self, outputs) -> float:
        self._wait(outputs)
        return time.perf_counter()

    def close(self):
        self._pool.shutdown(wait=False)


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


def drop_lines_after(path: str, step: int) -> int:
    """Remove the lines of `path` (metrics.jsonl) whose step is after `step`, and unreadable ones (a line torn by
    a crash), by writing the rest to a temporary file renamed over it. Returns how many lines went."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
            if int(row["step"]) <= step:
                keep.append(line)
        except (ValueError, TypeError, KeyError):
            pass
    if len(keep) == len(lines):
        return 0
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsLogger:
    """Progress line, metrics.jsonl and (if tensorboardX is installed) TensorBoard events, on process 0 only.

    On a TTY the train line is rewritten in place every step; otherwise a plain line is printed every `log_steps`
    steps and at the last step. Every train call is appended to `output_dir/metrics.jsonl` (flushed per line).
    `resume_step` (the step a run starts after: a resumed checkpoint's, 0 for a fresh start) first drops the file's
    lines of later steps, which an earlier run logged and this one redoes, so each step is there once; TensorBoard
    is told the same (`purge_step`).
    """

    _LINE_KEYS = (("loss", "loss {:.4f}"), ("aux_loss", "aux {:.4f}"), ("lr", "lr {:.2e}"),
                  ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"),
                  ("peak_memory_gib", "peak {:.1f} GiB"))

    def __init__(self, output_dir: str, *, log_steps: int = 1, total_steps: int | None = None,
                 process_index: int | None = None, use_tensorboard: bool = True, stream=None, clock=time.monotonic,
                 resume_step: int | None = None):
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
        path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None:
            dropped = drop_lines_after(path, resume_step)
            if dropped:
                self.info(f"metrics.jsonl: dropped {dropped} line(s) after step {resume_step}, logged by an earlier "
                          "run and redone by this one")
        self._jsonl = open(path, "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self.info("tensorboardX is not installed: TensorBoard logging is off (pip install tensorboardX)")
            else:
                tb_dir = os.path.join(output_dir, "tensorboard")
                purge = resume_step + 1 if resume_step is not None and os.path.isdir(tb_dir) else None
                self._tb = SummaryWriter(tb_dir, purge_step=purge)

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
