"""Checkpoint conversion: HF -> Orbax -> HF bit-identical for all four families and both expert layouts,
transformers reloads the export with identical logits, sharded conversion onto a 2x4 mesh, clear errors, atomicity;
checkpoints written by the trainer itself (full and LoRA) export to the source bit for bit; a hub multimodal
checkpoint's vision and MTP tensors are carried; the export dtype rule. Journeys through the CLI with real training
steps: tests/integration/test_export_journey.py.
"""

import errno
import json
import os
import signal

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

import xorl_jax
from parity_utils import assert_logits_close, hf_logits, random_ids, randomize_norms
from xorl_jax import convert
from xorl_jax.checkpoint import convert_ops
from xorl_jax.checkpoint import export as ex
from xorl_jax.checkpoint import orbax as ck
from xorl_jax.checkpoint.hf import CheckpointError, SafetensorsReader
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import param_paths

V = 96


def qwen3_dense():
    return Qwen3Config(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=96, tie_word_embeddings=False)


def qwen3_moe():
    return Qwen3MoeConfig(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                          num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2)


def _qwen3_5_kwargs():
    return dict(vocab_size=V, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
                linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                tie_word_embeddings=False)


def qwen3_5_dense():
    return Qwen3_5TextConfig(intermediate_size=64, **_qwen3_5_kwargs())


def qwen3_5_moe():
    return Qwen3_5MoeTextConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, **_qwen3_5_kwargs())


FAMILIES = {"qwen3": qwen3_dense, "qwen3_moe": qwen3_moe, "qwen3_5": qwen3_5_dense, "qwen3_5_moe": qwen3_5_moe}


def make_hf(tmp_path, family, layout="per_expert", dtype=torch.bfloat16, seed=0):
    """A tiny random HF checkpoint dir; MoE in the hub per-expert layout (save_pretrained) or the fused one."""
    torch.manual_seed(seed)
    model = randomize_norms(AutoModelForCausalLM.from_config(FAMILIES[family]()).eval(), seed).to(dtype)
    path = tmp_path / f"{family}_{layout}"
    if layout == "per_expert":
        model.save_pretrained(path)
    else:
        path.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return model, str(path)


def assert_same_tensors(a_dir, b_dir):
    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    for k in sorted(a.keys()):
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), f"{k} differs"


CASES = [("qwen3", "per_expert"), ("qwen3_moe", "per_expert"), ("qwen3_moe", "fused"), ("qwen3_5", "per_expert"),
         ("qwen3_5_moe", "per_expert"), ("qwen3_5_moe", "fused")]


def _no_whole_restore(*a, **k):
    raise AssertionError("to-hf restored the whole model instead of reading it layer by layer")


@pytest.mark.parametrize("family,layout", CASES)
def test_round_trip_bit_identical_and_transformers_logits(tmp_path, family, layout, monkeypatch):
    monkeypatch.setattr(ck, "load_params", _no_whole_restore)  # to-hf must stream (the converter never restores)
    hf, src = make_hf(tmp_path, family, layout)
    if family.endswith("moe"):
        keys = SafetensorsReader(src).keys()
        assert any(".experts.0." in k for k in keys) == (layout == "per_expert")
    orb, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    small_parts = family == "qwen3"  # several Orbax saves, stacked params split into runs of layers
    meta = ck.convert_hf_to_orbax(src, orb, **({"part_bytes": 20_000} if small_parts else {}))
    assert meta["dtype"] == "bfloat16" and meta["source_dtype"] == "bfloat16"
    if family.endswith("moe"):
        assert meta["expert_layout"] == layout
    parts = json.load(open(os.path.join(orb, "params", "parts.json")))["parts"]
    if small_parts:
        assert len(parts) > 3 and any(p.get("layers") for p in parts)
    assert os.path.exists(os.path.join(orb, "tokenizer_config.json"))
    ex.convert_checkpoint_to_hf(orb, back)  # defaults: the source's dtype and layout
    assert_same_tensors(src, back)
    assert os.path.exists(os.path.join(back, "tokenizer_config.json"))
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ids = random_ids(V, (2, 9))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(original, ids))


def test_other_expert_layout_and_dtype(tmp_path):
    hf, src = make_hf(tmp_path, "qwen3_moe", "per_expert", dtype=torch.float32)
    orb = str(tmp_path / "orbax")
    assert convert.main(["to-orbax", "--model-path", src, "--output", orb, "--dtype", "bfloat16", "--no-mesh"]) == 0
    fused, pe = str(tmp_path / "fused"), str(tmp_path / "pe")
    assert convert.main(["to-hf", "--checkpoint", orb, "--output", fused, "--expert-layout", "fused",
                         "--dtype", "float32", "--max-shard-gb", "0.0002"]) == 0
    assert os.path.exists(os.path.join(fused, "model.safetensors.index.json"))  # 200 kB shards: several
    keys = SafetensorsReader(fused).keys()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys) and not any(".experts.0." in k for k in keys)
    assert SafetensorsReader(fused).dtype("lm_head.weight") == np.float32
    assert json.load(open(os.path.join(fused, "config.json")))["dtype"] == "float32"
    # fused fp32 -> orbax -> per-expert: the same values as the bf16-rounded source
    orb2 = str(tmp_path / "orbax2")
    ck.convert_hf_to_orbax(fused, orb2)
    ex.convert_checkpoint_to_hf(orb2, pe, expert_layout="per_expert", dtype="bfloat16")
    ref, got = SafetensorsReader(src), SafetensorsReader(pe)
    assert ref.keys() == got.keys()
    for k in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        want = ref.get(k).astype(ml_dtypes.bfloat16)
        assert got.dtype(k) == want.dtype and got.get(k).tobytes() == want.tobytes(), k


def test_load_model_from_hf_and_orbax_agree(tmp_path):
    _, src = make_hf(tmp_path, "qwen3_moe", "fused", dtype=torch.float32)
    orb = str(tmp_path / "orbax")
    ck.convert_hf_to_orbax(src, orb, part_bytes=30_000)
    opts = ModelOptions()
    a, b = ck.load_model(src, opts), ck.load_model(orb, opts)
    ids = random_ids(V, (1, 7))
    np.testing.assert_array_equal(np.asarray(a(ids).logits), np.asarray(b(ids).logits))
    assert ck.is_orbax_model_dir(orb) and not ck.is_orbax_model_dir(src)


AXIS_RULES = {"vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
              "expert": "tensor"}


def test_sharded_conversion_onto_2x4_mesh(tmp_path):
    _, src = make_hf(tmp_path, "qwen3_moe", "per_expert", dtype=torch.float32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    orb = str(tmp_path / "orbax")
    model = ck.load_model(src, ModelOptions())  # unsharded reference, built on the fly
    shardings = ck.logical_shardings(model, mesh, AXIS_RULES)
    assert any(s.spec != PartitionSpec(*(None,) * len(s.spec)) for s in shardings.values())
    sharded = ck.load_model(src, ModelOptions(), shardings=shardings)
    ck.convert_hf_to_orbax(src, orb, shardings=shardings)
    restored = ck._flat(ck.load_params(orb, nnx.state(model, nnx.Param), shardings))
    ref = {p: np.asarray(v[...]) for p, v in param_paths(model).items()}
    for path, var in param_paths(sharded).items():
        for arr in (var[...], restored[path]):
            assert isinstance(arr.sharding, NamedSharding) and arr.sharding.spec == shardings[path].spec, path
            assert arr.sharding.mesh.shape == mesh.shape
            np.testing.assert_array_equal(np.asarray(arr), ref[path])
    # the project's rules table (parallel/rules.py) on a 2x4 mesh from the trainer's mesh builder
    from xorl_jax.parallel.mesh import build_mesh

    mesh2 = build_mesh(None, data_parallel_shard_size=2, tensor_parallel_size=4)
    on_mesh = ck.load_model(src, ModelOptions(), mesh=mesh2)
    rule_sh = ck.param_shardings_for(model, mesh2, None)
    for path, var in param_paths(on_mesh).items():
        assert var[...].sharding.spec == rule_sh[path].spec, path
    assert rule_sh[("embed_tokens",)].spec == PartitionSpec("tensor", "fsdp")
    # the CLI with mesh options (2-way FSDP x 4-way tensor over the 8 devices) writes the same values
    cli_out = str(tmp_path / "cli")
    assert convert.main(["to-orbax", "--model-path", src, "--output", cli_out, "--data-parallel-shard-size", "2",
                         "--tensor-parallel-size", "4"]) == 0
    again = ck._flat(ck.load_params(cli_out, nnx.state(model, nnx.Param)))
    for path, arr in again.items():
        np.testing.assert_array_equal(np.asarray(arr), ref[path])
    assert shardings[("layers", "groups", 1, "mlp", "gate_up_proj")].spec == PartitionSpec(
        None, "tensor", "fsdp", None, None)
    # 2 KV heads cannot be split 4 ways: that dimension is replicated instead of failing
    assert shardings[("layers", "groups", 0, "self_attn", "k_proj")].spec == PartitionSpec(None, "fsdp", None, None)


def _run_cli(argv, capsys):
    code = convert.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    out = str(tmp_path / "out")
    capsys.readouterr()
    # output inside the input
    code, err = _run_cli(["to-orbax", "--model-path", src, "--output", os.path.join(src, "o"), "--no-mesh"], capsys)
    assert code == 2 and "inside the input" in err and "\n" not in err
    # non-empty output without --overwrite
    os.makedirs(out)
    open(os.path.join(out, "x"), "w").close()
    code, err = _run_cli(["to-orbax", "--model-path", src, "--output", out, "--no-mesh"], capsys)
    assert code == 2 and "--overwrite" in err
    assert convert.main(["to-orbax", "--model-path", src, "--output", out, "--no-mesh", "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(out, "x")) and ck.is_orbax_model_dir(out)
    capsys.readouterr()
    # unsupported dtype
    code, err = _run_cli(["to-orbax", "--model-path", src, "--output", str(tmp_path / "o2"), "--dtype", "int4x",
                          "--no-mesh"], capsys)
    assert code == 2 and "dtype" in err
    # not a checkpoint
    code, err = _run_cli(["to-hf", "--checkpoint", src, "--output", str(tmp_path / "o3")], capsys)
    assert code == 2 and "not an xorl_jax checkpoint" in err


def _copy_hf(src, dst, edit_tensors=None, edit_config=None):
    import shutil

    shutil.copytree(src, dst)
    if edit_tensors:
        r = SafetensorsReader(dst)
        tensors = edit_tensors({k: np.array(r.get(k)) for k in r.keys()})
        from xorl_jax.checkpoint.hf import write_safetensors

        write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    if edit_config:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        edit_config(cfg)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_bad_checkpoints_name_the_culprit(tmp_path):
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    out = str(tmp_path / "out")
    unknown = _copy_hf(src, str(tmp_path / "unknown"), edit_tensors=lambda t: {**t, "model.foo.weight": np.zeros(2)})
    with pytest.raises(CheckpointError, match=r"does not know.*model\.foo\.weight"):
        ck.convert_hf_to_orbax(unknown, out)
    missing = _copy_hf(src, str(tmp_path / "missing"),
                       edit_tensors=lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj"):
        ck.convert_hf_to_orbax(missing, out)
    shape = _copy_hf(src, str(tmp_path / "shape"), edit_config=lambda c: c.update(intermediate_size=80))
    with pytest.raises(CheckpointError, match="config.json"):
        ck.convert_hf_to_orbax(shape, out)
    assert not os.path.exists(out)
    sharded = str(tmp_path / "sharded")
    os.makedirs(sharded)
    json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}},
              open(os.path.join(sharded, "model.safetensors.index.json"), "w"))
    json.dump(json.load(open(os.path.join(src, "config.json"))), open(os.path.join(sharded, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors .* missing"):
        ck.convert_hf_to_orbax(sharded, out)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    json.dump(json.load(open(os.path.join(src, "config.json"))), open(os.path.join(empty, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        ck.convert_hf_to_orbax(empty, out)
    assert [n for n in os.listdir(tmp_path) if "incomplete" in n] == []


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    out = str(tmp_path / "out")
    real, calls = convert_ops.make_array, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(convert_ops, "make_array", flaky)
    with pytest.raises(KeyboardInterrupt):
        ck.convert_hf_to_orbax(src, out, part_bytes=1)
    assert not os.path.exists(out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []
    monkeypatch.setattr(convert_ops, "make_array", real)
    ck.convert_hf_to_orbax(src, out)
    # an existing good output survives a failed --overwrite run
    monkeypatch.setattr(convert_ops, "make_array", flaky)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        ck.convert_hf_to_orbax(src, out, overwrite=True, part_bytes=1)
    assert ck.is_orbax_model_dir(out) and ck.read_metadata(out)["family"] == "Qwen3ForCausalLM"


def tokenized_rows(path, n=8, length=40, seed=0):
    """A few pre-tokenized rows (ids below the tiny vocabulary): training data that needs no tokenizer."""
    rng = np.random.RandomState(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ids = rng.randint(0, V, length).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    return str(path)


def trainer_checkpoint(tmp_path, src, *extra):
    """The trainer's own checkpoint of step 0 (its weights = the source's): `Trainer.save`, as a run writes it."""
    from xorl_jax.config import load_config
    from xorl_jax.trainer import Trainer

    rows = tokenized_rows(tmp_path / "rows.jsonl")
    cfg = load_config(None, [f"--model.model_path={src}", f"--data.datasets=[{{path: {rows}, type: tokenized}}]",
                             "--data.sample_packing_sequence_len=128", "--data.long_sequence_policy=truncate",
                             f"--train.output_dir={tmp_path / 'run'}", "--train.max_steps=1",
                             "--train.save_async=false", *extra])
    trainer = Trainer(cfg)
    trainer.save(0)
    trainer.checkpointer.wait()
    return str(tmp_path / "run" / "checkpoints" / "0")


LORA = ("--lora.enable_lora=true", "--lora.lora_rank=4", "--lora.lora_target_modules=[q_proj, in_proj_qkv, gate_proj]")


@pytest.mark.parametrize("family,layout,lora", [("qwen3_moe", "per_expert", False), ("qwen3_5_moe", "fused", False),
                                                ("qwen3_5", "per_expert", True)])
def test_trainer_checkpoint_exports_the_source_bit_for_bit(tmp_path, family, layout, lora):
    """A checkpoint written by the trainer (fp32 params of a bf16 source; LoRA: adapters only, B = 0) -> to-hf gives
    back the source's tensors exactly, in its layout and dtype; from_pretrained reads the checkpoint as the source."""
    _, src = make_hf(tmp_path, family, layout)
    step = trainer_checkpoint(tmp_path, src, *(LORA if lora else ()))
    assert ck.is_orbax_model_dir(step) and ck.read_metadata(step)["source"]["path"] == src
    out = str(tmp_path / "exported")
    with pytest.MonkeyPatch.context() as mp:
        if not lora:
            mp.setattr(ck, "load_params", _no_whole_restore)  # the trainer's layout is read layer by layer
        assert convert.main(["to-hf", "--checkpoint", step, "--output", out]) == 0
    assert_same_tensors(src, out)
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    got, want = param_paths(xorl_jax.from_pretrained(step)), param_paths(xorl_jax.from_pretrained(src))
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(want[path][...]))
    if family == "qwen3_5_moe":  # an Orbax layout the layer reader does not know: restored whole, same tensors
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ck, "_stored_arrays", lambda d: (_ for _ in ()).throw(KeyError("tree_metadata")))
            ex.convert_checkpoint_to_hf(step, str(tmp_path / "whole"))
        assert_same_tensors(src, str(tmp_path / "whole"))


def test_damaged_or_wrong_checkpoints_are_one_line_errors(tmp_path, capsys):
    import shutil

    _, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    step = trainer_checkpoint(tmp_path, src)
    out = str(tmp_path / "out")
    no_meta, truncated = str(tmp_path / "no_meta"), str(tmp_path / "truncated")
    shutil.copytree(step, no_meta)
    os.remove(os.path.join(no_meta, "params", "_METADATA"))
    shutil.copytree(step, truncated)
    for root, _, files in os.walk(os.path.join(truncated, "params")):
        for name in files:
            if not name.startswith("_") and not name.endswith(".txt"):
                os.truncate(os.path.join(root, name), 10)
    capsys.readouterr()
    for checkpoint, message in [(no_meta, "_METADATA is missing"), (truncated, "incomplete or corrupt"),
                                (str(tmp_path / "nowhere"), "no such directory"),
                                (str(tmp_path / "run"), "holds training steps 0; pass one step directory"),
                                (src, "looks like an HF directory")]:
        code, err = _run_cli(["to-hf", "--checkpoint", checkpoint, "--output", out], capsys)
        assert code == 2 and message in err and "\n" not in err, err
    for model_path in (no_meta, truncated):  # as a run's model_path, or in from_pretrained
        with pytest.raises(CheckpointError, match="incomplete"):
            ck.load_model(model_path, ModelOptions())
    # the output may not hold the input (--overwrite would delete it)
    code, err = _run_cli(["to-hf", "--checkpoint", step, "--output", str(tmp_path / "run"), "--overwrite"], capsys)
    assert code == 2 and "holds the input" in err and os.path.isdir(step)
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if "incomplete" in n]


def _vl_checkpoint(tmp_path, dtype=torch.bfloat16):
    """A Qwen3.5-MoE checkpoint in the hub's multimodal layout (transformers' own ...ForConditionalGeneration with
    a tiny vision tower), sharded with an index, plus MTP tensors in a shard of their own as on the hub."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    text = qwen3_5_moe().to_dict()
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 1, 1])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, patch_size=4,
                  num_position_embeddings=16, spatial_merge_size=2, temporal_patch_size=2)
    hf = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision,
                                                              tie_word_embeddings=False)).to(dtype).eval()
    path = tmp_path / "vl"
    hf.save_pretrained(path, max_shard_size="100KB")
    mtp = {"mtp.fc.weight": torch.randn(48, 96).to(dtype), "mtp.norm.weight": torch.ones(48).to(dtype),
           "mtp.layers.0.self_attn.q_proj.weight": torch.randn(128, 48).to(dtype)}
    save_file(mtp, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.load(open(path / "model.safetensors.index.json"))
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    json.dump(index, open(path / "model.safetensors.index.json", "w"))
    return hf, str(path)


def test_multimodal_source_round_trip_carries_vision_and_mtp(tmp_path, capsys):
    """to-orbax keeps a record of the tensors it does not convert; to-hf copies them back from the source byte for
    byte (an index, like the source); without the source it refuses, and --text-only writes the language model
    alone as the text model, which transformers loads completely."""
    import shutil

    hf, src = _vl_checkpoint(tmp_path)
    orb, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    meta = ck.convert_hf_to_orbax(src, orb)
    untrained = sorted(k for k in SafetensorsReader(src).keys() if k.startswith(("model.visual.", "mtp.")))
    assert meta["source"]["carried"] == untrained and len(untrained) > 20 and meta["source"]["sharded"]
    ex.convert_checkpoint_to_hf(orb, back)
    assert_same_tensors(src, back)
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
    moved = src + "-moved"
    os.rename(src, moved)
    try:
        capsys.readouterr()
        code, err = _run_cli(["to-hf", "--checkpoint", orb, "--output", str(tmp_path / "lost")], capsys)
        assert code == 2 and f"{len(untrained)} tensors the run did not train" in err and "--text-only" in err, err
        assert not os.path.exists(tmp_path / "lost")
        text_only = str(tmp_path / "text_only")
        assert convert.main(["to-hf", "--checkpoint", orb, "--output", text_only, "--text-only"]) == 0
    finally:
        os.rename(moved, src)
    keys = SafetensorsReader(text_only).keys()
    assert not any(k.startswith(("mtp.", "model.visual.", "model.language_model.")) for k in keys)
    config = json.load(open(os.path.join(text_only, "config.json")))
    assert config["model_type"] == "qwen3_5_moe_text" and config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    text_model, info = AutoModelForCausalLM.from_pretrained(text_only, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and type(text_model).__name__ == "Qwen3_5MoeForCausalLM"
    ids = random_ids(V, (1, 9))
    assert_logits_close(hf_logits(text_model.eval(), ids), hf_logits(hf.float(), ids))  # (its rope is 3-D)
    shutil.rmtree(text_only)


def test_export_dtype_rule(tmp_path):
    """Trained tensors take each source tensor's own dtype (a float32 tensor in a bf16 checkpoint stays float32);
    a run from scratch writes model.dtype; `dtype` overrides the trained tensors only."""
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.bfloat16)
    mixed = _copy_hf(src, str(tmp_path / "mixed"), edit_tensors=lambda t: {
        k: (v.astype(np.float32) if k.endswith("norm.weight") else v) for k, v in t.items()})
    model = ck.load_model(mixed, ModelOptions())
    out = str(tmp_path / "out")
    ex.export_hf(model, out, source_dir_or_metadata=mixed)
    got = SafetensorsReader(out)
    assert got.dtype("model.norm.weight") == np.float32 and got.dtype("lm_head.weight") == ml_dtypes.bfloat16
    assert_same_tensors(mixed, out)
    hf_config = json.load(open(os.path.join(src, "config.json")))
    scratch = ck.run_source(None, hf_config=hf_config, init_from="scratch", dtype="float32")
    ex.export_hf(model, out, source_dir_or_metadata={"hf_config": hf_config, "source": scratch}, overwrite=True)
    assert {SafetensorsReader(out).dtype(k) for k in SafetensorsReader(out).keys()} == {np.dtype(np.float32)}
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"
    ex.export_hf(model, out, source_dir_or_metadata=mixed, dtype="float16", overwrite=True)
    assert {SafetensorsReader(out).dtype(k) for k in SafetensorsReader(out).keys()} == {np.dtype(np.float16)}


def test_quantized_source_is_refused(tmp_path, capsys):
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    quantized = _copy_hf(src, str(tmp_path / "int8"), edit_tensors=lambda t: {
        k: (v.astype(np.int8) if k.endswith("q_proj.weight") else v) for k, v in t.items()})
    capsys.readouterr()
    code, err = _run_cli(["to-orbax", "--model-path", quantized, "--output", str(tmp_path / "o"), "--no-mesh"], capsys)
    assert code == 2 and "q_proj.weight" in err and "\n" not in err, err


def test_to_hf_reports_a_checkpoint_that_does_not_match_its_config(tmp_path):
    hf, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    orb = str(tmp_path / "orbax")
    ck.convert_hf_to_orbax(src, orb)
    cfg_path = os.path.join(orb, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="do not match"):
        ex.convert_checkpoint_to_hf(orb, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_help_is_fast_and_lazy():
    import subprocess
    import sys

    code = "import sys, xorl_jax.convert as c\ntry:\n    c.main(['--help'])\nexcept SystemExit: pass\n" \
           "print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_to_orbax_peak_memory_is_bounded(tmp_path):
    """A ~200 MB synthetic checkpoint converted with 16 MB parts: the process's peak resident memory above its
    baseline stays under the largest HF tensor + 4 parts + 100 MB of working room, far below the checkpoint's size
    (holding the model at once would take >= 200 MB more)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_convert", os.path.join(os.path.dirname(__file__), "..",
                                                                               "benchmarks", "bench_convert.py"))
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    cfg = bc.synthetic_config(0.2, hidden=512, inter=1536, vocab=8192, heads=8, kv_heads=2, head_dim=64)
    src = str(tmp_path / "hf")
    total = bc.write_synthetic(src, cfg, max_shard_bytes=50 * 10**6)
    assert total > 180e6
    part = 16 * 2**20
    r = bc.run_child("to-orbax", src, str(tmp_path / "orb"), "", str(part))
    largest_hf = max(int(np.prod(s)) * 2 for _, s in bc.hf_shapes(cfg))
    delta = r["peak_rss"] - r["base_rss"]
    print(f"peak delta {delta / 2**20:.0f} MiB, checkpoint {total / 2**20:.0f} MiB")
    assert delta < largest_hf + 4 * part + 100 * 2**20 < total, (delta / 2**20, total / 2**20)


def test_bf16_checkpoint_loads_as_fp32_params(tmp_path):
    """The trainer keeps fp32 params: an Orbax dir stored in bf16 is cast on restore, equal to the HF path."""
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.bfloat16)
    orb = str(tmp_path / "orbax")
    ck.convert_hf_to_orbax(src, orb)
    from_orbax, from_hf = param_paths(ck.load_model(orb, ModelOptions())), param_paths(ck.load_model(src, ModelOptions()))
    for path, var in from_orbax.items():
        assert var[...].dtype == np.float32, path
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(from_hf[path][...]))


def test_cli_names_its_flags_and_stops_cleanly_on_ctrl_c_or_a_full_disk(tmp_path, capsys, monkeypatch):
    """The shared loaders and mesh name config keys; the CLI's line names its own flags. Ctrl-C is one line (exit
    130) and a full disk one error line (exit 2), each leaving neither the output nor a temporary sibling."""
    _, src = make_hf(tmp_path, "qwen3", dtype=torch.float32)
    out = str(tmp_path / "out")
    capsys.readouterr()
    code, err = _run_cli(["to-orbax", "--model-path", src, "--output", out, "--expert-parallel-size", "3"], capsys)
    assert code == 2 and "--expert-parallel-size 3 must divide --data-parallel-shard-size" in err, err
    assert "train." not in err and "\n" not in err, err
    os.makedirs(tmp_path / "no_config")
    code, err = _run_cli(["to-orbax", "--model-path", str(tmp_path / "no_config"), "--output", out], capsys)
    assert code == 2 and "set --model-path to" in err and "model.model_path" not in err, err

    real, calls = convert_ops.make_array, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(convert_ops, "make_array", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    code, err = _run_cli(["to-orbax", "--model-path", src, "--output", out, "--no-mesh"], capsys)
    assert code == 130 and err == f"stopped: interrupted (Ctrl-C); {out} is not written, the unfinished conversion " \
                                  "was removed", err
    assert signal.getsignal(signal.SIGINT) is handler  # main() leaves the caller's handler in place

    def full_disk(*a, **k):  # how tensorstore reports a full disk through Orbax
        raise ValueError("OUT_OF_RANGE: Error writing local file: Failed to write 64823 bytes to file 4: "
                         f"{os.strerror(errno.ENOSPC)} [os_error_code='28']")

    monkeypatch.setattr(convert_ops, "make_array", full_disk)
    code, err = _run_cli(["to-orbax", "--model-path", src, "--output", out, "--no-mesh"], capsys)
    assert code == 2 and err.startswith(f"error: {os.strerror(errno.ENOSPC)} while writing the conversion to {out}")
    assert "--output" in err and "\n" not in err, err
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out") or n == "out"] == []
    assert [n for n in os.listdir(tmp_path) if "incomplete" in n] == []
