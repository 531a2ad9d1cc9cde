"""Checks of a training run's inputs that take seconds, done before anything expensive (weights loaded, data
tokenized, a step compiled), so a wrong path or a mismatched file costs the user seconds, not a model load.

`check_run(cfg)` checks, in order: the output directory (a directory, writable), every dataset path (exists, has
readable data files, or is a reachable hub id), config.json (present, a supported model_type), the mesh (the
parallel sizes fit the devices, the heads and experts split over them), the kernels the config names (they run on
this machine), the weights in model.model_path (HF safetensors headers: every tensor floating point; an Orbax
directory: its index and metadata readable), and the tokenizer (present where messages or text data needs one, no
larger than the model's vocab_size). Each failure is a ConfigError, CheckpointError, DataError or MeshError whose
one line names the culprit and what to do; the CLI prints it and exits 2. Checks of the rows themselves (token and label ids below vocab_size, malformed rows) happen while
the data is tokenized, which the trainer does before it loads the weights.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import tempfile
from typing import Any

from xorl_jax.checkpoint.hf import CheckpointError, SafetensorsReader
from xorl_jax.checkpoint.orbax import PARAMS_DIR, PARTS_INDEX, is_orbax_model_dir
from xorl_jax.config import Config, ConfigError
from xorl_jax.data import DataError, load_tokenizer
from xorl_jax.data.sources import check_source
from xorl_jax.models.loading import detect_layout
from xorl_jax.train_setup import model_and_mesh

TOKENIZER_DATA_TYPES = ("messages", "text")  # dataset types whose rows go through the tokenizer


@dataclasses.dataclass
class RunInputs:
    """What the checks read, for the trainer to build the run from (nothing here holds weights or data)."""
    hf_config: dict
    model_cls: Any
    model_config: Any
    options: Any  # ModelOptions
    mesh: Any
    rules: Any
    tokenizer: Any  # None when no dataset needs one (tokenized rows only)
    vocab_size: int


def check_output_dir(path: str) -> None:
    """train.output_dir is (or can be made) a directory this process can write to."""
    key = "train.output_dir"
    path = os.path.expanduser(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key} {path} is a file, not a directory; point {key} at a directory (or move the file)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key} {path} cannot be created ({e.strerror or e}); point {key} at a writable "
                          "directory") from None
    try:  # a few KiB: a read-only mount, missing permissions or a disk already full show up now
        with tempfile.NamedTemporaryFile(dir=path, prefix=".xorl_jax-write-check-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{key} {path} is not writable ({e.strerror or e}); free space or fix permissions, or "
                          f"point {key} elsewhere") from None


def check_datasets(data_cfg) -> None:
    """Every train and eval dataset path exists and has readable data files (before any row is read)."""
    for section in ("datasets", "eval_datasets"):
        for i, ds in enumerate(getattr(data_cfg, section) or []):
            try:
                check_source(ds.path, split=ds.split or "train", data_files=ds.data_files)
            except DataError as e:
                raise DataError(f"data.{section}[{i}].path: {e}") from None


def needs_tokenizer(data_cfg) -> bool:
    """Whether any dataset's rows go through the tokenizer (tokenized rows and `dummy` data need none)."""
    return any(ds.type in TOKENIZER_DATA_TYPES and ds.path != "dummy"
               for ds in list(data_cfg.datasets or []) + list(data_cfg.eval_datasets or []))


def _recorded_tokenizer_dir(model_path: str) -> str | None:
    """For a training step directory (which holds no tokenizer files), the first directory its run's source record
    took the tokenizer from that still holds one; None otherwise (an HF or Orbax directory has its own)."""
    from xorl_jax.checkpoint.orbax import read_metadata
    from xorl_jax.data.pipeline import VOCABULARY_FILES

    def has_vocabulary(d):
        return bool(d) and any(os.path.isfile(os.path.join(d, n)) for n in VOCABULARY_FILES)

    if has_vocabulary(model_path) or not is_orbax_model_dir(model_path):
        return None
    try:
        side_dirs = (read_metadata(model_path).get("source") or {}).get("side_dirs") or []
    except (CheckpointError, OSError, ValueError):
        return None
    return next((d for d in side_dirs if os.path.isdir(str(d)) and has_vocabulary(str(d))), None)


def tokenizer_for(cfg: Config, vocab_size: int):
    """The run's tokenizer, or None where only tokenized rows are read; its size checked against vocab_size."""
    m = cfg.model
    if not needs_tokenizer(cfg.data):
        return None
    path = m.tokenizer_path or m.model_path
    key = "model.tokenizer_path" if m.tokenizer_path else "model.model_path; model.tokenizer_path is null"
    if not m.tokenizer_path and path:
        recorded = _recorded_tokenizer_dir(path)
        if recorded:
            path, key = recorded, f"the tokenizer of the run that wrote {m.model_path}; model.tokenizer_path is null"
            logging.getLogger(__name__).info(f"tokenizer: {recorded}, the one the run that wrote {m.model_path} "
                                             "used (model.tokenizer_path sets another)")
    if not path:
        kinds = sorted({ds.type for ds in list(cfg.data.datasets) + list(cfg.data.eval_datasets)} &
                       set(TOKENIZER_DATA_TYPES))
        raise ConfigError(f"{' and '.join(kinds)} data needs a tokenizer; set model.tokenizer_path to the "
                          "directory holding the model's tokenizer.json")
    tokenizer = load_tokenizer(path, key=key)
    if len(tokenizer) > vocab_size:
        raise DataError(f"the tokenizer in {path} ({key}) has {len(tokenizer)} tokens, more than the model's "
                        f"vocab_size {vocab_size} (config.json): ids from {vocab_size} on have no embedding row; "
                        "use the tokenizer that belongs to this model")
    return tokenizer


def _orbax_item_dirs(params_dir: str) -> list[str]:
    """The Orbax checkpoint directories that hold a model's parameters (one, or the parts of a streamed one)."""
    index = os.path.join(params_dir, PARTS_INDEX)
    if not os.path.exists(index):
        return [params_dir]
    try:
        with open(index) as f:
            parts = json.load(f)["parts"]
        return [os.path.join(params_dir, p["dir"]) for p in parts]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is unreadable ({type(e).__name__}: {e}); the checkpoint is incomplete or "
                              "corrupt: convert or copy it again") from None


def check_orbax_dir(path: str) -> None:
    """An Orbax model (or training step) directory: the parts index and each checkpoint's metadata read back."""
    for item in _orbax_item_dirs(os.path.join(path, PARAMS_DIR)):
        meta = os.path.join(item, "_METADATA")
        try:
            with open(meta) as f:
                tree = json.load(f).get("tree_metadata")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {os.path.relpath(meta, path)} is missing; the checkpoint is incomplete "
                                  "or corrupt: convert or copy it again") from None
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{meta} is unreadable ({type(e).__name__}: {e}); the checkpoint is incomplete "
                                  "or corrupt: convert or copy it again") from None
        if not tree:
            raise CheckpointError(f"{meta} lists no parameters; the checkpoint is incomplete or corrupt: convert "
                                  "or copy it again")


def check_kernels(cfg: Config, model_config) -> None:
    """A kernel the config names explicitly runs on this machine (`auto` picks one that does)."""
    from xorl_jax.kernels.gmm import _cached_unavailable_reason

    if getattr(model_config, "num_experts", 0) and cfg.model.moe_implementation == "triton":
        reason = _cached_unavailable_reason()
        if reason is not None:
            raise ConfigError(f"model.moe_implementation triton: the Triton grouped GEMM cannot run here ({reason}); "
                              "set model.moe_implementation to auto (Triton where it runs, else XLA) or native")


def check_weights(cfg: Config, model_cls, model_config) -> None:
    """model.model_path holds weights the model can load: safetensors headers (every loaded tensor a float) or
    an Orbax directory's metadata. Reads headers and small JSON files only."""
    path = cfg.model.model_path
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "not found"
        raise CheckpointError(f"model.model_path {path} {what}; point it at a HF checkpoint directory (safetensors "
                              "+ config.json) or an Orbax directory from `python -m xorl_jax.convert to-orbax`")
    if is_orbax_model_dir(path):
        check_orbax_dir(path)
        return
    reader = SafetensorsReader(path)
    root, layout = detect_layout(reader.keys())
    keymap = model_cls.hf_key_map(model_config, expert_layout=layout, root=root)
    reader.check_float(keymap.skipped_prefixes)


def check_run(cfg: Config, *, is_main: bool = True, need_data: bool = True) -> RunInputs:
    """Every check above, cheapest first; returns what they read. See the module docstring. Without `need_data`
    (the server: its data come with the requests) no dataset is checked and no tokenizer loaded."""
    if is_main:
        check_output_dir(cfg.train.output_dir)
    if need_data:
        check_datasets(cfg.data)
    hf_config, cls, model_config, options, mesh, rules = model_and_mesh(cfg)
    check_kernels(cfg, model_config)
    if cfg.train.init_from != "scratch":
        check_weights(cfg, cls, model_config)
    vocab_size = int(model_config.vocab_size)
    tokenizer = tokenizer_for(cfg, vocab_size) if need_data else None
    return RunInputs(hf_config=hf_config, model_cls=cls, model_config=model_config, options=options, mesh=mesh,
                     rules=rules, tokenizer=tokenizer, vocab_size=vocab_size)


# ------------------------------------------------------------------------------------------------- a full disk
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # full disk, quota, file size limit
_DISK_FULL_TEXT = tuple(os.strerror(n) for n in sorted(DISK_FULL_ERRNOS))  # tensorstore reports them as text


def disk_full_error(exc: BaseException | None) -> BaseException | None:
    """The exception in `exc`'s chain (itself, its causes and contexts) that says the disk, the quota or the file
    size limit is full; None when none does."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if any(text in str(exc) for text in _DISK_FULL_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(exc: BaseException, path: str, what: str = "", *, cleaned: bool = False) -> str:
    """One line for a full disk met while writing `what` to `path` (the file itself when the error names it and
    `what` is not given). `cleaned`: what was half written has been removed."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else next(
        (t for t in _DISK_FULL_TEXT if t in str(exc)), "no space left")
    if not what and isinstance(exc, OSError) and exc.filename:
        path = exc.filename
    return (f"{reason} while writing {what + ' to ' if what else ''}{path}; free space there (or raise the quota or "
            "file size limit) or point train.output_dir at a larger disk" + (
                "; checkpoints already complete are intact, the half-written one was removed" if cleaned else ""))
