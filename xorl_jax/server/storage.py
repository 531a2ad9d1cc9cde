"""Where the server keeps saved weights, and their `tinker://` names.

    tinker://<model_id>/weights/<name>          -> <root>/<model_id>/weights/<name>/          (training state)
    tinker://<model_id>/sampler_weights/<name>  -> <root>/<model_id>/sampler_weights/<name>/  (for sampling)

Each directory holds `params/` (Orbax: the LoRA adapters or the full weights), `optimizer/` (training saves: the
optimizer state, flattened) and `checkpoint.json` (what the listing and a later load need). A save is written
under a temporary name next to its final place and renamed once complete, as training checkpoints are: a crash
leaves no half-written checkpoint under a real name.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid

KINDS = {"weights": "training", "sampler_weights": "sampler"}
META = "checkpoint.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP = ".tmp-"


class PathError(ValueError):
    """A tinker:// path or checkpoint name that is malformed or names nothing here; str(e) says which."""


def check_name(name: str, field: str = "path") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PathError(f"{field}: {name!r} is not a checkpoint name (letters, digits, '.', '_', '-'; at most 128, "
                        "not starting with '.')")
    return name


def tinker_path(model_id: str, segment: str, name: str) -> str:
    return f"tinker://{model_id}/{segment}/{name}"


def parse(path: str, field: str = "path") -> tuple[str, str, str]:
    """tinker://<model_id>/<segment>/<name> -> (model_id, segment, name)."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise PathError(f"{field}: {path!r} is not a tinker:// path (tinker://<model_id>/weights/<name>)")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise PathError(f"{field}: {path!r} is not tinker://<model_id>/weights/<name> or "
                        "tinker://<model_id>/sampler_weights/<name>")
    check_name(parts[2], field)
    if not parts[0] or parts[0].startswith(".") or "\\" in parts[0]:
        raise PathError(f"{field}: {path!r} names no model")
    return parts[0], parts[1], parts[2]


class Storage:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def directory(self, model_id: str, segment: str, name: str) -> str:
        return os.path.join(self.root, model_id, segment, name)

    @staticmethod
    def temporary(final: str, token: str) -> str:
        """The save's temporary directory: the same name on every process (`token` comes from the request)."""
        return f"{final}{_TMP}{token}"

    @staticmethod
    def publish(tmp: str, final: str, overwrite: bool) -> None:
        """Rename a complete save into place (process 0 only)."""
        if os.path.exists(final):
            if not overwrite:
                shutil.rmtree(tmp, ignore_errors=True)
                raise PathError(f"path: {final} exists; pass overwrite or pick another name")
            aside = f"{final}{_TMP}old-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)

    def resolve(self, path: str, field: str = "path") -> tuple[str, dict]:
        """(directory, metadata) of a saved checkpoint; PathError if there is none."""
        model_id, segment, name = parse(path, field)
        d = self.directory(model_id, segment, name)
        meta = read_meta(d)
        if meta is None:
            raise PathError(f"{field}: {path} does not exist on this server")
        return d, meta

    def list(self, model_id: str | None = None) -> list[dict]:
        """Checkpoint records (the SDK's Checkpoint shape), newest first."""
        out = []
        ids = [model_id] if model_id else sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        for mid in ids:
            for segment, kind in KINDS.items():
                base = os.path.join(self.root, mid, segment)
                if not os.path.isdir(base):
                    continue
                for name in os.listdir(base):
                    if _TMP in name:
                        continue
                    meta = read_meta(os.path.join(base, name))
                    if meta is None:
                        continue
                    out.append({
                        "checkpoint_id": f"{segment}/{name}",
                        "checkpoint_type": kind,
                        "time": meta["time"],
                        "tinker_path": tinker_path(mid, segment, name),
                        "size_bytes": _size(os.path.join(base, name)),
                        "public": False,
                        "user_metadata": meta.get("user_metadata") or None,
                    })
        out.sort(key=lambda c: c["time"], reverse=True)
        return out

    def delete(self, model_id: str, checkpoint_id: str) -> None:
        segment, _, name = checkpoint_id.partition("/")
        d = self.directory(model_id, segment, name)
        if segment not in KINDS or read_meta(d) is None:
            raise PathError(f"checkpoint {model_id}/{checkpoint_id} does not exist on this server")
        shutil.rmtree(d)

    def clean_temporaries(self) -> list[str]:
        """Remove saves a crash left half-written."""
        removed = []
        if not os.path.isdir(self.root):
            return removed
        for mid in os.listdir(self.root):
            for segment in KINDS:
                base = os.path.join(self.root, mid, segment)
                if os.path.isdir(base):
                    for name in os.listdir(base):
                        if _TMP in name:
                            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                            removed.append(os.path.join(base, name))
        return removed


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def write_meta(directory: str, meta: dict) -> None:
    with open(os.path.join(directory, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def read_meta(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, META), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _size(directory: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total
