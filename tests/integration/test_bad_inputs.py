"""Adverse inputs through the training CLI, as a user meets them: each is one `error: ...` line on stderr that names
the culprit (file, key, row) and what to do, exit code 2, no traceback, and, where it can be known from the files
alone, before the model is set up (the trainer's `model: ...` line never appears). A full disk while a checkpoint
or an export is written is one line as well and leaves nothing half-written; Ctrl-C stops with one line (exit 130).

The key cases run as real `python -m xorl_jax.train` subprocesses on one CPU device (the quick ones side by side);
the rest call `xorl_jax.train.main` in this process, which is the same code after the argument list. The models are
tiny Qwen3 checkpoints written by transformers' own classes, the tokenizer is the demo's.
"""

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from parity_utils import save_tiny

from xorl_jax.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DIR = os.path.join(ROOT, "xorl_jax", "assets", "demo")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MODEL_SETUP = "model: "  # the trainer's first line of model set-up (after the checks and the data)


# ------------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Checkpoints, data files and a run directory's worth of adverse inputs, named by what they are."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tmp = tmp_path_factory.mktemp("bad_inputs")

    def checkpoint(name, vocab, tokenizer=True):
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                          tie_word_embeddings=False)
        path = save_tiny(Qwen3ForCausalLM(cfg), tmp, name)
        for f in TOKENIZER_FILES if tokenizer else ():
            shutil.copy(os.path.join(DEMO_DIR, f), path)
        return path

    p = {"tmp": tmp, "hf": checkpoint("hf", 768),  # the demo tokenizer's 290 tokens fit
         "small_vocab": checkpoint("small_vocab", 256), "no_tokenizer": checkpoint("no_tokenizer", 768, False)}
    p["llama"] = str(tmp / "llama")  # config.json of a family xorl_jax does not train
    shutil.copytree(p["hf"], p["llama"])
    with open(os.path.join(p["llama"], "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(p["llama"], "config.json"), "w") as f:
        json.dump(dict(config, model_type="llama", architectures=["LlamaForCausalLM"]), f)
    p["int_weights"] = str(tmp / "int_weights")  # one weight stored as int8, as a quantized export stores it
    shutil.copytree(p["hf"], p["int_weights"])
    weights = os.path.join(p["int_weights"], "model.safetensors")
    tensors = load_file(weights)
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = (tensors[key] * 100).round().to(torch.int8)
    save_file(tensors, weights, metadata={"format": "pt"})

    rng = np.random.default_rng(0)

    def jsonl(name, rows):
        path = tmp / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    ids = [rng.integers(3, 290, 40).tolist() for _ in range(64)]
    p["tokenized"] = jsonl("tokenized.jsonl", [{"input_ids": x, "labels": x} for x in ids])
    bad_label = [dict(r) for r in ({"input_ids": x, "labels": x} for x in ids[:6])]
    bad_label[3]["labels"] = bad_label[3]["labels"][:-1] + [768]  # line 4: one label past the vocabulary
    p["bad_labels"] = jsonl("bad_labels.jsonl", bad_label)
    bad_ids = [{"input_ids": x} for x in ids[:6]]
    bad_ids[2]["input_ids"] = bad_ids[2]["input_ids"][:-1] + [5000]  # line 3: a token id of a larger vocabulary
    p["bad_ids"] = jsonl("bad_ids.jsonl", bad_ids)
    p["text"] = jsonl("text.jsonl", [{"text": f"{a} plus {a} is {2 * a}."} for a in range(64)])
    p["a_file"] = jsonl("not_a_directory", [{}])
    return p


def overrides(out, model, data, kind="tokenized", **extra):
    """A one-step run of `model` on `data`: no checkpoints, no export, unless `extra` says otherwise."""
    args = {"model.model_path": model, "model.dtype": "float32", "data.datasets": f"[{{path: {data}, type: {kind}}}]",
            "data.sample_packing_sequence_len": 128, "train.output_dir": str(out), "train.micro_batch_size": 1,
            "train.max_steps": 1, "train.save_steps": 0, "train.save_at_end": False, "train.save_hf_weights": False,
            "train.sample_eval_prompts": 0, "train.log_steps": 1, "train.use_tensorboard": False}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def assert_one_error(code, err, *needles, before_model=True):
    """Exit 2, one `error:` line holding every needle, no traceback, and (before_model) no model set-up."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    if before_model:
        assert not any(line.startswith(MODEL_SETUP) for line in lines), err[-3000:]
    return errors[0]


# -------------------------------------------------------------------------------------- real subprocesses
def launch(args, file_size_limit=None, ctrl_c=False):
    """`python -m xorl_jax.train ARGS` on one CPU device, as on a laptop. `file_size_limit`: bytes one file may
    grow to (RLIMIT_FSIZE); a write past it fails as on a full disk (EFBIG; Python ignores SIGXFSZ), the way a
    quota or a full volume stops a real run part way through a file. `ctrl_c`: SIGINT acts as a terminal's Ctrl-C
    even when the test run was started in the background of a script (a shell starts such jobs with SIGINT
    ignored, every child inherits that, and Python then installs no KeyboardInterrupt handler)."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "xorl_jax.train", *args]
    setup = []  # set in the child itself (no fork hook in this multithreaded process)
    if file_size_limit:
        setup.append(f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit}))")
    if ctrl_c:
        setup.append("signal.signal(signal.SIGINT, signal.default_int_handler)")
    if setup:
        cmd = [sys.executable, "-c", "import resource, runpy, signal, sys; " + "; ".join(setup) + "; "
               "sys.argv = ['xorl_jax.train', *sys.argv[1:]]; runpy.run_module('xorl_jax.train', run_name='__main__')",
               *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def quick_cli(inputs):
    """The cases that stop within seconds, started side by side: {name: (exit code, stdout, stderr)}."""
    tmp, hf, data = inputs["tmp"], inputs["hf"], inputs["tokenized"]
    cases = {
        "mesh": overrides(tmp / "mesh", hf, data, **{"train.data_parallel_shard_size": 3}),
        "mesh_dry_run": [*overrides(tmp / "mesh", hf, data, **{"train.data_parallel_shard_size": 3}), "--dry-run"],
        "heads_dry_run": [*overrides(tmp / "heads", hf, data, **{"train.tensor_parallel_size": 2,
                                                                 "train.data_parallel_shard_size": 1}),
                          "--dry-run", "--fake-devices", "2"],
        "model_type": overrides(tmp / "llama", inputs["llama"], data),
        "missing_data": overrides(tmp / "missing", hf, str(tmp / "no_such_dir" / "train.jsonl")),
    }
    procs = {name: (launch(args), time.perf_counter()) for name, args in cases.items()}
    return {name: (*finish(proc), time.perf_counter() - t0) for name, (proc, t0) in procs.items()}


def test_parallel_sizes_the_devices_cannot_hold(quick_cli):
    code, _, err, _ = quick_cli["mesh"]
    assert_one_error(code, err, "train.data_parallel_shard_size 3", "1 device(s)")
    code, _, err, _ = quick_cli["mesh_dry_run"]
    assert_one_error(code, err, "train.data_parallel_shard_size 3", "1 device(s)")


def test_heads_the_tensor_axis_cannot_split(quick_cli):
    code, _, err, _ = quick_cli["heads_dry_run"]
    assert_one_error(code, err, "num_key_value_heads 1", "train.tensor_parallel_size 2")


def test_unknown_model_type(quick_cli, inputs):
    code, _, err, _ = quick_cli["model_type"]
    assert_one_error(code, err, os.path.join(inputs["llama"], "config.json"), "model_type 'llama'", "qwen3")


def test_missing_data_file_is_reported_before_the_model(quick_cli, inputs):
    code, _, err, _ = quick_cli["missing_data"]
    assert_one_error(code, err, "data.datasets[0].path", str(inputs["tmp"] / "no_such_dir" / "train.jsonl"),
                     "not found")


def test_tokenized_rows_need_no_tokenizer_and_a_corrupt_cache_is_rebuilt(inputs, tmp_path):
    """A model directory without tokenizer files trains on tokenized rows; a cache of tokenized documents that was
    cut short is tokenized again with a warning, and rewritten whole."""
    out, cache = tmp_path / "run", tmp_path / "prepared"
    args = overrides(out, inputs["no_tokenizer"], inputs["tokenized"], **{"data.dataset_prepared_path": cache})
    code, _, err = finish(launch(args))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    [entry] = os.listdir(cache)
    first = (cache / entry).read_bytes()
    (cache / entry).write_bytes(first[: len(first) // 2])  # a copy cut short, a disk that filled mid-write

    code, _, err = finish(launch(args))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "ignoring unreadable cache" in err and entry in err, err[-3000:]
    with np.load(cache / entry) as rebuilt, np.load(io.BytesIO(first)) as before:  # whole again, the same documents
        assert sorted(rebuilt.files) == sorted(before.files)
        for name in before.files:
            np.testing.assert_array_equal(rebuilt[name], before[name])
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert losses and all(np.isfinite(losses)) and min(losses) > 1.0, losses  # a real loss (~log 768), not 0


def test_full_disk_during_checkpoint_and_export(inputs, tmp_path):
    hf, data = inputs["hf"], inputs["tokenized"]
    ckpt_run, export_run = tmp_path / "checkpoint", tmp_path / "export"
    limit = 48 * 1024  # metrics lines fit; a checkpoint's embedding table (768 x 32 floats) does not
    procs = [
        launch(overrides(ckpt_run, hf, data, **{"train.max_steps": 2, "train.save_steps": 1}), limit),
        launch(overrides(export_run, hf, data, **{"train.save_hf_weights": True}), limit),
    ]
    (code, _, err), (export_code, _, export_err) = finish(procs[0]), finish(procs[1])

    assert_one_error(code, err, str(ckpt_run / "checkpoints"), "File too large", before_model=False)
    names = os.listdir(ckpt_run / "checkpoints")
    assert not names, names  # no step that looks complete, and nothing half-written left behind

    assert_one_error(export_code, export_err, str(export_run / "global_step_1"), "the HF export of step 1",
                     before_model=False)
    left = [os.path.join(d, f) for d, _, fs in os.walk(export_run / "global_step_1") for f in fs]
    assert not left, left


def test_ctrl_c_stops_with_one_line(inputs, tmp_path):
    out = tmp_path / "run"
    proc = launch(overrides(out, inputs["hf"], inputs["tokenized"],
                            **{"train.max_steps": 100000, "train.save_steps": 2}), ctrl_c=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, timeout=120)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stops) == 1 and "Ctrl-C" in stops[0] and str(out / "checkpoints") in stops[0], err[-3000:]
    # complete steps, or a save the interrupt cut off under a temporary name (never taken for a checkpoint)
    names = os.listdir(out / "checkpoints")
    assert all(n.isdigit() or ".orbax-checkpoint-tmp" in n for n in names), names


# --------------------------------------------------------------------------------------------- in process
@pytest.fixture
def run_main(capsys, caplog):
    """main(args) in this process: (exit code, stderr with the log records)."""

    def run(args):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main(args)
        err = capsys.readouterr().err
        return code, err + "\n" + "\n".join(r.getMessage() for r in caplog.records)

    return run


def test_help_and_misspelt_flags(run_main, capsys):
    """--help is the usage (exit 0, every flag named); a misspelt flag is named with the nearest one, never taken
    for a config key waiting for its value."""
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in ("--config", "--dry-run", "--fake-devices", "--device-memory-gib"))
    demo = os.path.join(ROOT, "configs", "demo_cpu.yaml")
    code, err = run_main(["--config", demo, "--dryrun", "--fake-devices", "8"])
    assert_one_error(code, err, "unknown option --dryrun; did you mean --dry-run?")
    code, err = run_main(["--config", demo, "--max_steps=2"])
    assert_one_error(code, err, "unknown option --max_steps; did you mean --train.max_steps?")


def test_out_of_device_memory_is_one_line(run_main, inputs, tmp_path, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED while the step compiles or runs (a config larger than the device: here the error a
    32k-token row of the jnp attention met on a CPU) is one line with what to lower, not a traceback."""
    import jax

    import xorl_jax.trainer

    def run(cfg):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 74947890392 bytes.")

    monkeypatch.setattr(xorl_jax.trainer, "run", run)
    code, err = run_main(overrides(tmp_path, inputs["hf"], inputs["tokenized"]))
    assert_one_error(code, err, "out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 74947890392 bytes.)",
                     "train.micro_batch_size", "--dry-run")


def test_output_dir_that_is_a_file(run_main, inputs):
    code, err = run_main(overrides(inputs["a_file"], inputs["hf"], inputs["tokenized"]))
    assert_one_error(code, err, "train.output_dir", inputs["a_file"], "is a file")


def test_heads_the_tensor_axis_cannot_split_in_training(run_main, inputs, tmp_path):
    code, err = run_main(overrides(tmp_path, inputs["hf"], inputs["tokenized"],
                                   **{"train.tensor_parallel_size": 2}))
    assert_one_error(code, err, "num_key_value_heads 1", "train.tensor_parallel_size 2")


def test_integer_weights_are_refused(run_main, inputs, tmp_path):
    code, err = run_main(overrides(tmp_path, inputs["int_weights"], inputs["tokenized"]))
    assert_one_error(code, err, os.path.join(inputs["int_weights"], "model.safetensors"),
                     "model.layers.1.mlp.down_proj.weight", "I8", "floating point")


def test_text_data_without_tokenizer_files(run_main, inputs, tmp_path):
    code, err = run_main(overrides(tmp_path, inputs["no_tokenizer"], inputs["text"], kind="text"))
    assert_one_error(code, err, inputs["no_tokenizer"], "no tokenizer files", "model.tokenizer_path")


def test_tokenizer_larger_than_the_vocabulary(run_main, inputs, tmp_path):
    code, err = run_main(overrides(tmp_path, inputs["small_vocab"], inputs["text"], kind="text"))
    assert_one_error(code, err, inputs["small_vocab"], "290 tokens", "vocab_size 256")


@pytest.mark.parametrize("name,needles", [
    ("bad_labels", [":4:", "labels outside [0, 768)", "max 768"]),
    ("bad_ids", [":3:", "input_ids outside [0, 768)", "max 5000"]),
])
def test_token_ids_past_the_vocabulary_name_the_row(run_main, inputs, tmp_path, name, needles):
    code, err = run_main(overrides(tmp_path, inputs["hf"], inputs[name]))
    assert_one_error(code, err, inputs[name] + needles[0], *needles[1:])


def test_rows_that_would_train_something_else_are_refused(run_main, inputs, tmp_path):
    """Rows read under another meaning: a token id 1.5 (would be 1), chat rows under type text, a turn the
    template drops (Qwen3's drops a 'human' turn: its answer would be trained without the question); and data
    that yields nothing says why."""
    def jsonl(name, *rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    chat = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]}
    human = {"messages": [{"role": "human", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]}
    cases = [  # (data, type, extra dataset keys, extra overrides, needles)
        (jsonl("float.jsonl", {"input_ids": [5, 1.5, 7]}), "tokenized", "", {},
         [":1:", "'input_ids' must be a list of integers, got 1.5"]),
        (jsonl("chat.jsonl", chat), "text", "", {},
         [":1:", "needs the column 'text'", "set this dataset's type: messages"]),
        (jsonl("human.jsonl", human), "messages", ", chat_template: qwen3", {},
         [":1:", "message 0 (human)", "leaves its content out"]),
        (jsonl("empty.jsonl"), "tokenized", "", {}, ["no documents read", "the files hold no rows"]),
        (jsonl("all_bad.jsonl", {"x": 1}, {"x": 2}), "text", "", {"data.skip_bad_rows": True},
         ["no documents read", "all 2 rows were bad and skipped"]),
    ]
    for k, (data, kind, keys, extra, needles) in enumerate(cases):
        args = overrides(tmp_path / f"run{k}", inputs["hf"], data, kind, **extra)
        args = [a.replace(f"type: {kind}}}]", f"type: {kind}{keys}}}]") for a in args]
        code, err = run_main(args)
        assert_one_error(code, err, *needles)


@pytest.fixture(scope="module")
def orbax_dir(inputs):
    from xorl_jax.checkpoint.orbax import convert_hf_to_orbax

    path = str(inputs["tmp"] / "orbax")
    convert_hf_to_orbax(inputs["hf"], path)
    return path


def test_corrupt_orbax_model_dir(run_main, inputs, orbax_dir, tmp_path):
    """Metadata gone (an interrupted copy): refused by the checks. Data files cut short: refused while the weights
    load, naming the directory (only reading them all finds it)."""
    no_metadata = str(tmp_path / "no_metadata")
    shutil.copytree(orbax_dir, no_metadata)
    [removed] = [os.path.join(d, f) for d, _, fs in os.walk(no_metadata) for f in fs if f == "_METADATA"]
    os.remove(removed)
    code, err = run_main(overrides(tmp_path / "a", no_metadata, inputs["tokenized"]))
    assert_one_error(code, err, no_metadata, "_METADATA is missing")

    truncated = str(tmp_path / "truncated")
    shutil.copytree(orbax_dir, truncated)
    data = [os.path.join(d, f) for d, _, fs in os.walk(truncated) for f in fs if os.path.basename(d) == "d"]
    for f in data:
        os.truncate(f, 10)
    code, err = run_main(overrides(tmp_path / "b", truncated, inputs["tokenized"]))
    assert_one_error(code, err, truncated, "corrupt", before_model=False)
