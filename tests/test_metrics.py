"""FLOPs per token on hand-computed cases, peak lookup, and the metrics logger (jsonl, TTY vs plain, process 0)."""

import io
import json
import os
import time

import jax
import pytest

from xorl_jax.metrics import MetricsLogger, estimate_memory_per_device, mfu, peak_flops_per_device

from xorl_jax.models.qwen3 import Qwen3Config
from xorl_jax.models.qwen3_5 import Qwen3_5Config

SMALL = dict(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=4, intermediate_size=16)
T = 6
ATTN = 6 * 2 * 4 * (T + 1)  # causal attention per layer: 6 * H * d * (T + 1)


def test_flops_dense_by_hand():
    # per layer: q 8*8 + k,v 2*8*4 + o 8*8 = 192, mlp 3*8*16 = 384; head 10*8 = 80 -> 2*576 + 80 = 1232 params
    assert Qwen3Config(**SMALL).flops_per_token(T) == 6 * 1232 + 2 * ATTN
    # the head matmul runs whether or not it is tied to the embedding
    assert Qwen3Config(**SMALL, tie_word_embeddings=True).flops_per_token(T) == 6 * 1232 + 2 * ATTN


def test_flops_moe_by_hand():
    # MoE mlp (active): router 8*4 + top-2 * 3*8*8 = 32 + 384 = 416 instead of the dense 384
    moe = Qwen3Config(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    assert moe.flops_per_token(T) == 6 * (80 + 2 * (192 + 416)) + 2 * ATTN


def test_flops_qwen3_5_by_hand():
    cfg = Qwen3_5Config(**SMALL, layer_types=("linear_attention", "full_attention"), linear_key_head_dim=4,
                        linear_value_head_dim=4, linear_num_key_heads=1, linear_num_value_heads=2,
                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                        shared_expert_intermediate_size=12)
    mlp = 32 + 2 * 3 * 8 * 8 + 3 * 8 * 12 + 8  # router, 2 routed experts, shared expert and its gate = 712
    gated_attn = 192 + 64  # q_proj also emits the output gate
    gdn = 8 * (2 * 4 + 8) + 8 * 8 + 2 * 8 * 2 + 8 * 8  # q,k,v + z + a,b + out = 288
    chunk = 3 * 2 * 2 * (3 * 64 * 4 + 2 * 64 * 4 + 3 * 4 * 4)  # 3 x heads x 2 x (K K^T, Q K^T, W/U, P V, state)
    want = 6 * (80 + gated_attn + gdn + 2 * mlp) + ATTN + chunk
    assert cfg.flops_per_token(T) == want



def test_peak_and_mfu():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("TPU v5 lite") is None
    assert peak_flops_per_device() is None  # CPU in tests
    assert mfu(1000.0, 989e9, 2, 989e12) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, 1, None) is None


def test_memory_estimate():
    class T:
        optimizer, optimizer_dtype = "adamw", "bfloat16"

    assert estimate_memory_per_device(1000, 4) == 1000 * 16 / 4
    assert estimate_memory_per_device(1000, 1, T()) == 1000 * 12
    # bf16 parameters and gradients; LoRA: only the 10 adapter parameters have gradients and state
    assert estimate_memory_per_device(1000, 2, T(), param_dtype="bfloat16") == 1000 * (2 + 2 + 4) / 2
    assert estimate_memory_per_device(1000, 1, None, param_dtype="bfloat16", trainable=10) == 1000 * 2 + 10 * 10


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _train_metrics(i):
    return {"loss": 2.0 - 0.1 * i, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 12345.0, "mfu": 0.4}


def test_jsonl_rows_and_plain_lines_every_log_steps(tmp_path):
    out, clock = io.StringIO(), Clock()
    logger = MetricsLogger(str(tmp_path), log_steps=2, total_steps=5, process_index=0, use_tensorboard=False,
                           stream=out, clock=clock)
    for step in range(1, 6):
        clock.t = 10.0 * step
        logger.log_train(step, _train_metrics(step))
    logger.log_eval(5, {"eval_loss": 1.25, "eval_tokens": 99})
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["split"], r["step"]) for r in rows] == [("train", s) for s in range(1, 6)] + [("eval", 5)]
    assert rows[2]["loss"] == pytest.approx(1.7) and rows[-1]["eval_tokens"] == 99
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5", "eval step 5"]
    # 10 s per step after the first call: at step 2, 3 steps remain.
    assert lines[0] == "step 2/5 | loss 1.8000 | lr 1.00e-04 | gnorm 0.500 | 12,345 tok/s | MFU 40.0% | ETA 0:00:30"
    assert "eval_loss 1.2500" in lines[-1]


def test_tty_rewrites_the_line_in_place(tmp_path):
    out = FakeTTY()
    logger = MetricsLogger(str(tmp_path), log_steps=100, total_steps=3, process_index=0, use_tensorboard=False,
                           stream=out, clock=Clock())
    logger.log_train(1, _train_metrics(1))
    logger.log_train(2, _train_metrics(2))
    logger.info("a message")
    logger.log_train(3, _train_metrics(3))
    logger.close()
    text = out.getvalue()
    assert text.count("\r") == 3  # every step, despite log_steps=100
    assert "\na message\n" in text  # messages start on a fresh line
    assert text.endswith("ETA 0:00:00\n")
    assert text.count("\n") == 3  # after step 2's line, the message, after the last step


def test_other_processes_write_nothing(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(str(tmp_path / "run"), process_index=1, total_steps=2, stream=out)
    logger.info("hello")
    logger.log_train(1, _train_metrics(1))
    logger.log_eval(1, {"eval_loss": 1.0})
    logger.close()
    assert out.getvalue() == ""
    assert not os.path.exists(tmp_path / "run")


def test_missing_tensorboardx_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tbx(name, *a, **kw):
        if name == "tensorboardX":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tbx)
    out = io.StringIO()
    logger = MetricsLogger(str(tmp_path), process_index=0, stream=out)
    logger.log_train(1, _train_metrics(1))
    logger.close()
    assert out.getvalue().count("tensorboardX is not installed") == 1
    assert not os.path.exists(tmp_path / "tensorboard")


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboardX")
    logger = MetricsLogger(str(tmp_path), process_index=0, stream=io.StringIO())
    logger.log_train(1, _train_metrics(1))
    logger.close()
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 100


def test_completion_clock_times_when_outputs_are_ready_not_when_read():
    import threading

    from xorl_jax.metrics import CompletionClock

    release = threading.Event()

    clock = CompletionClock(wait=lambda outputs: release.wait(5))  # outputs that become ready later
    try:
        t0 = time.perf_counter()
        first = clock.watch("step 1")
        second = clock.watch("step 2")
        time.sleep(0.2)
        release.set()
        t_first, t_second = first.result(), second.result()
        time.sleep(0.3)  # read late: the times stay those of readiness
        assert t0 + 0.2 <= t_first <= t_second < t0 + 0.45
    finally:
        clock.close()
    real = CompletionClock()  # jax arrays
    try:
        assert real.watch({"loss": jax.numpy.ones(3) * 2}).result() <= time.perf_counter()
    finally:
        real.close()


def test_peak_memory_shows_in_the_line_when_known(tmp_path):
    from xorl_jax.metrics import peak_memory_gib

    assert peak_memory_gib() is None or peak_memory_gib() >= 0  # CPU keeps no count; GPUs do
    stream = io.StringIO()
    logger = MetricsLogger(str(tmp_path), log_steps=1, total_steps=2, process_index=0, use_tensorboard=False,
                           stream=stream)
    logger.log_train(1, {"loss": 1.0, "peak_memory_gib": 61.25})
    logger.log_train(2, {"loss": 1.0, "peak_memory_gib": None})
    first, second = stream.getvalue().splitlines()
    assert "peak 61.2 GiB" in first and "peak" not in second
