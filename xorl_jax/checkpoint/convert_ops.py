"""Streaming HF <-> xorl_jax tensor conversion, one parameter at a time, built on the family key maps.

Every HF load (the trainer's, `from_pretrained`'s and `convert to-orbax`'s, through `orbax.load_model` /
`orbax._iter_arrays`) builds one parameter (all its layers) at a time, and each device shard of it from only the
layers and slices that shard owns, so host memory stays near one parameter however large the model is. With several processes, each host reads only the layers its
devices hold.

Also: the plan of which HF tensors make which parameter (with the unknown/missing-tensor checks), atomic output
directories, and the copying of config/tokenizer files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid

import numpy as np

from xorl_jax.checkpoint.hf import CheckpointError
from xorl_jax.models.host_copy import contiguous, copy_into

# Files that travel with the weights (tokenizer, chat template, generation defaults).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
)


@dataclasses.dataclass
class ParamSource:
    """Where one of our parameters comes from: per layer (stacked params) or once (globals)."""

    path: tuple
    entries: list  # [(TensorMap, full HF keys)], one per stacked layer, or a single entry for a global
    stacked: bool


def plan(model, keymap) -> dict:
    """{our path: ParamSource} for every parameter the key map fills."""
    sources = {}
    for tm in keymap.globals:
        sources[tm.ours] = ParamSource(tm.ours, [(tm, tuple(tm.hf))], stacked=False)
    stack = model.layers
    p = len(stack.pattern)
    for r in range(stack.repeats):
        for j in range(p):
            i = r * p + j
            prefix = f"{keymap.layer_prefix}.{i}."
            for tm in keymap.layer_maps(i):
                path = ("layers", "groups", j) + tm.ours
                src = sources.setdefault(path, ParamSource(path, [], stacked=True))
                src.entries.append((tm, tuple(prefix + k for k in tm.hf)))
    return sources


def check_keys(sources: dict, available: set, keymap, where: str, family: str) -> None:
    """Fail early (before writing anything) on tensors missing from, or unknown to, the key map."""
    wanted = mapped_keys(sources)
    missing = sorted(wanted - available)
    if missing:
        raise CheckpointError(f"{where}: tensors {missing[:5]} ({len(missing)} in all) that the {family} key map "
                              f"needs are missing; the checkpoint is incomplete or config.json does not match it")
    skipped = keymap.skipped_prefixes or ("\0",)
    extra = sorted(k for k in available - wanted if not k.startswith(skipped))
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} tensors the {family} key map does not know, e.g. {extra[:5]}; "
                              f"is model_type in config.json right?")


def mapped_keys(sources: dict) -> set:
    """Every HF key the plan reads (or writes)."""
    return {k for src in sources.values() for _, keys in src.entries for k in keys}


def _sliced_shape(shape, index) -> tuple:
    return tuple(len(range(n)[s]) for n, s in zip(shape, index))


def _normalize(index, ndim) -> tuple:
    index = tuple(index) if index is not None else ()
    return index + (slice(None),) * (ndim - len(index))


def _mapped(src: ParamSource, shape, name: str, read):
    """(layer or None) -> our-layout value (a numpy view where the map allows) of one entry of `src`."""

    def one(r):
        tm, keys = src.entries[r or 0]
        expect = shape[1:] if src.stacked else shape
        try:
            value = tm.to_ours([read(k) for k in keys])
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{keys[0]}: cannot be mapped to {name} with the shapes config.json implies ({e}); "
                                  f"the weights and config.json do not match") from None
        if tuple(value.shape) != tuple(expect):
            raise CheckpointError(f"{keys[0]} gives shape {tuple(value.shape)} for {name}, expected {tuple(expect)} "
                                  f"from config.json; the weights and config.json do not match")
        return value

    return one


def build_slices(src: ParamSource, shape, dtype, read, name: str, indices) -> list:
    """numpy arrays of several slices (`indices`, one per device) of the parameter, cast to dtype. Each HF tensor
    is read and mapped once for all the slices (layer by layer for stacked parameters), and each distinct slice is
    built once (replicas share it)."""
    dtype = np.dtype(dtype)
    one = _mapped(src, shape, name, read)
    keys = [tuple((s.start, s.stop, s.step) for s in _normalize(i, len(shape))) for i in indices]
    distinct = {k: _normalize(i, len(shape)) for k, i in zip(keys, indices)}
    if not src.stacked:
        value = one(None)
        built = {k: contiguous(value[i], dtype) for k, i in distinct.items()}
    else:
        layers = {k: range(shape[0])[i[0]] for k, i in distinct.items()}
        built = {k: np.empty((len(layers[k]),) + _sliced_shape(shape[1:], i[1:]), dtype) for k, i in distinct.items()}
        for r in sorted({r for rs in layers.values() for r in rs}):
            value = one(r)
            for k, i in distinct.items():
                if r in layers[k]:
                    copy_into(built[k][layers[k].index(r)], value[i[1:]])
    return [built[k] for k in keys]


def make_array(src: ParamSource, shape, dtype, sharding, read, name: str):
    """A jax.Array with `sharding`; this process builds its devices' shards from only the HF data they hold."""
    import jax

    if sharding is None:
        return jax.device_put(build_slices(src, shape, dtype, read, name, [None])[0])
    index_of = sharding.addressable_devices_indices_map(tuple(shape))
    devices = list(index_of)
    pieces = build_slices(src, shape, dtype, read, name, [index_of[d] for d in devices])
    arrays = [jax.device_put(p, d) for p, d in zip(pieces, devices)]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def iter_hf_from_params(params: dict, sources: dict, fetch, dtype=None, *, parameter_major: bool = False):
    """Yield (HF key, numpy array) in checkpoint order: globals, then layer 0, 1, ...

    `params` maps our path -> array (jax or numpy); `fetch(array, layer or None)` returns a numpy copy of the whole
    parameter or of one stacked layer (so a multi-host array can be gathered layer by layer).
    `dtype`: None (keep), one dtype, or a function HF key -> dtype (None keeps).
    `parameter_major`: every layer of one stacked parameter before the next parameter (the safetensors index
    maps each key to its shard, so any order loads the same).
    """
    dtype_of = dtype if callable(dtype) else (lambda key: dtype)
    if parameter_major:
        for path, src in sources.items():
            for r, (tm, keys) in enumerate(src.entries):
                for key, arr in zip(keys, tm.to_hf(fetch(params[path], r if src.stacked else None))):
                    yield key, _cast(arr, dtype_of(key))
        return
    stacked = [src for src in sources.values() if src.stacked]
    period = 1 + max((src.path[2] for src in stacked), default=0)
    by_layer = {}
    for path, src in sources.items():
        if not src.stacked:
            tm, keys = src.entries[0]
            for key, arr in zip(keys, tm.to_hf(fetch(params[path], None))):
                yield key, _cast(arr, dtype_of(key))
        else:
            for r, entry in enumerate(src.entries):
                by_layer.setdefault(r * period + src.path[2], []).append((path, r, entry))
    for layer in sorted(by_layer):
        for path, r, (tm, keys) in by_layer[layer]:
            for key, arr in zip(keys, tm.to_hf(fetch(params[path], r))):
                yield key, _cast(arr, dtype_of(key))


def _cast(arr, dtype):
    arr = np.asarray(arr)
    return arr if dtype is None or arr.dtype == np.dtype(dtype) else arr.astype(dtype)


# ------------------------------------------------------------------------------------------------ directories
def check_output(output: str, inputs, *, overwrite: bool) -> None:
    """Refuse an output that is, holds or sits inside one of `inputs`, or (without `overwrite`) that has content."""
    out = os.path.realpath(output)
    for src in inputs:
        if src is None:
            continue
        s = os.path.realpath(src)
        if out == s or out.startswith(s.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"output {output} is inside the input {src}; choose an output outside it")
        if s.startswith(out.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"output {output} holds the input {src} (--overwrite would delete it); choose "
                                  f"another output")
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise CheckpointError(f"output {output} exists and is a file; choose another path")
        if os.listdir(output) and not overwrite:
            raise CheckpointError(f"output {output} is not empty; pass --overwrite to replace it")


def temp_dir_for(output: str) -> str:
    """A fresh sibling of `output` that a crash leaves clearly unfinished (`.<name>.incomplete-<id>`; the trainer's
    start-up removes such leftovers of its own exports, checkpoint.training.EXPORT_TMP)."""
    parent, name = os.path.split(os.path.abspath(output.rstrip(os.sep)))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.incomplete-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    return tmp


def remove_unfinished(tmp: str, attempts: int = 20) -> None:
    """Remove a failed output's temporary directory for good: after an error or Ctrl-C, writer threads (Orbax's,
    tensorstore's) can still create a file or directory in it for a moment, so remove until it stays gone."""
    for _ in range(attempts):
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.05)
        if not os.path.exists(tmp):
            return


def commit_dir(tmp: str, output: str) -> None:
    """Replace `output` by the finished `tmp` (rename; an old output is moved aside first, then removed)."""
    output = os.path.abspath(output.rstrip(os.sep))
    old = None
    if os.path.exists(output):
        old = tmp + ".old"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_side_files(src_dirs, dst_dir: str) -> list:
    """Copy the tokenizer, chat template and generation files into `dst_dir`, each from the first of `src_dirs`
    (one directory or a list, in order of precedence) that has it."""
    if isinstance(src_dirs, str) or src_dirs is None:
        src_dirs = [src_dirs]
    copied = []
    for name in SIDE_FILES:
        for src_dir in src_dirs:
            p = os.path.join(src_dir, name) if src_dir else None
            if p and os.path.isfile(p):
                shutil.copy2(p, os.path.join(dst_dir, name))
                copied.append(name)
                break
    return copied
