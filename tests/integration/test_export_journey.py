"""A user fine-tunes a checkpoint with the CLI and takes the weights out: `python -m xorl_jax.train` for one step on
checkpoints made with transformers' own classes, then `python -m xorl_jax.convert to-hf` on the step directory the
trainer wrote, beside the run's own end-of-run export (`train.save_hf_weights`). Both are drop-in replacements of
the source: transformers loads them completely, with the logits of the trained model; a hub-layout Qwen3.5-MoE
(`...ForConditionalGeneration` with a vision tower and MTP tensors) keeps its vision and MTP tensors byte for byte
and its dtype. Journeys: a Qwen3 trained from its `to-orbax` conversion (train.init_from: orbax), a Qwen3-MoE in
the fused expert layout with LoRA on attention and routed experts (merged), the multimodal Qwen3.5-MoE in the hub's
per-expert layout, sharded with an index. The three runs train at once (each mostly on one core)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, Qwen3Config,
                          Qwen3MoeConfig)

import xorl_jax
from parity_utils import assert_logits_close, hf_logits, random_ids
from xorl_jax.checkpoint.hf import SafetensorsReader
from xorl_jax.data.demo import DEMO_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 768  # the demo tokenizer's vocabulary
UNTRAINED = ("model.visual.", "mtp.")


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _qwen3(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, tie_word_embeddings=False))
    model.save_pretrained(path)  # float32: the export stays float32


def _qwen3_moe_fused(path):
    """transformers' own tensors in its fused expert layout (`mlp.experts.gate_up_proj`), as its state_dict has them."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False))
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(path)


def _qwen3_5_moe_hub(path):
    """The hub's multimodal layout: model.language_model.*, a vision tower model.visual.*, MTP tensors mtp.* in a
    shard of their own; bfloat16, sharded with an index, experts per expert (save_pretrained)."""
    torch.manual_seed(2)
    text = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
                linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=2, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1]}, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, patch_size=4,
                  num_position_embeddings=16, spatial_merge_size=2, temporal_patch_size=2)
    model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision,
                                                                 tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")
    mtp = {"mtp.fc.weight": torch.randn(48, 96), "mtp.norm.weight": torch.ones(48),
           "mtp.layers.0.self_attn.q_proj.weight": torch.randn(128, 48)}
    save_file({k: v.to(torch.bfloat16) for k, v in mtp.items()}, os.path.join(path, "model-mtp.safetensors"),
              metadata={"format": "pt"})
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    json.dump(index, open(index_path, "w"))


def _cli(*args, devices=1):
    return subprocess.run([sys.executable, "-m", "xorl_jax.convert", *args], capture_output=True, text=True,
                          timeout=300, env=_env(devices), cwd=ROOT)


RUNS = {
    # name: (source maker, settings, fake devices)
    "qwen3": (_qwen3, ["--train.init_from=orbax"], 2),
    "qwen3_moe_lora": (_qwen3_moe_fused, [
        "--lora.enable_lora=true", "--lora.lora_rank=4", "--lora.lora_alpha=8", "--lora.save_lora_only=false",
        "--lora.lora_target_modules=[q_proj, v_proj]",
        "--lora.lora_target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj]"], 1),
    "qwen3_5_moe_hub": (_qwen3_5_moe_hub, ["--train.lr=1e-2"], 1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (source dir, step directory, the run's export, to-hf of the step)}, each after one training step."""
    root = tmp_path_factory.mktemp("export_journey")
    data = root / "train.jsonl"
    with open(os.path.join(DEMO_DIR, "train.jsonl")) as f:
        data.write_text("".join(f.readline() for _ in range(32)))
    procs, out = {}, {}
    for name, (make, settings, devices) in RUNS.items():
        src = str(root / f"{name}_hf")
        make(src)
        model_path = src
        if "--train.init_from=orbax" in settings:  # the README's optional pre-conversion
            model_path = str(root / f"{name}_orbax")
            done = _cli("to-orbax", "--model-path", src, "--output", model_path, "--no-mesh")
            assert done.returncode == 0, done.stderr[-3000:]
        run_dir = root / f"{name}_run"
        cmd = [sys.executable, "-m", "xorl_jax.train", f"--model.model_path={model_path}",
               f"--model.tokenizer_path={DEMO_DIR}", "--model.dtype=float32",
               f"--data.datasets=[{{path: {data}, type: messages}}]", "--data.sample_packing_sequence_len=128",
               "--data.long_sequence_policy=truncate", f"--train.output_dir={run_dir}", "--train.max_steps=1",
               "--train.save_steps=1", "--train.save_hf_weights=true", "--train.micro_batch_size=1",
               "--train.lr=1e-3", "--train.remat_policy=full", "--model.scan_layers=true", *settings]
        procs[name] = subprocess.Popen(cmd, cwd=root, env=_env(devices), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        out[name] = (src, str(run_dir / "checkpoints" / "1"), str(run_dir / "global_step_1" / "hf_ckpt"),
                     str(root / f"{name}_to_hf"))
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
    conversions = {name: subprocess.Popen([sys.executable, "-m", "xorl_jax.convert", "to-hf", "--checkpoint", step,
                                           "--output", to_hf], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
                   for name, (_, step, _, to_hf) in out.items()}
    for name, proc in conversions.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
    return out


def _differing(a_dir, b_dir, keys=None):
    """The tensors (of `keys`, default all) whose dtype or bytes differ between two HF directories."""
    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    keys = sorted(a.keys()) if keys is None else keys
    return [k for k in keys if not (a.dtype(k) == b.dtype(k) and a.get(k).tobytes() == b.get(k).tobytes())]


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe_lora"])
def test_to_hf_of_the_trainer_checkpoint_is_the_run_export_and_loads_in_transformers(runs, name):
    src, step, export, to_hf = runs[name]
    source, got = SafetensorsReader(src), SafetensorsReader(to_hf)
    assert got.keys() == source.keys() == SafetensorsReader(export).keys()  # the source's layout (fused experts)
    assert _differing(to_hf, export) == []  # convert to-hf writes what the run itself exported
    assert {got.dtype(k) for k in got.keys()} == {np.dtype(np.float32)}  # a float32 source stays float32
    changed = [k for k in source.keys() if got.get(k).tobytes() != source.get(k).tobytes()]
    if name == "qwen3_moe_lora":  # only the adapted weights move: q, v and the routed experts, merged
        assert sorted({k.split(".", 3)[3] for k in changed}) == [
            "mlp.experts.down_proj", "mlp.experts.gate_up_proj", "self_attn.q_proj.weight", "self_attn.v_proj.weight"]
    else:
        assert len(changed) > len(source.keys()) // 2
    assert json.load(open(os.path.join(to_hf, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    carried_files = {"tokenizer.json", "chat_template.jinja"} | ({"generation_config.json"} & set(os.listdir(src)))
    assert carried_files <= set(os.listdir(to_hf)), os.listdir(to_hf)  # the run's tokenizer, the source's files
    hf, info = AutoModelForCausalLM.from_pretrained(to_hf, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = random_ids(V, (2, 11))
    assert_logits_close(xorl_jax.from_pretrained(step)(ids).logits, hf_logits(hf.eval(), ids))


def test_multimodal_hub_checkpoint_export_is_a_drop_in_replacement(runs):
    src, step, export, to_hf = runs["qwen3_5_moe_hub"]
    source = SafetensorsReader(src)
    untrained = sorted(k for k in source.keys() if k.startswith(UNTRAINED))
    text = sorted(source.keys() - set(untrained))
    assert len(untrained) > 20 and any(k.startswith("mtp.") for k in untrained)
    for out in (export, to_hf):
        got = SafetensorsReader(out)
        assert got.keys() == source.keys()
        assert _differing(out, src, untrained) == []  # vision tower and MTP copied byte for byte
        assert {got.dtype(k) for k in got.keys()} == {source.dtype(text[0])} == {np.dtype("bfloat16")}
        assert len(_differing(out, src, text)) > 3 * len(text) // 4  # the language model trained
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # sharded like the source
        assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
        assert {"tokenizer.json", "chat_template.jinja"} <= set(os.listdir(out))
    assert _differing(to_hf, export) == []
    model, info = Qwen3_5MoeForConditionalGeneration.from_pretrained(to_hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info  # no vision weight newly initialised
    assert model.dtype == torch.bfloat16
