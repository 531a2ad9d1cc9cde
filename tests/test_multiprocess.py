"""Multi-process training on CPU: 2 processes x 4 fake devices (gloo collectives, JAX_* env start-up) train the demo
to the same losses as 1 process x 8 devices, write one checkpoint together, and resume from it.

The runs are real `python -m xorl_jax.train` subprocesses (a JAX process can join one distributed run only), each
with a timeout and killed with SIGKILL on failure; assertion messages carry the tail of their output.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(out_dir, **train):
    # Small and fast: 1 row per device, 128 tokens, no eval set, no HF export, no samples, no TensorBoard.
    # Accumulation 2: micro-batch a must hold the same rows for any process count (the MoE aux loss is per
    # micro-batch, so it would notice).
    base = {
        "model.config_path": DEMO_DIR, "model.tokenizer_path": DEMO_DIR,
        "data.datasets": f"[{{path: {DEMO_DIR}/train.jsonl, type: messages}}]",
        "data.eval_datasets": "[]",
        "data.sample_packing_sequence_len": 128,
        "train.output_dir": str(out_dir), "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 2,
        "train.max_steps": 3, "train.save_steps": 3, "train.log_steps": 1, "train.save_hf_weights": "false",
        "train.sample_eval_prompts": 0, "train.use_tensorboard": "false", "train.save_async": "false",
    }
    base.update({f"train.{k}": v for k, v in train.items()})
    return ["--config", DEMO_CONFIG] + [f"--{k}={v}" for k, v in base.items()]


def child_env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "XLA_FLAGS", "TPU_", "CUDA_VISIBLE"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


class Run:
    """Subprocesses started together, output in files (no pipe can fill up and block them)."""

    def __init__(self, name, log_dir, argv, envs):
        self.name = name
        self.procs, self.logs = [], []
        for i, env in enumerate(envs):
            log = os.path.join(str(log_dir), f"{name}.{i}.log")
            self.logs.append(log)
            with open(log, "wb") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "xorl_jax.train", *argv], cwd=ROOT,
                                                   env=env, stdout=f, stderr=subprocess.STDOUT))
        self.t0 = time.perf_counter()
        self.seconds = None

    def tail(self, n=3000) -> str:
        parts = []
        for i, log in enumerate(self.logs):
            text = open(log, errors="replace").read() if os.path.exists(log) else ""
            parts.append(f"--- {self.name} process {i} (rc {self.procs[i].returncode}), last {n} chars ---\n"
                         f"{text[-n:]}")
        return "\n".join(parts)

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, timeout=RUN_TIMEOUT_S):
        """Wait for all; on a timeout or a failed process kill the rest (SIGKILL) and fail with their output."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                failed = [p for p in self.procs if p.returncode not in (None, 0)]
                if failed:  # one died: the others would wait for it in a collective until their own timeout
                    time.sleep(2)
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"{self.name}: timed out after {timeout}s\n{self.tail()}")
                time.sleep(0.2)
        finally:
            self.seconds = time.perf_counter() - self.t0
        if any(p.returncode != 0 for p in self.procs):
            self.kill()
            pytest.fail(f"{self.name}: a process failed\n{self.tail()}")
        return self


def multi_process(name, log_dir, argv, n=2, devices=4):
    port = free_port()
    envs = [child_env(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                      JAX_PROCESS_ID=str(i)) for i in range(n)]
    return Run(name, log_dir, argv, envs)


def train_records(out_dir):
    path = os.path.join(str(out_dir), "metrics.jsonl")
    assert os.path.exists(path), f"no {path}"
    return [r for r in map(json.loads, open(path)) if r.get("split") == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    out = {"tmp": tmp}
    # The reference (1 process x 8 devices) and the 2-process run go side by side: most of both is compilation.
    single = Run("single", tmp, train_args(tmp / "single"), [child_env(8)])
    multi = multi_process("multi", tmp, train_args(tmp / "multi"))
    try:
        out["multi"] = multi.wait()
        out["single"] = single.wait()
        out["resume"] = multi_process("resume", tmp, train_args(tmp / "multi", load_checkpoint_path="auto",
                                                                 max_steps=4)).wait()
    finally:
        single.kill()
        multi.kill()
    print("\nseconds until collected: " + ", ".join(f"{k} {v.seconds:.1f}" for k, v in out.items() if k != "tmp"))
    return out


def test_two_processes_match_one_process_and_checkpoint(runs):
    tmp = runs["tmp"]
    single = train_records(tmp / "single")
    multi = [r for r in train_records(tmp / "multi") if r["step"] <= 3]
    assert [r["step"] for r in single] == [1, 2, 3], runs["single"].tail()
    assert [r["step"] for r in multi] == [1, 2, 3], runs["multi"].tail()
    for a, b in zip(single, multi):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"], a[key], b[key])
    # Both processes wrote their shards into one checkpoint, complete (Orbax renames it into place when done).
    ckpt = tmp / "multi" / "checkpoints" / "3"
    assert {"params", "opt_state", "meta"} <= set(os.listdir(ckpt)), runs["multi"].tail()
    # Only process 0 logs: one summary in the logs, each step once in metrics.jsonl.
    logs = [open(p).read() for p in runs["multi"].logs]
    assert "2 process(es)" in logs[0] and "step 3/3" in logs[0], runs["multi"].tail()
    assert "step 3/3" not in logs[1], runs["multi"].tail()


def test_two_processes_resume_from_their_checkpoint(runs):
    tmp = runs["tmp"]
    log0 = open(runs["resume"].logs[0]).read()
    assert "resumed from step 3" in log0, runs["resume"].tail()
    records = train_records(tmp / "multi")
    steps = [r["step"] for r in records]
    assert steps == [1, 2, 3, 4], (steps, runs["resume"].tail())  # step 4 only: nothing before it ran again
    assert records[-1]["loss"] == records[-1]["loss"] and records[-1]["loss"] < 20  # finite
    assert {"params", "opt_state", "meta"} <= set(os.listdir(tmp / "multi" / "checkpoints" / "4"))


# ----------------------------------------------------------------------------------------------- start-up logic
def test_detect_env_and_slurm():
    assert distributed.detect({}) is None
    assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) \
        is None
    assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) \
        == dict(coordinator_address="h:1", num_processes=2, process_id=1)
    # One task per GPU (16 tasks on 2 nodes): JAX's SLURM detection, which binds GPU SLURM_LOCALID.
    per_gpu = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
               "SLURM_JOB_ID": "4242", "SLURM_LOCALID": "1"}
    assert distributed.detect(per_gpu) == {}
    # One task per node: explicit parameters, detection off, so the process keeps all of its GPUs.
    per_node = dict(per_gpu, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
    assert distributed.detect(per_node) == dict(coordinator_address="gpu07:61586", num_processes=2, process_id=1,
                                                cluster_detection_method="deactivate")
    # srun's step variables win over the job's.
    step = dict(per_node, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="n[3,5]",
                JAX_COORDINATOR_PORT="1234")
    assert distributed.detect(step)["coordinator_address"] == "n3:1234"
    assert distributed.detect(dict(per_gpu, SLURM_NTASKS="1")) is None


def test_first_slurm_host():
    assert distributed.first_slurm_host("node001") == "node001"
    assert distributed.first_slurm_host("node001,other") == "node001"
    assert distributed.first_slurm_host("node[001-004,007],other") == "node001"
    assert distributed.first_slurm_host("gpu-a[03,05]") == "gpu-a03"


def test_gloo_only_where_cpu_may_be_used(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    assert distributed.use_cpu_collectives({"JAX_PLATFORMS": "cpu"})
    assert calls == [("jax_cpu_collectives_implementation", "gloo")]
    assert not distributed.use_cpu_collectives({"JAX_PLATFORMS": "cuda"})
    assert not distributed.use_cpu_collectives({"JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "mpi"})
    assert len(calls) == 1
    # The option exists under this name in the installed JAX.
    assert hasattr(jax.config, "jax_cpu_collectives_implementation")


def test_micro_batches_do_not_depend_on_the_process_count():
    import numpy as np

    from xorl_jax.config import load_config
    from xorl_jax.data import build_train_iterator, load_tokenizer
    from xorl_jax.train_step import stack_micro_batches

    cfg = load_config(DEMO_CONFIG, train_args("unused")[2:])
    tok = load_tokenizer(DEMO_DIR)
    accum, micro_rows = 2, 8

    def global_micro_batches(processes):
        # What the trainer builds: each process stacks its rows into [accum, rows/P, T]; the global array puts the
        # processes' rows side by side on the batch axis (make_array_from_process_local_data).
        local = []
        for p in range(processes):
            it = build_train_iterator(cfg.data, tok, global_batch_size=micro_rows * accum, process_index=p,
                                      process_count=processes, seed=cfg.data.seed, micro_batches=accum)
            local.append(stack_micro_batches(next(it), accum)["input_ids"])
        return np.concatenate(local, axis=1)

    np.testing.assert_array_equal(global_micro_batches(2), global_micro_batches(1))
