"""Resume rules of checkpoint.training on a tiny hand-made train state (no model): which checkpoint a run starts
from, what it refuses, unreadable steps skipped and set aside, shapes checked before arrays are read, temporaries
cleaned, and metrics.jsonl holding each step once."""

import hashlib
import json
import logging
import os

import jax.numpy as jnp
import optax
import pytest

from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.checkpoint.training import TrainCheckpointer, clean_temporaries, plan_resume
from xorl_jax.metrics import MetricsLogger
from xorl_jax.train_step import TrainState

HF = {"model_type": "qwen3", "hidden_size": 8, "num_hidden_layers": 2, "transformers_version": "4.57.0"}


def tiny_state(width=4, value=0.0):
    params = {"w": jnp.full((width, 3), value), "b": jnp.zeros((3,))}
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optax.adam(1e-3).init(params), nonfinite_streak=zero,
                      skipped_total=zero)


def save_steps(root, steps, *, hf=HF, width=4):
    ck = TrainCheckpointer(root, keep=None)
    for s in steps:
        ck.save(s, tiny_state(width, value=float(s)), {"step": s, "data_state": {"pos": s}, "hf_config": hf})
    ck.wait()
    return ck


def digest(root):
    """{relative path: sha256} of every file under root: byte-identical means untouched."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def resume(root, setting="auto", width=4, hf=HF):
    plan = plan_resume(setting, str(root), hf_config=hf)
    ck = TrainCheckpointer(str(root), keep=None)
    return ck, plan, ck.restore(plan, tiny_state(width))


def largest_file(d):
    files = [os.path.join(a, f) for a, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


def test_auto_resumes_the_newest_and_fresh_start_in_a_used_dir_is_refused(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    assert plan_resume("auto", str(root)).root is None  # nothing there yet: step 0
    save_steps(str(root), [1, 2])
    _, _, (state, meta, step) = resume(root)
    assert step == 2 and meta["data_state"] == {"pos": 2} and float(state.params["w"][0, 0]) == 2.0
    before = digest(root)
    for setting in (None, "", "none", "None"):
        with pytest.raises(CheckpointError, match=r"already holds checkpoints \(steps 1, 2\).*new train.output_dir"):
            plan_resume(setting, str(root))
    assert digest(root) == before


def test_explicit_paths(tmp_path):
    other = tmp_path / "other" / "checkpoints"
    save_steps(str(other), [3, 6])
    own = tmp_path / "own" / "checkpoints"
    # another run's checkpoint into an empty output_dir: fine, from a step, a checkpoints dir or an output_dir
    for setting, want in ((other / "3", 3), (other, 6), (tmp_path / "other", 6)):
        assert resume(own, str(setting))[2][2] == want
    with pytest.raises(CheckpointError, match="no such directory"):
        plan_resume(str(tmp_path / "missing"), str(own))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        plan_resume(str(tmp_path / "empty"), str(own))
    # once this output_dir holds checkpoints, loading another run's (or an older own step) would mix two runs
    save_steps(str(own), [2, 4])
    with pytest.raises(CheckpointError, match="checkpoints of another run"):
        plan_resume(str(other / "3"), str(own))
    with pytest.raises(CheckpointError, match=r"picks step 2.*later checkpoints \(steps 4\)"):
        plan_resume(str(own / "2"), str(own))
    assert resume(own, str(own / "4"))[2][2] == 4  # its own newest step: the same as auto


def test_unreadable_newest_is_skipped_with_a_warning_and_set_aside(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    save_steps(str(root), [1, 2, 3])
    os.remove(os.path.join(root, "3", "meta", "metadata"))  # found from the files, before the model is built
    f = largest_file(root / "2" / "params")  # found only when the arrays are read
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with caplog.at_level(logging.WARNING, logger="xorl_jax"):
        ck, plan, (state, meta, step) = resume(root)
    assert step == 1 and float(state.params["w"][0, 0]) == 1.0
    warned = caplog.text
    assert f"checkpoint {root / '3'} cannot be read" in warned and f"checkpoint {root / '2'} cannot be read" in warned
    # kept under another name, out of the way of this run's next saves of steps 2 and 3
    names = sorted(os.listdir(root))
    assert names[0] == "1" and [n.split(".")[0] for n in names[1:]] == ["2", "3"], names
    assert all(".unreadable-" in n for n in names[1:])
    ck.save(2, state, {"step": 2, "data_state": {}, "hf_config": HF})
    ck.wait()
    assert ck.manager.latest_step() == 2


def test_nothing_readable_is_an_error_and_an_explicit_step_does_not_fall_back(tmp_path):
    root = tmp_path / "checkpoints"
    save_steps(str(root), [1, 2])
    os.remove(os.path.join(root, "2", "meta", "metadata"))
    with pytest.raises(CheckpointError, match="cannot be read: meta unreadable"):
        plan_resume(str(root / "2"), str(tmp_path / "elsewhere"))
    os.remove(os.path.join(root, "1", "meta", "metadata"))
    before = sorted(os.listdir(root))
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        plan_resume("auto", str(root))
    assert sorted(os.listdir(root)) == before  # nothing renamed when there is nothing to resume from


def test_a_different_model_is_refused_before_any_array_is_read(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_steps(str(root), [1])
    same = dict(HF, transformers_version="5.0.0", _name_or_path="x")  # what names the file, not the model
    assert plan_resume("auto", str(root), hf_config=same).steps == [1]
    with pytest.raises(CheckpointError, match="different model.*hidden_size 8 in the checkpoint, 16 here"):
        plan_resume("auto", str(root), hf_config=dict(HF, hidden_size=16))
    ck = TrainCheckpointer(str(root), keep=None)
    monkeypatch.setattr(ck.manager, "restore", lambda *a, **k: pytest.fail("arrays read before the shape check"))
    with pytest.raises(CheckpointError, match=r"parameter w is \(4, 3\) there, \(5, 3\) here"):
        ck.restore(plan_resume("auto", str(root), hf_config=HF), tiny_state(width=5))


def test_a_save_never_lands_on_another_runs_step(tmp_path):
    root = tmp_path / "checkpoints"
    save_steps(str(root), [2])
    ck = TrainCheckpointer(str(root), keep=None)
    with pytest.raises(CheckpointError, match="already exists"):
        ck.save(2, tiny_state(), {"step": 2})


def test_save_total_limit_keeps_the_resumed_runs_newest(tmp_path):
    root = tmp_path / "checkpoints"
    save_steps(str(root), [1, 2])
    plan = plan_resume("auto", str(root))
    ck = TrainCheckpointer(str(root), keep=2)
    state, _, _ = ck.restore(plan, tiny_state())
    for s in (3, 4):
        ck.save(s, state, {"step": s, "data_state": {}, "hf_config": HF})
    ck.wait()
    assert sorted(os.listdir(root)) == ["3", "4"]


def test_clean_temporaries_removes_only_clearly_temporary_directories(tmp_path):
    keep = ["checkpoints/2", "checkpoints/notes", "global_step_4/hf_ckpt",
            "global_step_4/.hf_ckpt.incomplete-1234abcd.old"]
    gone = ["checkpoints/6.orbax-checkpoint-tmp-1700000000", "checkpoints/8.orbax-checkpoint-tmp",
            "global_step_4/.hf_ckpt.incomplete-1234abcd"]
    for p in keep + gone:
        (tmp_path / p).mkdir(parents=True)
    removed = clean_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / p) for p in gone)
    assert all((tmp_path / p).is_dir() for p in keep)


def test_metrics_jsonl_holds_each_step_once_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"split": "train", "step": s} for s in (1, 2, 3, 4)] + [{"split": "eval", "step": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"split": "train", "st')  # torn by a crash
    untouched = path.read_text()
    MetricsLogger(str(tmp_path), process_index=0, use_tensorboard=False, stream=open(os.devnull, "w")).close()
    assert path.read_text() == untouched  # no resume step given: appended to as before
    logger = MetricsLogger(str(tmp_path), process_index=0, use_tensorboard=False, stream=open(os.devnull, "w"),
                           resume_step=2)
    logger.log_train(3, {"loss": 1.0})
    logger.close()
    got = [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]
    assert got == [("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    assert not [p for p in os.listdir(tmp_path) if p != "metrics.jsonl"]  # no temporary left behind
    MetricsLogger(str(tmp_path), process_index=0, use_tensorboard=False, stream=open(os.devnull, "w"),
                  resume_step=0).close()
    assert path.read_text() == ""
