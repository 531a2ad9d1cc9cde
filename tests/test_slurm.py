"""SLURM: scripts/slurm/train.sbatch trains the demo with 2 tasks in its CPU test mode and checkpoints, on a running
SLURM (scripts/slurm/local_cluster.sh install sets up a one-node one on Debian as root; CI does that). Skips, with the
reason, where no SLURM answers. The XLA GPU flags of scripts/slurm/xla_gpu.env are checked against the installed
XLA everywhere (an unknown flag aborts XLA at start-up)."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from xorl_jax.data.demo import DEMO_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_DIR = os.path.join(ROOT, "scripts", "slurm")
JOB_TIMEOUT_S = 400


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "JAX_"))
           and k != "XLA_FLAGS"}
    env.update(extra)
    return env


def test_xla_gpu_env_flags_exist():
    script = (f"source {SLURM_DIR}/xla_gpu.env && echo \"$XLA_FLAGS\" && "
              f"{sys.executable} -c 'import jax, jax.numpy as jnp; jnp.zeros(2).block_until_ready(); print(\"ok\")'")
    p = subprocess.run(["bash", "-c", script], env=clean_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-2000:]
    flags = p.stdout.split("\n")[0].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(flags) >= 8, flags
    # A flag the caller set keeps the caller's value.
    p = subprocess.run(["bash", "-c", f"source {SLURM_DIR}/xla_gpu.env && echo \"$XLA_FLAGS\""],
                       env=clean_env(XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false"),
                       capture_output=True, text=True, timeout=30)
    assert p.stdout.count("xla_gpu_enable_latency_hiding_scheduler") == 1 and "scheduler=false" in p.stdout


def slurm_or_skip():
    """Skip (reason printed) unless sinfo answers and a node that can take 2 tasks is up."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        reason = ("SLURM is not installed (no sinfo/sbatch on PATH); as root on Debian run "
                  "scripts/slurm/local_cluster.sh install")
        print(f"SKIP test_slurm: {reason}")
        pytest.skip(reason)
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%n %T %c"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        p = None
    if p is None or p.returncode != 0:
        reason = ("sinfo does not answer (slurmctld down?): "
                  f"{(p.stderr.strip() if p else 'timed out after 30s')[:300]}; run scripts/slurm/local_cluster.sh start")
        print(f"SKIP test_slurm: {reason}")
        pytest.skip(reason)
    nodes = [line.split() for line in p.stdout.splitlines() if len(line.split()) == 3]
    usable = [n for n in nodes if n[1].rstrip("*~#").startswith(("idle", "mixed")) and n[2].isdigit()
              and int(n[2]) >= 2]
    if not usable:
        reason = f"no idle SLURM node with >= 2 CPUs (sinfo: {p.stdout.strip()[:300] or 'no nodes'})"
        print(f"SKIP test_slurm: {reason}")
        pytest.skip(reason)


def test_sbatch_two_tasks_train_and_checkpoint_on_cpu(tmp_path):
    slurm_or_skip()
    out = tmp_path / "out"
    name = f"xorl-test-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"--model.config_path={DEMO_DIR}", f"--model.tokenizer_path={DEMO_DIR}",
        f"--data.datasets=[{{path: {DEMO_DIR}/train.jsonl, type: messages}}]", "--data.eval_datasets=[]",
        "--data.sample_packing_sequence_len=128", "--train.micro_batch_size=1",
        "--train.gradient_accumulation_steps=1", "--train.max_steps=2", "--train.save_steps=2",
        "--train.log_steps=1", "--train.save_hf_weights=false", "--train.sample_eval_prompts=0",
        "--train.use_tensorboard=false", f"--train.output_dir={out}",
    ]
    cmd = ["sbatch", "--wait", f"--job-name={name}", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
           "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", f"--output={tmp_path}/job-%j.out",
           os.path.join(SLURM_DIR, "train.sbatch"), *overrides]
    env = clean_env(XORL_CPU_TEST="1", XORL_CPU_DEVICES="4", XORL_ROOT=ROOT, PYTHON=sys.executable,
                    CONFIG=os.path.join(ROOT, "configs", "demo_cpu.yaml"))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}", "--signal=KILL", "--full"], timeout=30)
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        logs = "".join(open(tmp_path / f).read()[-3000:] for f in os.listdir(tmp_path) if f.startswith("job-"))
        pytest.fail(f"SLURM job {name} did not finish in {JOB_TIMEOUT_S}s (cancelled)\n{logs}")
    seconds = time.perf_counter() - t0
    job_out = [f for f in os.listdir(tmp_path) if f.startswith("job-") and f.endswith(".out")]
    log = open(tmp_path / job_out[0]).read() if job_out else "(no job output file)"
    print(f"\nSLURM job {name}: {seconds:.1f}s, rc {p.returncode}")
    assert p.returncode == 0, f"sbatch rc {p.returncode}: {p.stdout[-1000:]} {p.stderr[-2000:]}\n{log[-4000:]}"
    assert "CPU test mode" in log and "2 process(es)" in log, log[-4000:]
    assert "0: step 2/2" in log, log[-4000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["loss"] == r["loss"] for r in train), records
    assert train[1]["loss"] < train[0]["loss"], train
    assert {"params", "opt_state", "meta"} <= set(os.listdir(out / "checkpoints" / "2")), log[-4000:]
