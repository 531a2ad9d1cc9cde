"""HF export: a model's weights (or a checkpoint's, read layer by layer) as an HF safetensors directory that
stands in for the checkpoint the run started from (`export_hf`, `convert to-hf`).

Every source tensor the run did not train (vision tower, MTP head) is copied byte for byte from the source
safetensors, trained tensors are written in the source's dtype, sharded with an index when the source was, with
config and tokenizer files carried over. Reading checkpoints and the source records is `checkpoint.orbax`'s job.
"""

from __future__ import annotations

import itertools
import json
import logging
import os

import numpy as np

from xorl_jax.checkpoint import convert_ops as ops
from xorl_jax.checkpoint import orbax as store
from xorl_jax.checkpoint.hf import CheckpointError, SafetensorsReader, write_sharded
from xorl_jax.checkpoint.orbax import (
    StoredArray, _barrier, _broadcast_path, _dtype_named, _flat, _host_sharding, _name, _nest, _np_dtype,
    _metadata_tree, _param_dirs, _param_name, _retyped, _root_for, _unreadable, _write_json, checkpoint_dir,
    hf_config_of, hf_source_record, is_orbax_model_dir, lora_merged_model, read_hf_config, read_metadata, source_of,
)
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import abstract_model, build_config, param_paths

logger = logging.getLogger(__name__)


def host_array(x) -> np.ndarray:
    """The whole of array `x` in host memory; a shard held by another process is gathered (every process must
    call this for such an array)."""
    import jax

    if not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_hf(model, output_dir, *, source_dir_or_metadata, dtype=None, expert_layout=None, overwrite=False,
              max_shard_bytes: int = 5 * 10**9, stored=None, text_only: bool = False) -> str:
    """Write `model`'s weights as an HF safetensors directory that stands in for the checkpoint it came from.

    `source_dir_or_metadata`: the HF, Orbax or training step directory the model came from, or a metadata dict
    (`read_metadata`'s, or {"hf_config": ..., "source": record} with a record from `source_of`/`run_source`;
    {"hf_config", "source_path"} alone: no source weights, tokenizer files from source_path).
    From the source record:
    - every source tensor the key map does not produce (vision tower, MTP head) is copied byte for byte from the
      source safetensors; if they cannot be (the source is gone or changed), CheckpointError, unless `text_only`;
    - each written tensor has the dtype of the same tensor in the source (a run from scratch: the record's dtype,
      model.dtype); `dtype` overrides that for the written tensors (never the copied ones);
    - expert layout and key root as in the source (`expert_layout` overrides the layout); shards with an index
      when the source had one; config.json (the run's), generation, tokenizer and chat template files copied.
    `text_only`: only the language model, in its text-only layout (a multimodal config becomes its text_config),
    nothing copied from the source safetensors.
    `stored`: {path: StoredArray} to read the weights from a checkpoint layer by layer instead of from `model`
    (which then only gives the structure and may be abstract).
    """
    import jax

    hf_config, rec = export_source(source_dir_or_metadata)
    text_only = bool(text_only or rec.get("text_only"))
    layout = expert_layout or rec.get("expert_layout") or "fused"
    if layout not in ("fused", "per_expert"):
        raise CheckpointError(f"expert layout {layout!r} is not one of fused, per_expert (per-expert)")
    src_root = rec.get("root") or _root_for(hf_config)
    root = "model" if text_only else src_root
    cls = type(model)
    keymap = cls.hf_key_map(model.config, expert_layout=layout, root=root)
    sources = ops.plan(model, keymap)
    carried, carry_reader = (), None
    if not text_only:
        carried, carry_reader = _carry_plan(rec, keymap)
    side_dirs = [d for d in rec.get("side_dirs") or () if d]
    ops.check_output(output_dir, [rec.get("path"), rec.get("model_path")], overwrite=overwrite)
    params = stored if stored is not None else {p: v[...] for p, v in param_paths(model).items()}
    override = _np_dtype(dtype) if dtype else None
    default = _dtype_named(rec["dtype"]) if rec.get("dtype") else None
    exceptions = rec.get("dtypes") or {}

    def dtype_of(key):
        if override is not None:
            return override
        if root != src_root and key.startswith(root + "."):
            key = src_root + key[len(root):]
        name = exceptions.get(key)
        return _dtype_named(name) if name else default

    main = jax.process_index() == 0
    tmp = _broadcast_path(ops.temp_dir_for(output_dir) if main else None)

    def fetch(arr, layer):
        if isinstance(arr, StoredArray):
            return arr.read(layer)
        return host_array(arr if layer is None else arr[layer])

    try:
        # from a checkpoint: one parameter's layers after another (each stored chunk decoded once); from device
        # arrays: layer by layer, the usual HF order
        tensors = ops.iter_hf_from_params(params, sources, fetch, dtype_of, parameter_major=stored is not None)
        if main:
            copied = ((k, carry_reader.read(k)) for k in carried)  # the source's bytes, unchanged
            write_sharded(tmp, itertools.chain(tensors, copied), max_shard_bytes=max_shard_bytes,
                          index=bool(rec.get("sharded")))
            config = _export_config(hf_config, model, text_only=text_only,
                                    dtype=(override or (default if not rec.get("path") else None)))
            _write_json(os.path.join(tmp, "config.json"), config)
            if not ops.copy_side_files(side_dirs, tmp) and side_dirs:
                logger.warning("export: no tokenizer or generation files found in %s", ", ".join(side_dirs))
            ops.commit_dir(tmp, output_dir)
        else:
            for _ in tensors:  # every process takes part in the gathers
                pass
        _barrier("export_hf_done")
    except BaseException:
        if main and os.path.isdir(tmp):
            ops.remove_unfinished(tmp)
        raise
    return output_dir


def _carry_plan(rec, keymap):
    """(keys to copy, reader of the source) for the tensors of the source that the run did not train."""
    recorded = rec.get("carried")
    path = rec.get("path")
    if not path or not os.path.isdir(path):
        if recorded:
            raise CheckpointError(
                f"the export must copy {len(recorded)} tensors the run did not train ({_summary(recorded)}) from "
                f"its source checkpoint {path}, which is gone; put it back there, or write the language model alone "
                f"with `convert to-hf --text-only`")
        if recorded is None:
            logger.warning("export: the source checkpoint %s is not known or gone; tensors the run did not train "
                           "(a vision tower, an MTP head) cannot be copied if the source had any", path)
        return (), None
    reader = SafetensorsReader(path)
    if recorded is None:  # a record from before the lists: what loading skipped is what the run did not train
        recorded = sorted(k for k in reader.keys() if keymap.skipped_prefixes and k.startswith(keymap.skipped_prefixes))
    missing = [k for k in recorded if k not in reader]
    if missing:
        raise CheckpointError(f"the source checkpoint {path} changed since the run read it: {len(missing)} tensors "
                              f"the export must copy are gone, e.g. {missing[0]}; restore it, or write the language "
                              f"model alone with `convert to-hf --text-only`")
    return list(recorded), reader


def _summary(keys) -> str:
    groups = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 else parts[0]
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{n} under {g}.*" for g, n in sorted(groups.items()))


def _export_config(hf_config, model, *, text_only: bool, dtype) -> dict:
    """config.json of an export: the run's, with `dtype` (when given) as the weights' dtype; `text_only` turns a
    multimodal config into its text model's (our classes carry transformers' text-model class names)."""
    config = json.loads(json.dumps(hf_config))
    if text_only and isinstance(config.get("text_config"), dict):
        text = config["text_config"]
        text["architectures"] = [type(model).__name__]
        text["tie_word_embeddings"] = bool(model.config.tie_word_embeddings)
        for key in ("dtype", "torch_dtype"):
            if key in config and key not in text:
                text[key] = config[key]
        config = text
    if dtype is not None:
        name = np.dtype(dtype).name
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        if isinstance(config.get("text_config"), dict) and "dtype" in config["text_config"]:
            config["text_config"]["dtype"] = name
    return config


def export_source(src) -> tuple[dict, dict]:
    """(hf_config, source record) from a directory or a metadata dict (see export_hf)."""
    if isinstance(src, dict):
        hf = src.get("hf_config") or {}
        rec = src.get("source")
        if rec is None:  # a bare metadata dict: no source weights to copy
            side = src.get("source_path")
            rec = {"path": None, "root": src.get("root"), "expert_layout": src.get("expert_layout"),
                   "dtype": src.get("dtype"), "dtypes": {}, "carried": [], "sharded": False,
                   "side_dirs": [side] if side else []}
        return hf, rec

    if is_orbax_model_dir(src):
        return hf_config_of(src), source_of(src)
    hf = read_hf_config(src)
    try:
        SafetensorsReader(src)
    except CheckpointError:  # a config-only directory: nothing to copy, files from it
        return hf, {"path": None, "root": None, "expert_layout": None, "dtype": None, "dtypes": {}, "carried": [],
                    "sharded": False, "side_dirs": [os.path.abspath(src)]}
    return hf, hf_source_record(src, hf)


def convert_checkpoint_to_hf(checkpoint, output, *, dtype=None, expert_layout=None, overwrite=False,
                             max_shard_bytes: int = 5 * 10**9, text_only: bool = False) -> str:
    """Orbax model directory or training step directory -> HF safetensors directory standing in for the checkpoint
    the run started from (see `export_hf`: untrained tensors copied from the source, the source's dtypes).

    Weights are read one stacked layer at a time (host memory about one layer's parameter plus one 5 GB output
    shard); a checkpoint whose Orbax layout cannot be read that way is restored whole instead. A LoRA run's
    checkpoint is its base model with the adapters merged (host memory about the model's size)."""
    import jax.numpy as jnp
    from flax import nnx

    checkpoint = checkpoint_dir(checkpoint)
    ops.check_output(output, [checkpoint], overwrite=overwrite)
    meta = read_metadata(checkpoint)
    hf_config = hf_config_of(checkpoint)
    rec = source_of(checkpoint, hf_config)
    lazy = None
    if meta.get("lora"):
        model = lora_merged_model(checkpoint, meta)
    else:
        cls, cfg = build_config(hf_config)
        model = abstract_model(cls, cfg, ModelOptions())
        graphdef, abstract_state = nnx.split(model)
        lazy = _lazy_params(checkpoint, model)
        if lazy is None:
            stored = _stored_dtypes(checkpoint)
            abstract = {p: _retyped(a, jnp.dtype(stored.get(_name(p), a.dtype)))
                        for p, a in _flat(nnx.to_pure_dict(abstract_state)).items()}
            host = _host_sharding()
            params = store.load_params(checkpoint, _nest(abstract), {p: host for p in abstract})
            nnx.replace_by_pure_dict(abstract_state, params)
            model = nnx.merge(graphdef, abstract_state)
    return export_hf(model, output, source_dir_or_metadata={"hf_config": hf_config, "source": rec}, dtype=dtype,
                     expert_layout=expert_layout, overwrite=overwrite, max_shard_bytes=max_shard_bytes, stored=lazy,
                     text_only=text_only)


def _lazy_params(checkpoint, model):
    """{path: StoredArray} for every parameter of the abstract `model`, or None (with a log line) when the stored
    layout cannot be read lazily; a shape that does not match the model is an error either way."""
    try:
        arrays = store._stored_arrays(checkpoint)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - an Orbax layout this reader does not know: restore it whole instead
        logger.info("to-hf: reading %s whole (%s: %s)", checkpoint, type(e).__name__, e)
        return None
    out = {}
    for path, var in param_paths(model).items():
        name = _name(path)
        if name not in arrays:
            raise CheckpointError(f"{checkpoint}: parameter {name} is missing; the checkpoint and config.json "
                                  "do not match")
        if tuple(arrays[name].shape) != tuple(var.shape):
            raise CheckpointError(f"{checkpoint}: {name} is stored as {arrays[name].shape}, the model in config.json "
                                  f"needs {tuple(var.shape)}; the checkpoint and config.json do not match")
        out[path] = arrays[name]
    return out


def _stored_dtypes(checkpoint) -> dict:
    """{param name: dtype name} as stored, read from the Orbax metadata (no array data is read)."""
    out = {}
    try:
        for d, _ in _param_dirs(checkpoint):
            for path, leaf in _flat(_metadata_tree(d)).items():
                if hasattr(leaf, "dtype"):
                    out[_param_name(path)] = np.dtype(leaf.dtype).name
    except Exception as e:  # noqa: BLE001 - no or damaged Orbax metadata
        raise _unreadable(checkpoint, e) from None
    return out
