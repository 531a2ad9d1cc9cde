"""On-disk cache of tokenized documents (`data.dataset_prepared_path`): tokenize a large dataset once, not at
every start.

One `.npz` per distinct input: the key hashes each dataset's path, type, split and files (name, size, mtime),
the tokenizer (its serialized vocabulary and chat template), a messages dataset's chat template text, template
variables and turn options, the sequence limits and row options. Any change gives a new file; nothing is
invalidated in place. Arrays only (no pickle); written to a temporary name and renamed, so a killed run never
leaves a half-written cache and concurrent processes can write the same entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile

import numpy as np

from xorl_jax.data.chat import fingerprint as chat_fingerprint
from xorl_jax.data.sources import _expand_files, _is_hf_saved_dataset
from xorl_jax.data.sources import setting as _get

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: messages rows masked by locating each assistant turn in one render (xorl_jax.data.chat)
# docs_dropped: documents longer than their limit under data.long_sequence_policy drop (a cache without it is
# ignored by load: its stats have another length)
STATS = ("rows_read", "rows_skipped", "docs_truncated", "docs_split", "tokens_dropped", "docs_dropped")


def _files_fingerprint(path) -> list:
    if path == "dummy" or path is None:
        return []
    path = os.path.expanduser(str(path))
    if _is_hf_saved_dataset(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    elif os.path.exists(path):
        files = _expand_files(path, None) if os.path.isdir(path) else [path]
    else:  # a hub id: its name is all we know
        return [path]
    return [[os.path.relpath(f, path) if f != path else os.path.basename(f), os.path.getsize(f),
             os.stat(f).st_mtime_ns] for f in files]


def _tokenizer_fingerprint(tokenizer) -> str:
    if tokenizer is None:
        return "none"
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


def cache_key(dataset_cfgs, tokenizer, data_cfg, seed: int, *, vocab_size: int | None = None) -> str:
    datasets = [{k: _get(ds, k) for k in ("path", "type", "name", "split", "revision", "data_files", "max_seq_len",
                                          "num_samples")}
                | {"files": _files_fingerprint(_get(ds, "path")), "chat": chat_fingerprint(ds, tokenizer)}
                for ds in dataset_cfgs]
    spec = {
        "format": FORMAT, "datasets": datasets, "tokenizer": _tokenizer_fingerprint(tokenizer), "seed": int(seed),
        **{k: _get(data_cfg, k) for k in ("sample_packing_sequence_len", "long_sequence_policy", "skip_bad_rows",
                                          "select_columns")},
    }
    if vocab_size is not None:  # the documents were checked against it: a model with fewer rows checks them again
        spec["vocab_size"] = int(vocab_size)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_file(directory: str, key: str) -> str:
    return os.path.join(os.path.expanduser(directory), f"documents-{key}.npz")


def save(path: str, ids: list, targets: list, stats: dict) -> None:
    lengths = np.asarray([len(x) for x in ids], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(tmp, ids=np.concatenate(ids).astype(np.int32), targets=np.concatenate(targets).astype(np.int32),
                 offsets=offsets, stats=np.asarray([stats[k] for k in STATS], np.int64))
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a read-only directory costs the cache, not the run
        if os.path.exists(tmp):
            os.remove(tmp)
        logger.warning(f"data: cannot write the cache {path} ({e.strerror or e}); continuing without it")


def load(path: str):
    """(ids list, targets list, stats dict) or None when the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, targets, offsets, stats = z["ids"], z["targets"], z["offsets"], z["stats"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated or overwritten
        logger.warning(f"data: ignoring unreadable cache {path} ({type(e).__name__}: {e}); tokenizing again")
        return None
    if (len(offsets) < 1 or len(stats) != len(STATS) or offsets[0] != 0 or offsets[-1] != len(ids)
            or len(targets) != len(ids) or np.any(np.diff(offsets) < 0)):
        logger.warning(f"data: ignoring inconsistent cache {path}; tokenizing again")
        return None
    cuts = list(zip(offsets[:-1], offsets[1:]))
    return ([ids[a:b].astype(np.int64) for a, b in cuts], [targets[a:b].astype(np.int64) for a, b in cuts],
            dict(zip(STATS, (int(x) for x in stats))))
