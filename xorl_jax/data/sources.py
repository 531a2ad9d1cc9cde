"""Row sources: local jsonl, parquet, a HF dataset saved on disk, a HF hub id, or `dummy`.

Each source yields (where, row) pairs; `where` is "file:line" (jsonl), "file:row N" (parquet) or
"path[split][N]" (HF datasets) so errors can name the culprit row.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator


class DataError(ValueError):
    """A dataset cannot be read or one of its rows is malformed."""


def setting(obj, name, default=None):
    """A field of a config section or dataset entry, given as a config dataclass or a plain dict."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _expand_files(path: str, data_files) -> list[str]:
    if os.path.isfile(path):
        return [path]
    patterns = data_files if isinstance(data_files, (list, tuple)) else [data_files] if data_files else None
    if patterns is None:
        patterns = ["**/*.jsonl", "**/*.json", "**/*.parquet"]
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(path, p), recursive=True)
                    if os.path.isfile(f)})
    if not files:
        raise DataError(f"dataset directory {path} has no jsonl/parquet files matching {patterns}; "
                        "set data_files or point path at a file")
    return files


def _is_hf_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_dict.json"))
                                    or os.path.exists(os.path.join(path, "dataset_info.json")))


def _read_jsonl(file: str) -> Iterator[tuple[str, object]]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{file}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{file}:{lineno}", DataError(f"{file}:{lineno}: invalid JSON ({e.msg})")


def _read_json_array(file: str) -> Iterator[tuple[str, object]]:
    with open(file, encoding="utf-8") as f:
        head = f.read(1 << 12).lstrip()
    if not head.startswith("["):  # JSON lines with a .json suffix
        yield from _read_jsonl(file)
        return
    with open(file, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        yield f"{file}[{i}]", row


def _read_parquet(file: str, columns) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading parquet needs pyarrow; pip install pyarrow") from None
    pf = pq.ParquetFile(file)
    names = [c for c in columns if c in pf.schema_arrow.names] if columns else None
    n = 0
    for batch in pf.iter_batches(columns=names):
        for row in batch.to_pylist():
            yield f"{file}:row {n}", row
            n += 1


def _read_hf_dataset(ds, label: str) -> Iterator[tuple[str, object]]:
    for i, row in enumerate(ds):
        yield f"{label}[{i}]", row


def _load_hf_disk(path: str, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a HF dataset saved on disk; reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: split {split!r} not found; it has {sorted(ds)}; set split")
        ds = ds[split]
    return ds


def _load_hf_repo(path: str, name: str, split: str, data_files):
    """Configuration `name` of a dataset repository downloaded to the directory `path` (datasets.load_dataset)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading its configuration {name!r} needs `pip install datasets`") from None
    try:
        return datasets.load_dataset(path, name=name, split=split, data_files=data_files)
    except Exception as e:  # a missing configuration or split, unreadable files: one line either way
        raise DataError(f"{path}: configuration {name!r}, split {split!r} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check name and split") from None


def _load_hf_hub(path: str, split: str, data_files, name: str | None = None, revision: str | None = None):
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset path {path!r} is not a local file or directory (loading a HF hub id needs "
                        "`pip install datasets`)") from None
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        raise DataError(f"dataset path {path!r} is not a local file or directory, and the HF hub is disabled "
                        "(HF_HUB_OFFLINE); download it first or fix the path")
    try:
        return datasets.load_dataset(path, name=name, split=split, data_files=data_files, revision=revision)
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise DataError(f"dataset path {path!r} is not a local file or directory, and loading it from the HF hub "
                        f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path "
                        "or the network") from None


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _looks_local(path: str) -> bool:
    """A path a user meant as a local file or directory (a hub id is `name` or `org/name`)."""
    return (os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.endswith(DATA_SUFFIXES)
            or path.count("/") > 1 or os.sep != "/" and os.sep in path)


def check_source(path, *, split: str = "train", data_files=None) -> None:
    """Cheap checks of a dataset entry before any row is read: the path exists (or is a reachable hub id), its
    files are readable, a saved HF dataset has the split. Raises DataError naming the path and what to do."""
    if not path:
        raise DataError("a dataset entry has no path; set its path")
    if path == "dummy":
        return
    path = os.path.expanduser(str(path))
    if _is_hf_saved_dataset(path):
        splits_file = os.path.join(path, "dataset_dict.json")
        if os.path.isfile(splits_file):
            try:
                with open(splits_file) as f:
                    splits = json.load(f).get("splits")
            except (OSError, ValueError, AttributeError):
                splits = None
            if isinstance(splits, list) and split not in splits:
                raise DataError(f"{path}: split {split!r} not found; it has {sorted(splits)}; set split")
        return
    if os.path.exists(path):
        for file in _expand_files(path, data_files):
            if not os.access(file, os.R_OK):
                raise DataError(f"{file} is not readable (permission denied); fix its permissions")
        return
    if _looks_local(path):
        raise DataError(f"{path} not found; fix the dataset path (a local jsonl/parquet file, a directory of "
                        "them, or a HF dataset saved with save_to_disk)")
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        raise DataError(f"dataset path {path!r} is not a local file or directory, and the HF hub is disabled "
                        "(HF_HUB_OFFLINE); download it first or fix the path")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"dataset path {path!r} is not a local file or directory (loading it as a HF hub id needs "
                        "`pip install datasets`); fix the path") from None


def iter_rows(path: str, *, split: str = "train", data_files=None, columns=None, name: str | None = None,
              revision: str | None = None) -> Iterator[tuple[str, object]]:
    """Yields (where, row) for every row; a malformed JSON line is yielded as a DataError instance. `name`: the
    configuration of a HF dataset (hub id, or a repository downloaded to a directory); `revision`: of a hub id."""
    if not path:
        raise DataError("a dataset entry has no path; set data.datasets[].path")
    path = os.path.expanduser(path)
    if _is_hf_saved_dataset(path):
        yield from _read_hf_dataset(_load_hf_disk(path, split), f"{path}[{split}]")
        return
    if name and os.path.isdir(path):
        yield from _read_hf_dataset(_load_hf_repo(path, name, split, data_files), f"{path}[{name}][{split}]")
        return
    if os.path.exists(path):
        for file in _expand_files(path, data_files):
            if file.endswith(".parquet"):
                yield from _read_parquet(file, columns)
            elif file.endswith(".json"):
                yield from _read_json_array(file)
            else:
                yield from _read_jsonl(file)
        return
    label = f"{path}[{name}][{split}]" if name else f"{path}[{split}]"
    yield from _read_hf_dataset(_load_hf_hub(path, split, data_files, name, revision), label)
