"""SIGUSR1 / SIGTERM (SLURM's time-limit warning and pre-emption): the run finishes its step, saves a checkpoint,
exits 75, and the same command resumes from it (train.load_checkpoint_path left at its default, auto)."""

import json
import os
import signal
import subprocess
import sys
import time

from test_trainer import DEMO_CONFIG, ROOT, demo_overrides

from xorl_jax.preemption import EXIT_PREEMPTED, StopSignals


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.received == "SIGUSR1" and stop.should_stop()
    assert signal.getsignal(signal.SIGUSR1) is before


def _train(out_dir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "xorl_jax.train", "--config", DEMO_CONFIG, *demo_overrides(out_dir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(out_dir):
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_signal_saves_a_checkpoint_exits_75_and_the_run_resumes(tmp_path):
    proc = _train(tmp_path, "--train.max_steps=400")
    deadline = time.time() + 240
    while len(_logged_steps(tmp_path)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGUSR1" in err and "the same command resumes" in err
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and saved[-1] >= 2
    stopped_at = saved[-1]
    again = _train(tmp_path, f"--train.max_steps={stopped_at + 2}")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-2000:]
    assert f"resumed from step {stopped_at}" in out + err
    assert _logged_steps(tmp_path) == list(range(1, stopped_at + 3))  # each step once
