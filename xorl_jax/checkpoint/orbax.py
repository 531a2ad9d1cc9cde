"""The parameter checkpoint format shared by `convert`, the trainer and `from_pretrained`, and the one HF loader
(`load_model`, also behind `from_pretrained` and `convert to-orbax`); HF export is `checkpoint.export`.

An Orbax model directory:
    DIR/params/        Orbax checkpoint of the parameters (pure dict tree, sharded arrays), either one Orbax
                       checkpoint, or, when written by the streaming converter, `parts.json` + `part-NNNNN/` Orbax
                       checkpoints each holding a subset of the tree (so only one part is ever in host memory)
    DIR/xorl_jax.json  metadata: model_type, family, expert layout and dtype of the HF source, stored dtype, root,
                       and the export source record (`source`, see `source_record`)
    DIR/config.json    the HF config, plus tokenizer and generation files copied from the source
A training step directory (`<output_dir>/checkpoints/<step>`) has `params/` (the trainer's nnx.State: each leaf
may sit under a trailing `value` key; a LoRA run's holds only the adapters) and `meta/` (the trainer's JSON item,
holding `hf_config`, the run's config and the export source record); `to-hf` and `load_model` read both kinds.

The export source record (`source_of`, `run_source`) says what an HF export (`checkpoint.export.export_hf`) of a
directory stands in for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from xorl_jax import lora as lora_lib
from xorl_jax.checkpoint import convert_ops as ops
from xorl_jax.checkpoint.hf import INDEX_NAME, CheckpointError, SafetensorsReader
from xorl_jax.config import LoraConfig
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import abstract_model, build_config, detect_layout, param_paths
from xorl_jax.parallel.rules import param_shardings
from xorl_jax.version import __version__

METADATA_NAME = "xorl_jax.json"
PARAMS_DIR = "params"
PARTS_INDEX = "parts.json"
PART_BYTES = 256 * 2**20  # parameters grouped into Orbax saves of about this size
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- tree helpers
def _flat(tree) -> dict:
    """Nested dict -> {path tuple: leaf}."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (k,))
        else:
            out[prefix] = node

    walk(tree, ())
    return out


def _nest(flat: dict) -> dict:
    root = {}
    for path, leaf in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return root


def _pure(params_state) -> dict:
    from flax import nnx

    if isinstance(params_state, nnx.State):
        return nnx.to_pure_dict(params_state)
    return params_state


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _abstract_leaf(x, sharding=None):
    import jax

    sharding = sharding if sharding is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


# ----------------------------------------------------------------------------------------------- contract
def save_params(directory, params_state, *, metadata: dict) -> None:
    """Write `directory/params` (one Orbax checkpoint) and `directory/xorl_jax.json`. All processes call it."""
    import jax

    tree = _pure(params_state)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ckptr = _checkpointer()
    ckptr.save(os.path.join(directory, PARAMS_DIR), tree)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        _write_json(os.path.join(directory, METADATA_NAME), metadata)


def load_params(directory, abstract_params_state, shardings=None) -> dict:
    """The parameters as a pure dict of jax.Array, placed on `shardings` (a matching tree or {path: sharding})."""
    try:
        return _load_params(directory, abstract_params_state, shardings)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax/tensorstore errors on a damaged or foreign directory
        raise _unreadable(directory, e) from None


def _unreadable(directory, e) -> CheckpointError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return CheckpointError(f"{directory}: cannot read the Orbax parameters ({type(e).__name__}: {detail}); the "
                           f"checkpoint is incomplete or corrupt, or its config.json does not match it")


def _load_params(directory, abstract_params_state, shardings=None) -> dict:
    abstract = _flat(_pure(abstract_params_state))
    if shardings is not None:
        sh = shardings if isinstance(shardings, dict) and all(isinstance(k, tuple) for k in shardings) else _flat(
            _pure(shardings))
        abstract = {p: _abstract_leaf(a, sh.get(p)) for p, a in abstract.items()}
    else:
        abstract = {p: _abstract_leaf(a) for p, a in abstract.items()}
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ directory; not an xorl_jax checkpoint")
    ckptr = _checkpointer()
    index_path = os.path.join(params_dir, PARTS_INDEX)
    if not os.path.exists(index_path):
        suffix = _leaf_suffix(params_dir)
        target = _nest({p + suffix: a for p, a in abstract.items()})
        restored = {p[:len(p) - len(suffix)]: v for p, v in _flat(ckptr.restore(params_dir, target)).items()}
    else:
        with open(index_path) as f:
            parts = json.load(f)["parts"]
        by_name = {_name(p): p for p in abstract}
        restored, split = {}, {}
        for part in parts:
            unknown = [n for n in part["params"] if n not in by_name]
            if unknown:
                raise CheckpointError(f"{directory}: parameters {unknown[:5]} are not in this model; "
                                      f"the checkpoint and config.json do not match")
            layers = part.get("layers", {})
            sub = {}
            for n in part["params"]:
                a = abstract[by_name[n]]
                if n in layers:
                    r0, r1 = layers[n]
                    a = _piece_abstract(a, r1 - r0)
                sub[by_name[n]] = a
            got = _flat(ckptr.restore(os.path.join(params_dir, part["dir"]), _nest(sub)))
            for p, arr in got.items():
                if _name(p) in layers:
                    split.setdefault(p, []).append((layers[_name(p)][0], arr))
                else:
                    restored[p] = arr
        for p, runs in split.items():
            restored[p] = _concat_layers([a for _, a in sorted(runs, key=lambda t: t[0])], abstract[p])
    missing = [_name(p) for p in abstract if p not in restored]
    if missing:
        raise CheckpointError(f"{directory}: parameters missing from the checkpoint: {missing[:5]}")
    return _nest({p: restored[p] for p in abstract})


VALUE_KEY = "value"  # where an nnx.Variable keeps its array when flax flattens it (the trainer saves nnx.State)


def _metadata_tree(params_dir) -> dict:
    md = _checkpointer().metadata(params_dir)
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if tree is None:
        raise CheckpointError(f"{params_dir}: Orbax cannot read its metadata; the checkpoint is incomplete or corrupt")
    return dict(tree) if not isinstance(tree, dict) else tree


def _stored_key_paths(params_dir) -> list | None:
    """The stored leaves' key paths from Orbax's `_METADATA` file (no array data read), or None without one."""
    p = os.path.join(params_dir, "_METADATA")
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            entries = json.load(f)["tree_metadata"].values()
        return [tuple(str(k["key"]) for k in e["key_metadata"]) for e in entries]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{p}: unreadable Orbax metadata ({type(e).__name__}); the checkpoint is incomplete "
                              f"or corrupt") from None


def _leaf_suffix(params_dir) -> tuple:
    """('value',) when every stored leaf sits under a trailing `value` key (an nnx.State saved by the trainer),
    else ()."""
    paths = _stored_key_paths(params_dir)
    if paths is None:
        paths = list(_flat(_metadata_tree(params_dir)))
    return (VALUE_KEY,) if paths and all(len(p) > 1 and p[-1] == VALUE_KEY for p in paths) else ()


def _param_name(keys) -> str:
    """A stored leaf's parameter name, without the trailing `value` key of an nnx.State leaf."""
    keys = [str(k) for k in keys]
    if len(keys) > 1 and keys[-1] == VALUE_KEY:
        keys = keys[:-1]
    return ".".join(keys)


def _piece_abstract(like, layers: int):
    import jax

    return jax.ShapeDtypeStruct((layers,) + tuple(like.shape[1:]), like.dtype, sharding=like.sharding)


def _concat_layers(runs, like):
    """Join runs of layers back into one parameter, on the parameter's own sharding."""
    import jax
    import jax.numpy as jnp

    if sum(r.shape[0] for r in runs) != like.shape[0]:
        raise CheckpointError(f"split parameter has {sum(r.shape[0] for r in runs)} layers, expected {like.shape[0]}")
    sharding = like.sharding if like.sharding is not None else runs[0].sharding
    out = jax.jit(lambda *xs: jnp.concatenate(xs, axis=0), out_shardings=sharding)(*runs)
    for r in runs:
        r.delete()
    return out


def is_orbax_model_dir(path) -> bool:
    return bool(path) and os.path.isdir(os.path.join(path, PARAMS_DIR)) and (
        os.path.isfile(os.path.join(path, METADATA_NAME)) or os.path.isdir(os.path.join(path, "meta")))


def checkpoint_dir(path, what: str = "--checkpoint") -> str:
    """`path` if it is an Orbax model directory or a training step directory, else a CheckpointError that says
    what is there instead (nothing, a run's checkpoints folder, an unfinished save, an HF directory)."""
    if not path or not os.path.exists(path):
        raise CheckpointError(f"{what} {path}: no such directory; pass a training step directory "
                              f"(<output_dir>/checkpoints/<step>) or an Orbax model directory from to-orbax")
    if is_orbax_model_dir(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a file; pass a checkpoint directory")
    if ".orbax-checkpoint-tmp" in os.path.basename(os.path.normpath(path)):
        raise CheckpointError(f"{what} {path} is an unfinished save (interrupted while writing); use a complete "
                              f"step directory beside it")
    for base in (path, os.path.join(path, "checkpoints")):
        steps = sorted(int(n) for n in (os.listdir(base) if os.path.isdir(base) else ())
                       if n.isdigit() and is_orbax_model_dir(os.path.join(base, n)))
        if steps:
            raise CheckpointError(f"{what} {path} holds training steps {', '.join(map(str, steps[-5:]))}; pass one "
                                  f"step directory, e.g. {os.path.join(base, str(steps[-1]))}")
    if os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{what} {path} is not an xorl_jax checkpoint (no {PARAMS_DIR}/ with {METADATA_NAME} "
                              f"or meta/); it looks like an HF directory: convert HF directories with to-orbax")
    raise CheckpointError(f"{what} {path} is not an xorl_jax checkpoint (expected {PARAMS_DIR}/ and "
                          f"{METADATA_NAME} or meta/)")


def read_metadata(directory) -> dict:
    """xorl_jax.json, or for a training step directory what its `meta` item says (with defaults). Both carry the
    export source record under `source` (absent in directories written by older versions)."""
    p = os.path.join(directory, METADATA_NAME)
    if os.path.isfile(p):
        try:
            with open(p) as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: corrupt metadata ({e}); the checkpoint is damaged") from None
    meta = _training_meta(directory)
    if meta is None:
        raise CheckpointError(f"{directory}: neither {METADATA_NAME} nor a readable training `meta` item; not an "
                              f"xorl_jax checkpoint, or a damaged one")
    hf = meta.get("hf_config") or {}
    source = meta.get("source") or _legacy_training_source(meta)
    lora = ((meta.get("config") or {}).get("lora") or {})
    return {"model_type": hf.get("model_type"), "expert_layout": source.get("expert_layout") or "fused",
            "root": source.get("root"), "source_dtype": source.get("dtype"), "dtype": None,
            "source_path": source.get("path"), "hf_config": hf, "source": source,
            "lora": lora if lora.get("enable_lora") else None, "run_config": meta.get("config") or {}}


def _legacy_training_source(meta) -> dict:
    """The source record of a training checkpoint written before records existed: from the run's model_path (taken
    as it was written, relative paths against the current directory), when it still exists."""
    model = (meta.get("config") or {}).get("model") or {}
    train = (meta.get("config") or {}).get("train") or {}
    path = meta.get("model_path") or model.get("model_path")
    if train.get("init_from") == "scratch":
        return run_source(None, hf_config=meta.get("hf_config") or {}, init_from="scratch",
                          dtype=model.get("dtype") or "float32",
                          tokenizer_path=model.get("tokenizer_path"), config_path=model.get("config_path"))
    if path and os.path.isabs(path) and os.path.isdir(path):
        try:
            return source_of(path, meta.get("hf_config"))
        except (CheckpointError, ValueError, OSError):
            pass
    return {"path": None, "model_path": path, "root": None, "expert_layout": "fused", "dtype": None, "dtypes": {},
            "carried": None, "sharded": False,
            "side_dirs": [d for d in (model.get("tokenizer_path"), path, model.get("config_path")) if d]}


def _training_meta(directory):
    meta_dir = os.path.join(directory, "meta")
    if not os.path.isdir(meta_dir):
        return None
    for name in sorted(os.listdir(meta_dir)):
        p = os.path.join(meta_dir, name)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and "hf_config" in data:
                return data
    return None


def hf_config_of(directory) -> dict:
    p = os.path.join(directory, "config.json")
    if os.path.isfile(p):
        with open(p) as f:
            return json.load(f)
    hf = read_metadata(directory).get("hf_config")
    if not hf:
        raise CheckpointError(f"{directory}: no config.json and no hf_config in its metadata")
    return hf


def read_hf_config(path: str) -> dict:
    """config.json from a directory (or the file itself); for a training step directory (no config.json), the
    HF config its run recorded."""
    cfg_path = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.exists(cfg_path) and os.path.isdir(os.path.join(path, "meta")):
        if is_orbax_model_dir(path):
            return hf_config_of(path)
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path} not found; set model.model_path (or model.config_path) to a HF model "
                              "directory holding config.json")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


def _name(path) -> str:
    return ".".join(str(k) for k in path)


def _write_json(path, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _version() -> str:
    return __version__


# ------------------------------------------------------------------------------------------- shardings
def param_shardings_for(model, mesh, rules=None) -> dict:
    """{our path: NamedSharding} from the logical `axes` of each parameter, through the project's rules table."""
    from flax import nnx

    got = param_shardings(model, mesh, rules)
    if isinstance(got, nnx.State):
        return {tuple(p): getattr(v, "value", v) for p, v in nnx.to_flat_state(got)}
    return _flat(_pure(got)) if not (isinstance(got, dict) and all(isinstance(k, tuple) for k in got)) else got


def logical_shardings(model, mesh, axis_rules: dict) -> dict:
    """{our path: NamedSharding} with `axis_rules` {logical axis: mesh axis or None}; unknown axes replicate."""
    from jax.sharding import NamedSharding, PartitionSpec

    out = {}
    for path, var in param_paths(model).items():
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        spec, used = [], set()
        for ax, n in zip(axes, var.shape):
            m = axis_rules.get(ax)
            if m is not None and (m in used or n % mesh.shape[m]):
                m = None  # a mesh axis used twice, or a dimension it does not divide: replicate that dimension
            used.add(m)
            spec.append(m)
        out[path] = NamedSharding(mesh, PartitionSpec(*spec))
    return out


# ------------------------------------------------------------------------------------- HF -> our arrays
def _open_hf(model_path, options=None, dtype=None, config_path=None):
    if model_path and os.path.isdir(os.path.join(model_path, PARAMS_DIR)):
        raise CheckpointError(f"{model_path} is an xorl_jax (Orbax) checkpoint, not an HF directory; train from it "
                              f"directly (model.model_path) or write HF safetensors with `convert to-hf`")
    hf_config = read_hf_config(config_path or model_path)
    cls, cfg = build_config(hf_config)
    reader = SafetensorsReader(model_path)
    root, layout = detect_layout(reader.keys())
    keymap = cls.hf_key_map(cfg, expert_layout=layout, root=root)
    model = abstract_model(cls, cfg, options or ModelOptions())
    sources = ops.plan(model, keymap)
    ops.check_keys(sources, reader.keys(), keymap, model_path, cls.__name__)
    mapped = ops.mapped_keys(sources)
    reader.check_float(keymap.skipped_prefixes)
    skipped = sorted(k for k in reader.keys() if keymap.skipped_prefixes and k.startswith(keymap.skipped_prefixes))
    if skipped:
        logger.info("skipped %d checkpoint tensors not used for text training (%s)", len(skipped),
                    ", ".join(sorted({".".join(k.split(".")[:2]) for k in skipped})))
    source_dtype = _source_dtype(reader, mapped)
    if options is None:  # the parameters in the given dtype, else the source's
        name = _np_dtype(dtype).name if dtype else source_dtype
        model = abstract_model(cls, cfg, ModelOptions(dtype=name, param_dtype=name))
    info = {"model_type": hf_config.get("model_type"), "family": cls.__name__, "expert_layout": layout,
            "root": root, "source_dtype": source_dtype}
    return hf_config, model, reader, sources, info


def _source_dtype(reader, keys=None) -> str:
    """The dtype holding most of the elements of `keys` (default: every tensor)."""
    counts = {}
    for k in (reader.keys() if keys is None else keys):
        dt = reader.dtype(k)
        counts[dt.name] = counts.get(dt.name, 0) + int(np.prod(reader.shape(k)))
    return max(counts, key=counts.get) if counts else "float32"


def _iter_arrays(model, reader, sources, param_dtype, shardings, read=None, max_piece_bytes=None):
    """Yield (our path, layer range or None, jax.Array), one parameter (or one run of its layers) at a time.

    With `max_piece_bytes`, a layer-stacked parameter larger than that (and not sharded over its layer axis)
    comes as several pieces along the layer axis, so only one piece is ever in host memory.
    """
    read = read or reader.read
    params = param_paths(model)
    unset = [p for p in params if p not in sources]
    if unset:
        raise AssertionError(f"key map leaves parameters unset: {unset[:5]}")
    itemsize = np.dtype(param_dtype).itemsize
    for path, src in sources.items():
        shape = tuple(params[path].shape)
        sharding = shardings.get(path) if shardings else None
        layer_bytes = int(np.prod(shape[1:])) * itemsize
        splittable = src.stacked and (sharding is None or _axis_unsharded(sharding, 0))
        if max_piece_bytes and splittable and layer_bytes * shape[0] > max_piece_bytes:
            step = max(1, max_piece_bytes // max(layer_bytes, 1))
            for r0 in range(0, shape[0], step):
                r1 = min(shape[0], r0 + step)
                piece = ops.ParamSource(path, src.entries[r0:r1], stacked=True)
                yield path, (r0, r1), ops.make_array(piece, (r1 - r0,) + shape[1:], param_dtype, sharding, read,
                                                     _name(path))
        else:
            yield path, None, ops.make_array(src, shape, param_dtype, sharding, read, _name(path))


def _axis_unsharded(sharding, axis) -> bool:
    spec = getattr(sharding, "spec", None)
    return spec is None or len(spec) <= axis or spec[axis] is None


def load_model(path, options, mesh=None, rules=None, *, config_path=None, shardings=None):
    """A model from an HF directory (converted on the fly), an Orbax model directory or a training step directory
    (a LoRA run's: its base with the adapters merged), sharded over `mesh`."""
    import jax.numpy as jnp
    from flax import nnx

    if is_orbax_model_dir(path):
        hf_config = hf_config_of(path) if not config_path else read_hf_config(config_path)
        cls, cfg = build_config(hf_config)
        model = abstract_model(cls, cfg, options)
        if shardings is None and mesh is not None:
            shardings = param_shardings_for(model, mesh, rules)
        meta = read_metadata(path)
        if meta.get("lora"):
            return _place(lora_merged_model(path, meta), jnp.dtype(options.param_dtype), shardings, model)
        _check_stored(path)
        graphdef, abstract_state = nnx.split(model)
        want = jnp.dtype(options.param_dtype)
        abstract = {p: _retyped(a, want) for p, a in _flat(nnx.to_pure_dict(abstract_state)).items()}
        params = _flat(load_params(path, _nest(abstract), shardings))
        nnx.replace_by_pure_dict(abstract_state, _nest(params))
        return nnx.merge(graphdef, abstract_state)
    _, model, reader, sources, _ = _open_hf(path, options=options, config_path=config_path)
    if shardings is None and mesh is not None:
        shardings = param_shardings_for(model, mesh, rules)

    params = param_paths(model)
    for p, _, arr in _iter_arrays(model, reader, sources, jnp.dtype(options.param_dtype), shardings):
        params[p].set_value(arr)
    return model


def _check_stored(path) -> None:
    """A missing or damaged file of an Orbax directory as a clear CheckpointError before Orbax reads it (Orbax's
    own failure on one comes with pages of background-thread tracebacks)."""
    try:
        _stored_arrays(path)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - a layout this check does not know: Orbax reads it
        pass


def _host_sharding():
    import jax

    return jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])  # host RAM, not an accelerator


def _place(model, dtype, shardings, like):
    """`model`'s parameters cast to `dtype` and put on `shardings` ({path: sharding} or None: left where they are),
    in a model built like `like` (the caller's options)."""
    import jax
    from flax import nnx

    values = {p: v[...] for p, v in param_paths(model).items()}
    graphdef, state = nnx.split(like)
    flat = {}
    for p, _ in _flat(nnx.to_pure_dict(state)).items():
        x = values[p]
        x = x.astype(dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x
        flat[p] = jax.device_put(x, shardings[p]) if shardings and shardings.get(p) is not None else x
    nnx.replace_by_pure_dict(state, _nest(flat))
    return nnx.merge(graphdef, state)


def lora_merged_model(checkpoint, meta=None):
    """The model a LoRA training checkpoint stands for, in host memory: its base model (the run's model_path,
    read as the run read it) with the stored adapters merged, W + (alpha / r) A @ B, as the trainer merges them."""
    import jax
    from flax import nnx

    meta = meta or read_metadata(checkpoint)
    source = meta.get("source") or {}
    base = source.get("model_path")
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{checkpoint}: a LoRA checkpoint holds only the adapters, and its base model "
                              f"{base or '(not recorded)'} is gone; put the base model back there to export or load it")
    run_model = (meta.get("run_config") or {}).get("model") or {}
    base_model = load_model(base, ModelOptions(param_dtype=run_model.get("param_dtype") or "float32"),
                            shardings=_AllOn(_host_sharding()))
    graphdef, frozen = nnx.split(base_model)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    lcfg = LoraConfig(**{k: v for k, v in meta["lora"].items() if k in known})
    targets = lora_lib.lora_targets(frozen, lcfg)
    abstract = jax.eval_shape(lambda: lora_lib.init_lora(frozen, targets, lcfg.lora_rank))
    host = _host_sharding()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract)
    params_dir = os.path.join(os.path.abspath(checkpoint), PARAMS_DIR)
    try:
        adapters = _checkpointer().restore(params_dir, abstract)
    except Exception as e:  # noqa: BLE001 - a damaged directory, or adapters that do not match the recorded config
        raise _unreadable(checkpoint, e) from None
    scale = lora_lib.lora_scale(lcfg)
    merged = jax.jit(lambda lo, fr: lora_lib.merge_lora(fr, lo, targets, scale))(adapters, frozen)
    return nnx.merge(graphdef, merged)


class _AllOn(dict):
    """{path: sharding} that gives the same sharding for every path."""

    def __init__(self, sharding):
        super().__init__()
        self.sharding = sharding

    def get(self, key, default=None):
        return self.sharding

    def __getitem__(self, key):
        return self.sharding

    def __bool__(self):
        return True


def _retyped(a, dtype):
    import jax

    return jax.ShapeDtypeStruct(a.shape, dtype)


def convert_hf_to_orbax(model_path, output, *, dtype=None, mesh=None, rules=None, shardings=None,
                        overwrite=False, part_bytes=PART_BYTES) -> dict:
    """HF safetensors directory -> Orbax model directory, one parameter (and one part) in memory at a time."""
    import jax

    ops.check_output(output, [model_path], overwrite=overwrite)
    _prefer_mmap_allocations()
    hf_config, model, reader, sources, info = _open_hf(model_path, dtype=dtype)
    if shardings is None and mesh is not None:
        shardings = param_shardings_for(model, mesh, rules)
    param_dtype = np.dtype(model.options.param_dtype) if dtype is None else _np_dtype(dtype)
    main = jax.process_index() == 0
    tmp = ops.temp_dir_for(output) if main else None
    tmp = _broadcast_path(tmp)
    ckptr = None
    try:
        params_dir = os.path.join(tmp, PARAMS_DIR)
        if main:
            os.makedirs(params_dir, exist_ok=True)
        ckptr = _checkpointer()
        parts, pending, pending_bytes = [], {}, 0

        pieces = {}

        def flush():
            nonlocal pending, pending_bytes, pieces
            if not pending:
                return
            name = f"part-{len(parts):05d}"
            ckptr.save(os.path.join(params_dir, name), _nest(pending))
            ckptr.wait_until_finished()
            entry = {"dir": name, "params": [_name(p) for p in pending]}
            if pieces:
                entry["layers"] = pieces  # {param name: [first, end)} for a run of a split parameter's layers
            parts.append(entry)
            for a in pending.values():
                a.delete()
            pending, pending_bytes, pieces = {}, 0, {}
            _release_host_memory()

        total = 0
        for path, layers, arr in _iter_arrays(model, reader, sources, param_dtype, shardings,
                                              max_piece_bytes=part_bytes):
            nbytes = arr.size * arr.dtype.itemsize
            if pending and (pending_bytes + nbytes > part_bytes or path in pending):
                flush()
            pending[path] = arr
            if layers is not None:
                pieces[_name(path)] = list(layers)
            pending_bytes += nbytes
            total += nbytes
        flush()
        if main:
            _write_json(os.path.join(params_dir, PARTS_INDEX), {"format": "xorl_jax.params.parts/1", "parts": parts})
            meta = dict(info, dtype=np.dtype(param_dtype).name, xorl_jax_version=_version(),
                        source_path=os.path.abspath(model_path), total_bytes=total,
                        source=hf_source_record(model_path, hf_config))
            _write_json(os.path.join(tmp, METADATA_NAME), meta)
            _write_json(os.path.join(tmp, "config.json"), hf_config)
            ops.copy_side_files(model_path, tmp)
            ops.commit_dir(tmp, output)
        _barrier("convert_hf_to_orbax_done")
        return read_metadata(output)
    except BaseException:
        if ckptr is not None:  # a save cut off (Ctrl-C) may go on in Orbax's threads: let them stop writing first,
            try:               # or they recreate the temporary directory after it is removed
                ckptr.close()
            except BaseException:  # their own failure (the interrupted save) is not news
                pass
        if main and tmp and os.path.isdir(tmp):
            ops.remove_unfinished(tmp)
        raise


def _prefer_mmap_allocations() -> None:
    """Serve large host buffers from mmap (returned to the OS on free) instead of the heap, where glibc's dynamic
    threshold would keep tens of MB per converted tensor resident as fragmented free space."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _release_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so resident memory tracks live data."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _np_dtype(dtype):
    import jax.numpy as jnp

    try:
        dt = np.dtype(jnp.dtype(dtype))
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return dt


def _broadcast_path(path):
    import jax

    if jax.process_count() == 1:
        return path
    from jax.experimental import multihost_utils

    raw = np.frombuffer((path or "").encode().ljust(1024, b"\0"), np.uint8)
    got = multihost_utils.broadcast_one_to_all(raw)
    return bytes(np.asarray(got)).rstrip(b"\0").decode()


def _barrier(name):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _dtype_named(name):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _root_for(hf_config) -> str:
    return "model.language_model" if "text_config" in hf_config else "model"


# ------------------------------------------------------------------------------------------ source records
def hf_source_record(model_path, hf_config=None) -> dict:
    """The export source record of an HF directory: what an export needs to stand in for it.

    {"path": the HF directory whose untrained tensors are copied, "model_path": the directory a run loads,
     "root", "expert_layout", "dtype": the dtype of most weight elements, "dtypes": {HF key: dtype} of weights in
     another dtype, "carried": [HF keys the key map does not produce: copied byte for byte], "sharded": whether it
     has model.safetensors.index.json, "side_dirs": [directories the config/tokenizer files come from]}
    """
    path = os.path.abspath(model_path)
    hf_config = hf_config or read_hf_config(path)
    reader = SafetensorsReader(path)
    root, layout = detect_layout(reader.keys())
    cls, cfg = build_config(hf_config)
    sources = ops.plan(abstract_model(cls, cfg, ModelOptions()), cls.hf_key_map(cfg, expert_layout=layout, root=root))
    mapped = ops.mapped_keys(sources) & reader.keys()
    reader.check_float(cls.hf_key_map(cfg, expert_layout=layout, root=root).skipped_prefixes)
    dtype = _source_dtype(reader, mapped)
    return {"path": path, "model_path": path, "root": root, "expert_layout": layout, "dtype": dtype,
            "dtypes": {k: reader.dtype(k).name for k in sorted(mapped) if reader.dtype(k).name != dtype},
            "carried": sorted(reader.keys() - mapped), "sharded": os.path.isfile(os.path.join(path, INDEX_NAME)),
            "side_dirs": [path]}


def source_of(model_path, hf_config=None) -> dict:
    """The export source record of a directory a run loads its weights from: an HF directory, an Orbax model
    directory (its record, kept since to-orbax) or a training step directory (the record of its run)."""
    path = os.path.abspath(model_path)
    if not is_orbax_model_dir(path):
        return hf_source_record(path, hf_config)
    meta = read_metadata(path)
    rec = meta.get("source")
    if rec is None:  # written by an older version: its HF source, if still there
        src = meta.get("source_path")
        try:
            rec = hf_source_record(src) if src and os.path.isdir(src) else None
        except (CheckpointError, ValueError, OSError):
            rec = None
        if rec is None:
            rec = {"path": None, "root": meta.get("root"), "expert_layout": meta.get("expert_layout"),
                   "dtype": meta.get("source_dtype") or meta.get("dtype"), "dtypes": {}, "carried": None,
                   "sharded": False, "side_dirs": [src] if src else []}
    rec = dict(rec, model_path=path)
    rec["side_dirs"] = _unique([path] + list(rec.get("side_dirs") or []))
    return rec


def run_source(model_path, *, hf_config, init_from: str, dtype: str, tokenizer_path=None, config_path=None) -> dict:
    """The export source record of a training run (kept in every checkpoint's meta): its model_path's, or, for a
    run from scratch, none (no tensors to copy; written in `dtype`, the run's model.dtype; a multimodal config is
    exported text-only, as there is no vision tower to go with it). The tokenizer directory comes first."""
    if init_from == "scratch" or not model_path:
        rec = {"path": None, "model_path": None, "root": _root_for(hf_config), "expert_layout": "fused",
               "dtype": np.dtype(_dtype_named(dtype)).name, "dtypes": {}, "carried": [], "sharded": False,
               "side_dirs": [], "text_only": "text_config" in hf_config}
    else:
        rec = source_of(model_path, hf_config)
    config_dir = config_path if not config_path or os.path.isdir(config_path) else os.path.dirname(config_path)
    rec["side_dirs"] = _unique([tokenizer_path] + list(rec.get("side_dirs") or []) + [config_dir])
    return rec


def _unique(dirs) -> list:
    out = []
    for d in dirs:
        if d and os.path.abspath(d) not in out:
            out.append(os.path.abspath(d))
    return out


class _Runs:
    """The layer runs of one streaming read: the run being converted and the next one, read in the background.
    Shared by the StoredArrays of one checkpoint, so at most two runs are in memory at once."""

    def __init__(self):
        self.current = (None, None)  # ((array id, (piece, first layer)), array)
        self.next = (None, None)  # (same key, tensorstore read future)


class StoredArray:
    """One parameter of an Orbax checkpoint, read through tensorstore whole or one stacked layer at a time.

    `pieces`: (first layer, handle) runs of layers (one piece starting at 0 for a parameter saved whole). Stored
    chunks are decoded whole, so a layer is read as part of its chunk-aligned run of layers, kept in `runs` until
    another run is needed: reading one parameter's layers in order decodes each chunk once."""

    def __init__(self, name: str, pieces: list, runs: _Runs, where: str = ""):
        self.name = name
        self.pieces = sorted(pieces, key=lambda p: p[0])
        self.runs = runs
        self.where = where
        first = self.pieces[0][1]
        self.shape = (sum(h.shape[0] for _, h in self.pieces),) + tuple(first.shape[1:])

    def read(self, layer=None) -> np.ndarray:
        try:
            return self._read(layer)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore on missing or damaged chunk files
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"{self.where}: cannot read {self.name} ({detail}); the checkpoint is incomplete "
                                  f"or corrupt") from None

    def _read(self, layer=None) -> np.ndarray:
        if layer is None:
            parts = [np.asarray(h.read().result()) for _, h in self.pieces]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        for i, (start, h) in enumerate(self.pieces):
            if start <= layer < start + h.shape[0]:
                local = layer - start
                step = self._step(h)
                key = (id(self), (i, local - local % step))
                cached_key, run = self.runs.current
                if cached_key != key:
                    self.runs.current = (None, None)  # free the previous run before decoding the next
                    next_key, pending = self.runs.next
                    run = np.asarray((pending if next_key == key else self._start(key[1])).result())
                    self.runs.current = (key, run)
                    after = (i, key[1][1] + step) if key[1][1] + step < h.shape[0] else (i + 1, 0)
                    self.runs.next = (((id(self), after), self._start(after)) if after[0] < len(self.pieces)
                                      else (None, None))
                return run[local - key[1][1]]
        raise CheckpointError(f"{self.name}: layer {layer} is not in the checkpoint")

    @staticmethod
    def _step(handle) -> int:
        """Layers per stored chunk (the unit tensorstore decodes)."""
        return max(1, int(handle.chunk_layout.read_chunk.shape[0] or 1))

    def _start(self, piece_and_layer):
        """The read of the run at (piece, first layer), started (tensorstore reads in the background)."""
        i, first = piece_and_layer
        h = self.pieces[i][1]
        return h[first:min(first + self._step(h), h.shape[0])].read()


def _param_dirs(checkpoint) -> list:
    """[(Orbax checkpoint directory, {param name: [first, end) layers it holds})]: `params/` itself, or each part
    listed in its parts index (written by the streaming converter)."""
    params_dir = os.path.abspath(os.path.join(checkpoint, PARAMS_DIR))
    index = os.path.join(params_dir, PARTS_INDEX)
    if not os.path.exists(index):
        return [(params_dir, {})]
    with open(index) as f:
        return [(os.path.join(params_dir, p["dir"]), p.get("layers", {})) for p in json.load(f)["parts"]]


def _stored_arrays(checkpoint) -> dict:
    """{parameter name: StoredArray} from the checkpoint's Orbax metadata (only array headers are read).
    CheckpointError for a missing or damaged file; other errors mean a layout this reader does not know."""
    import tensorstore as ts

    pieces, runs = {}, _Runs()
    for d, layers in _param_dirs(checkpoint):
        if not os.path.isdir(d):
            raise CheckpointError(f"{checkpoint}: {os.path.relpath(d, checkpoint)}/ is missing; the checkpoint is "
                                  f"incomplete")
        if not os.path.isfile(os.path.join(d, "_METADATA")):
            raise CheckpointError(f"{checkpoint}: {os.path.relpath(d, checkpoint)}/_METADATA is missing; the "
                                  f"checkpoint is incomplete or damaged")
        with open(os.path.join(d, "_METADATA")) as f:
            meta = json.load(f)
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        for entry in meta["tree_metadata"].values():
            stored = ".".join(str(k["key"]) for k in entry["key_metadata"])
            name = _param_name([k["key"] for k in entry["key_metadata"]])
            if meta.get("use_ocdbt"):
                kv = {"driver": "ocdbt", "base": f"file://{d}/", "path": stored}
            else:
                kv = {"driver": "file", "path": os.path.join(d, stored)}
            try:
                handle = ts.open({"driver": driver, "kvstore": kv}, open=True, read=True).result()
            except Exception as e:  # noqa: BLE001 - tensorstore: missing or damaged files
                detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise CheckpointError(f"{checkpoint}: cannot open the stored {name} ({detail}); the checkpoint is "
                                      f"incomplete or corrupt") from None
            pieces.setdefault(name, []).append((layers[name][0] if name in layers else 0, handle))
    return {name: StoredArray(name, p, runs, checkpoint) for name, p in pieces.items()}
