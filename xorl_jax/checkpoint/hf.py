"""Hugging Face safetensors checkpoints: a memory-mapped reader and an atomic, sharded writer.

The format (8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then raw
little-endian bytes) is read with numpy memory maps, so a tensor (or a slice of one) is paged in only when used and
bf16/fp8 work through ml_dtypes, which numpy alone lacks.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from xorl_jax.errors import CheckpointError  # noqa: F401 - where the checkpoint code and its callers import it from

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})  # what may be loaded as weights

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _read_header(path: str):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short); re-download or re-export it")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download or re-export it") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = _read_header(path)
        self._mmap = None

    def _buffer(self):
        if self._mmap is None:
            size = os.path.getsize(self.path)
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=0, shape=(size,))
        return self._mmap

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def dtype(self, key):
        name = self.header[key]["dtype"]
        if name not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _DTYPES[name]

    def get(self, key) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until used)."""
        info = self.header[key]
        begin, end = info["data_offsets"]
        raw = self._buffer()[self.data_start + begin : self.data_start + end]
        return raw.view(self.dtype(key)).reshape(info["shape"])


class SafetensorsReader:
    """All tensors of a HF checkpoint directory: `model.safetensors` or shards listed in the index."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_NAME)
        single = os.path.join(directory, SINGLE_NAME)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map'; re-download or re-export the checkpoint")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = [SINGLE_NAME], None
        else:
            found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")) if os.path.isdir(directory) else []
            if len(found) == 1:
                files, weight_map = found, None
            else:
                what = f"{len(found)} .safetensors files but no {INDEX_NAME}" if found else "no .safetensors weights"
                raise CheckpointError(f"{directory}: {what}; point model_path at a HF checkpoint directory")
        self.files = {}
        for name in files:
            p = os.path.join(directory, name)
            if not os.path.exists(p):
                raise CheckpointError(f"{directory}: shard {name} listed in {INDEX_NAME} is missing; re-download it")
            self.files[name] = SafetensorsFile(p)
        self._where = {}
        for name, f in self.files.items():
            for key in f.header:
                self._where[key] = f
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._where]
            if missing:
                raise CheckpointError(
                    f"{directory}: tensors listed in {INDEX_NAME} are missing from their shards: {missing[:5]}"
                )

    def keys(self) -> set:
        return set(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key):
        return self._where[key].shape(key)

    def dtype(self, key):
        return self._where[key].dtype(key)

    def check_float(self, skip_prefixes=()) -> None:
        """Refuse integer or bool tensors (quantized or mislabelled weights): loading casts every tensor to the
        parameter dtype, which would silently turn them into other numbers. `skip_prefixes`: tensors not loaded."""
        skip = tuple(skip_prefixes or ())
        bad = sorted(k for k, f in self._where.items()
                     if f.header[k].get("dtype") not in FLOAT_DTYPES and not (skip and k.startswith(skip)))
        if bad:
            f = self._where[bad[0]]
            raise CheckpointError(
                f"{f.path}: tensor {bad[0]!r} has dtype {f.header[bad[0]].get('dtype')}"
                + (f" ({len(bad)} non-float tensors)" if len(bad) > 1 else "")
                + "; weights must be floating point (F32, BF16, F16, F64, F8): quantized or integer checkpoints "
                  "are not supported, use the unquantized model")

    def get(self, key) -> np.ndarray:
        if key not in self._where:
            raise CheckpointError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        return self._where[key].get(key)

    def read(self, key) -> np.ndarray:
        """The tensor copied into fresh memory by a plain file read (no memory map stays resident afterwards).

        Streaming converters use this so that the pages of every tensor already converted do not count against
        the process's resident memory, as the pages of a long-lived memory map would.
        """
        if key not in self._where:
            raise CheckpointError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        f = self._where[key]
        info = f.header[key]
        begin, end = info["data_offsets"]
        dtype = f.dtype(key)
        count = (end - begin) // dtype.itemsize
        arr = np.fromfile(f.path, dtype=dtype, count=count, offset=f.data_start + begin)
        if arr.size != count:
            raise CheckpointError(f"{f.path}: tensor {key!r} is truncated; re-download or re-export the checkpoint")
        return arr.reshape(info["shape"])


def _header_for(tensors: dict):
    header, offset = {}, 0
    for key, arr in tensors.items():
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"tensor {key!r}: dtype {arr.dtype} cannot be written to safetensors")
        n = arr.nbytes
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    return header


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write one safetensors file (to a temporary name first, then rename: never a half-written file)."""
    header = _header_for(tensors)
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def write_sharded(directory: str, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int = 5 * 10**9,
                  metadata: dict | None = None, index: bool = False) -> list[str]:
    """Stream (key, array) pairs into ~max_shard_bytes shards plus model.safetensors.index.json.

    One shard is written as model.safetensors without an index unless `index` (then model-00001-of-00001 and an
    index, as transformers writes a sharded checkpoint). Tensors are held only until their shard is written, so
    peak memory is about one shard.
    """
    shards, current, current_bytes, total = [], {}, 0, 0
    weight_map = {}

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            write_safetensors(os.path.join(directory, name), current, metadata={"format": "pt", **(metadata or {})})
            shards.append((name, list(current)))
            current, current_bytes = {}, 0

    for key, arr in tensors:
        if current and current_bytes + arr.nbytes > max_shard_bytes:
            flush()
        current[key] = arr
        current_bytes += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(shards)
    names = []
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 or index else SINGLE_NAME
        os.replace(os.path.join(directory, name), os.path.join(directory, final))
        names.append(final)
        for k in keys:
            weight_map[k] = final
    if n > 1 or index:
        with_index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = os.path.join(directory, INDEX_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(with_index, f, indent=2)
        os.replace(tmp, os.path.join(directory, INDEX_NAME))
    return names
