"""Rerunning a training command, as a user does, through the CLI on the tiny demo model: a rerun resumes from the
newest readable checkpoint (an unreadable newest one is skipped with a warning, set aside, and the step is redone
to the same bits), metrics.jsonl holds each step once, and a fresh start or a different model in the used
output_dir is refused with one line, leaving the earlier checkpoints byte for byte as they were."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
DEMO_DIR = os.path.join(ROOT, "xorl_jax", "assets", "demo")


def command(out, cache, *extra):
    # The demo config as shipped (save_total_limit 2, load_checkpoint_path left at its default), shrunk to seconds.
    return [sys.executable, "-m", "xorl_jax.train", "--config", DEMO_CONFIG, f"--train.output_dir={out}",
            "--train.max_steps=3", "--train.save_steps=1", "--train.save_hf_weights=false",
            "--train.sample_eval_prompts=0", "--train.log_steps=1", "--train.micro_batch_size=2",
            "--data.sample_packing_sequence_len=128", f"--train.compilation_cache_dir={cache}", *extra]


def start(cmd):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def digest(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def train_rows(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r for r in rows if r["split"] == "train"}, [r["step"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    out, cache = tmp / "run", tmp / "xla_cache"
    code, stdout, err = finish(start(command(out, cache)))
    assert code == 0, err[-3000:]
    return tmp, out, cache


def test_rerun_resumes_skipping_an_unreadable_newest_checkpoint(first_run):
    tmp, out, cache = first_run
    ckpt = out / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["2", "3"]  # save_total_limit 2
    first, _ = train_rows(out)
    kept = digest(ckpt / "2")
    # Damage the newest checkpoint's largest parameter file, as a crash of the file system might.
    params = ckpt / "3" / "params"
    big = max((os.path.join(d, f) for d, _, fs in os.walk(params) for f in fs), key=os.path.getsize)
    with open(big, "r+b") as fh:
        fh.truncate(os.path.getsize(big) // 2)

    code, stdout, err = finish(start(command(out, cache)))  # the very same command
    log = stdout + err
    assert code == 0, err[-3000:]
    assert f"checkpoint {ckpt / '3'} cannot be read" in log, log[-3000:]
    assert "resumed from step 2" in log, log[-3000:]
    rows, steps = train_rows(out)
    assert steps == [1, 2, 3], steps  # the redone step 3 replaced the first run's line
    assert rows[3]["loss"] == first[3]["loss"] and rows[3]["grad_norm"] == first[3]["grad_norm"]  # exact resume
    names = sorted(os.listdir(ckpt))
    assert names[:2] == ["2", "3"] and len(names) == 3 and names[2].startswith("3.unreadable-"), names
    assert digest(ckpt / "2") == kept


def test_fresh_start_or_other_model_in_a_used_output_dir_is_refused(first_run, tmp_path):
    tmp, out, cache = first_run
    before = digest(out)
    other_model = tmp_path / "model"
    shutil.copytree(DEMO_DIR, other_model)
    cfg = json.loads((other_model / "config.json").read_text())
    cfg["moe_intermediate_size"] = cfg["moe_intermediate_size"] * 2
    (other_model / "config.json").write_text(json.dumps(cfg))
    fresh = start(command(out, cache, "--train.load_checkpoint_path=none"))
    other = start(command(out, cache, f"--model.config_path={other_model}"))
    for proc, needle in ((fresh, "already holds checkpoints"), (other, "different model (moe_intermediate_size")):
        code, _, err = finish(proc)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err[-3000:]
        assert "train.output_dir" in lines[0]  # says what to do
    assert digest(out) == before
