"""The models a server holds and what the API does to them: forward / backward with the Tinker losses, gradient
accumulation, AdamW steps with each request's hyperparameters, weight saves and loads, sampling snapshots.

The model, its frozen base, the adapters, the optimizer states and the steps come from the trainer's engine
(xorl_jax.engine.TrainEngine, built with `serving=True`), loaded once at start-up. LoRA mode
(`lora.enable_lora: true`): every `create_model` gets its own adapters and optimizer state on the shared frozen base
(engine.new_adapter, engine.new_state; any number of tenants). Full-weight mode: one model, all weights trained: the
engine's own state. What this module adds: the tenants, request checks and batches, saves and sampling sessions.

Every method here runs on the server's single worker thread (and, with several processes, on every process in
the same order: xorl_jax.server.follow), so nothing here locks.

Semantics, as the Tinker API defines them:
- forward_backward adds the gradient of the summed loss to the model's accumulated gradient; forward only
  computes. Both return the per-token log-probabilities of the targets.
- optim_step applies the accumulated gradient with AdamW (torch.optim.AdamW's update: decoupled weight decay,
  bias-corrected moments, eps outside the square root) at the request's learning rate, betas, eps and weight
  decay, clipping the global gradient norm first when grad_clip_norm > 0; then the gradient is reset.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xorl_jax import rl_losses
from xorl_jax.checkpoint.orbax import load_params, save_params
from xorl_jax.config import Config
from xorl_jax.engine import Adapter, TrainEngine
from xorl_jax.parallel.rules import data_parallel_size
from xorl_jax.preflight import check_run
from xorl_jax.server import sampling, storage, wire
from xorl_jax.train_step import RequestSteps, TrainState

log = logging.getLogger("xorl_jax.server")

ATTN_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "g_proj", "in_proj_qkvz", "in_proj_ba",
                "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}


MAX_SAMPLING_SESSIONS = 16


class UserError(ValueError):
    """A request that cannot be served as asked (unknown model, bad shapes, ...): a 4xx / failed future naming
    the field."""


class NotFound(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = False  # the LM head is never adapted here (create_model logs a request for it)
    seed: int = 0


@dataclasses.dataclass
class TrainedModel:
    model_id: str
    lora: LoraSpec | None
    adapter: Adapter | None  # LoRA: its targets, scale and merge (its parameters live in `state`)
    state: TrainState  # the trained parameters (LoRA: the adapters) and their AdamW state; step: optim_steps
    grads: object = None
    pending: int = 0  # forward_backward calls accumulated since the last optim_step
    user_metadata: dict = dataclasses.field(default_factory=dict)
    last_request: float = dataclasses.field(default_factory=time.time)

    @property
    def step(self) -> int:
        return int(self.state.step)


def _bucket(n: int, least: int) -> int:
    """Next power of two >= max(n, least): few distinct shapes, so few compilations."""
    return 1 << max(int(n) - 1, least - 1).bit_length()


class ModelHost:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        is_main = jax.process_index() == 0
        inputs = check_run(cfg, is_main=is_main, need_data=False)
        self.engine = TrainEngine(cfg, inputs, is_main=is_main, serving=True)
        hf_config = inputs.hf_config
        self.model_type = hf_config.get("model_type")  # the checkpoint's architecture, as get_info reports it
        self.tokenizer = _tokenizer(cfg.model.tokenizer_path or cfg.model.model_path or cfg.model.config_path)
        self.stop_ids = _stop_ids(hf_config, self.tokenizer)
        self._sampler = None
        self._saves = 0
        self._closed_sessions: dict[str, str] = {}
        self.vocab_size = inputs.vocab_size
        self.lora_mode = bool(cfg.lora.enable_lora)
        source = cfg.model.model_path or cfg.model.config_path
        self.base_model = str(cfg.server.get("model_name") or os.path.basename(os.path.normpath(source)))
        self.tokenizer_id = os.path.abspath(cfg.model.tokenizer_path or source)
        self.max_lora_rank = int(cfg.server.get("max_lora_rank") or 0) or None
        self.storage = storage.Storage(os.path.join(cfg.train.output_dir, "server_checkpoints"))
        self.models: dict[str, TrainedModel] = {}
        # sampling sessions hold full weights each: the least recently used go beyond MAX_SAMPLING_SESSIONS (one
        # on saved weights is reopened from disk when asked again; a snapshot of live weights is gone)
        self.sampling_sessions: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._programs: dict = {}
        self._sample_counter = 0
        self._replicated = jax.sharding.NamedSharding(self.engine.mesh, jax.sharding.PartitionSpec())
        self._multiples = _batch_multiples(self.engine.mesh, self.engine.model_config)

    # ------------------------------------------------------------------------------------------- models
    def _adapter(self, spec: LoraSpec) -> Adapter:
        """A new adapter over the engine's frozen base: the server's target modules that `spec` trains."""
        names = list(self.cfg.lora.lora_target_modules)
        keep = [n for n in names
                if (n in ATTN_MODULES and spec.train_attn) or (n not in ATTN_MODULES and spec.train_mlp)]
        params_names = list(self.cfg.lora.lora_target_parameters) if spec.train_mlp else []
        if not keep and not params_names:
            raise UserError("lora_config: train_mlp and train_attn leave no layer to adapt on this server "
                            f"(its lora_target_modules: {', '.join(names)})")
        lcfg = dataclasses.replace(self.cfg.lora, lora_rank=spec.rank, lora_target_modules=keep,
                                   lora_target_parameters=params_names)
        return self.engine.new_adapter(lcfg, seed=spec.seed)

    def model(self, model_id: str, field: str = "model_id") -> TrainedModel:
        m = self.models.get(model_id)
        if m is None:
            raise NotFound(f"{field}: no model {model_id!r} on this server (create it first)")
        return m

    def create_model(self, model_id: str, lora_config: dict | None, user_metadata: dict | None = None) -> dict:
        if model_id in self.models:
            return self.info(model_id)
        if self.lora_mode:
            lc = dict(lora_config or {})
            rank = int(lc.get("rank") or self.cfg.lora.lora_rank)
            if rank < 1 or (self.max_lora_rank and rank > self.max_lora_rank):
                raise UserError(f"lora_config.rank: {rank} is outside 1..{self.max_lora_rank or 'any'}")
            seed = lc.get("seed")
            if lc.get("train_unembed", True):
                # the SDK asks for it by default; the LM head has no adapter here, so the model records false
                # (weights_info and saves say what was trained) and the log says so once per model
                log.warning("create_model %s: lora_config.train_unembed is true but this server does not adapt "
                            "the LM head; it trains the attention/MLP adapters only (recorded as "
                            "train_unembed=false)", model_id)
            spec = LoraSpec(rank, bool(lc.get("train_mlp", True)), bool(lc.get("train_attn", True)),
                            False, int(seed if seed is not None else len(self.models)))
            adapter = self._adapter(spec)
            state = self.engine.new_state(adapter.params, self.engine.optimizer)
            adapter = dataclasses.replace(adapter, params=None)  # the state holds (and trains) them
        else:
            others = [m for m in self.models if m != model_id]
            if others:
                raise UserError(f"base_model: this server trains all weights of one model and holds {others[0]} "
                                "already (LoRA mode serves several: lora.enable_lora)")
            spec, adapter, state = None, None, self.engine.state
        self.models[model_id] = TrainedModel(model_id, spec, adapter, state, user_metadata=dict(user_metadata or {}))
        log.info("created model %s (%s)", model_id, f"LoRA rank {spec.rank}" if spec else "all weights")
        return self.info(model_id)

    def info(self, model_id: str) -> dict:
        m = self.model(model_id)
        return {"type": "get_info", "model_id": model_id, "is_lora": m.lora is not None,
                "lora_rank": m.lora.rank if m.lora else None, "model_name": self.base_model,
                "model_data": {"arch": self.model_type,
                               "model_name": self.base_model, "tokenizer_id": self.tokenizer_id}}

    def unload(self, model_id: str) -> None:
        m = self.models.pop(model_id, None)
        if m is not None and m.lora is None:  # the weights stay; a model created on them starts a new optimizer
            params, m.state, self.engine.state = m.state.params, None, None  # (the old state freed first)
            self.engine.state = self.engine.new_state(params, self.engine.optimizer)

    def _weights(self):
        """The whole model's parameters: the frozen base (LoRA) or the one model's weights."""
        return self.engine.frozen if self.lora_mode else self.engine.state.params

    def _set_state(self, m: TrainedModel, state: TrainState) -> None:
        m.state = state
        if m.lora is None:  # full weights: the model's state is the engine's
            self.engine.state = state

    # ------------------------------------------------------------------------------------- the programs
    def _programs_of(self, lora: LoraSpec | None, adapter: Adapter | None) -> tuple[RequestSteps, Callable]:
        """(the engine's request steps, its merge of the adapters into the base) for a model of this shape: tenants
        whose adapters differ only in their seed share them (and their compiled programs)."""
        key = dataclasses.replace(lora, seed=0) if lora else None
        if key not in self._programs:
            self._programs[key] = self.engine.request_steps(adapter), self.engine.merger(adapter)
        return self._programs[key]

    # ------------------------------------------------------------------------------------------ batches
    def check_data(self, data: list[dict], loss_fn: str) -> list[int]:
        """Each datum's length; UserError naming the datum and field for anything the loss cannot use. Host-only
        (no device work): the HTTP layer runs it before queueing, so a malformed request is refused at once."""
        if loss_fn not in rl_losses.LOSS_NAMES:
            raise UserError(f"loss_fn: {loss_fn!r} is not served here; one of {', '.join(rl_losses.LOSS_NAMES)}")
        if not data:
            raise UserError("data: empty (no datums)")
        need, may = rl_losses.REQUIRED_INPUTS[loss_fn], rl_losses.OPTIONAL_INPUTS[loss_fn]
        lengths = []
        for i, d in enumerate(data):
            n = len(d["model_input"])
            if n == 0:
                raise UserError(f"data[{i}].model_input: empty")
            tokens = d["model_input"]
            if tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise UserError(f"data[{i}].model_input: token ids must be in 0..{self.vocab_size - 1}")
            for k in need:
                if k not in d["loss_fn_inputs"]:
                    raise UserError(f"data[{i}].loss_fn_inputs.{k}: missing ({loss_fn} needs {', '.join(need)})")
            for k, v in d["loss_fn_inputs"].items():
                if k not in need and k not in may:
                    raise UserError(f"data[{i}].loss_fn_inputs.{k}: not an input of {loss_fn} (it takes "
                                    f"{', '.join(need + may)})")
                if v.shape != (n,):
                    raise UserError(f"data[{i}].loss_fn_inputs.{k}: shape {list(v.shape)}, expected [{n}] (one value "
                                    "per model_input token)")
                if not np.all(np.isfinite(v)):
                    raise UserError(f"data[{i}].loss_fn_inputs.{k}: not finite")
            t = d["loss_fn_inputs"]["target_tokens"]
            if t.min() < 0 or t.max() >= self.vocab_size:
                raise UserError(f"data[{i}].loss_fn_inputs.target_tokens: token ids must be in "
                                f"0..{self.vocab_size - 1}")
            lengths.append(n)
        return lengths

    def batch(self, data: list[dict], loss_fn: str, config: dict[str, float]) -> tuple[dict, list[int]]:
        """Datums -> padded device arrays: input_ids, positions, segment_ids, targets, mask, and every loss input
        (weights, logprobs, advantages, clip thresholds per token, beta), those a request leaves out at their
        defaults (weights 1; thresholds and beta from the resolved loss config), so every loss has one layout."""
        lengths = self.check_data(data, loss_fn)
        rows, pieces, least = self._multiples
        B, T = _bucket(len(data), 1), _bucket(max(lengths), max(16, least))
        B, T = -(-B // rows) * rows, -(-T // pieces) * pieces
        defaults = {"weights": 1.0, "logprobs": 0.0, "advantages": 0.0,
                    "clip_low_threshold": config.get("clip_low_threshold", 0.0),
                    "clip_high_threshold": config.get("clip_high_threshold", 1.0)}
        arrays = {"input_ids": np.zeros((B, T), np.int32), "targets": np.zeros((B, T), np.int32),
                  "mask": np.zeros((B, T), np.float32),
                  **{k: np.full((B, T), v, np.float32) for k, v in defaults.items()}}
        for i, (d, n) in enumerate(zip(data, lengths)):
            arrays["input_ids"][i, :n] = d["model_input"]
            arrays["targets"][i, :n] = d["loss_fn_inputs"]["target_tokens"]
            arrays["mask"][i, :n] = 1
            for k in defaults:
                if k in d["loss_fn_inputs"]:
                    arrays[k][i, :n] = d["loss_fn_inputs"][k]
        arrays["positions"] = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
        arrays["segment_ids"] = np.ones((B, T), np.int32)  # causal: real tokens never see the padding after them
        arrays["beta"] = np.float32(config.get("beta", 0.0))
        return {k: jax.device_put(v, self._replicated) for k, v in arrays.items()}, lengths

    # ---------------------------------------------------------------------------------------- training
    def forward_backward(self, request: dict) -> bytes:
        """A decoded ForwardBackwardRequest (wire.decode_forward_backward) -> ForwardBackwardOutput bytes."""
        m = self.model(request["model_id"])
        loss_fn = request["loss_fn"]
        try:
            config = rl_losses.resolved_config(loss_fn, request["loss_fn_config"]) if loss_fn in \
                rl_losses.LOSS_NAMES else {}
        except ValueError as e:
            raise UserError(str(e)) from None
        batch, lengths = self.batch(request["data"], loss_fn, config)
        index = jnp.int32(rl_losses.LOSS_NAMES.index(loss_fn))
        steps, _ = self._programs_of(m.lora, m.adapter)
        if request["forward_only"]:
            value, lp = steps.forward(m.state.params, batch, index)
        else:
            grads, m.grads = m.grads, None  # donated: on a failure the model keeps no stale reference
            value, lp, m.grads = steps.forward_backward(m.state.params, grads, batch, index)
            m.pending += 1
        lp = np.asarray(jax.device_get(lp))
        m.last_request = time.time()
        outputs = [{"logprobs": lp[i, :n]} for i, n in enumerate(lengths)]
        return wire.encode_forward_backward_output(outputs, {"loss:sum": float(value)})

    def optim_step(self, model_id: str, adam: dict) -> dict:
        m = self.model(model_id)
        if m.grads is None:
            raise UserError("optim_step: no gradient accumulated since the last step (call forward_backward first)")
        hp = {"learning_rate": adam["learning_rate"], "b1": adam["beta1"], "b2": adam["beta2"], "eps": adam["eps"],
              "weight_decay": adam["weight_decay"]}
        hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
        grads, m.grads = m.grads, None
        steps, _ = self._programs_of(m.lora, m.adapter)
        state, norm = steps.update(m.state, grads, hp, jnp.float32(adam["grad_clip_norm"]))
        self._set_state(m, state)  # the old state was donated
        m.pending = 0
        m.last_request = time.time()
        return {"metrics": {"grad_norm:mean": float(norm), "learning_rate:mean": float(adam["learning_rate"])}}

    # ------------------------------------------------------------------------------------------ weights
    def _meta(self, m: TrainedModel, kind: str, has_optimizer: bool, user_metadata: dict | None) -> dict:
        return {"model_id": m.model_id, "base_model": self.base_model, "kind": kind, "time": storage.now_iso(),
                "is_lora": m.lora is not None, "lora": dataclasses.asdict(m.lora) if m.lora else None,
                "step": m.step, "has_optimizer": has_optimizer, "user_metadata": dict(user_metadata or {})}

    def save(self, model_id: str, segment: str, name: str, *, overwrite: bool = False,
             user_metadata: dict | None = None) -> str:
        """Write the model's weights (and, for a training save, its optimizer state) under tinker://model/seg/name:
        to a temporary directory first, renamed into place once complete."""
        m = self.model(model_id)
        final = self.storage.directory(model_id, segment, name)
        if os.path.exists(final) and not overwrite:
            raise UserError(f"path: {storage.tinker_path(model_id, segment, name)} exists (pass overwrite, or "
                            "another name)")
        self._saves += 1
        tmp = self.storage.temporary(final, str(self._saves))  # leftovers of an earlier run are removed at start
        with_opt = segment == "weights"
        meta = self._meta(m, storage.KINDS[segment], with_opt, user_metadata)
        try:
            save_params(os.path.join(tmp, "params"), _pure(m.state.params), metadata=meta)
            if with_opt:
                save_params(os.path.join(tmp, "optimizer"), _flat_state(m.state.opt_state), metadata=meta)
            if jax.process_index() == 0:
                storage.write_meta(tmp, meta)
                storage.Storage.publish(tmp, final, overwrite)
        except storage.PathError as e:
            raise UserError(str(e)) from None
        finally:
            if jax.process_index() == 0 and os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            if jax.process_count() > 1:  # nobody reads the save before process 0 has renamed it into place
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"server save {self._saves}")
        return storage.tinker_path(model_id, segment, name)

    def _read(self, path: str, model_id: str, lora: LoraSpec | None, params, opt_state=None, field: str = "path"):
        """(params, optimizer state or None, meta) of the save at `path`, read into the structure and shardings
        of `params` and, when given, of `opt_state` (a full-weight `params` is an nnx.State: filled in place)."""
        try:
            directory, meta = self.storage.resolve(path, field)
        except storage.PathError as e:
            raise NotFound(str(e)) from None
        want_lora = None if not meta.get("lora") else LoraSpec(**meta["lora"])
        if (want_lora is None) != (lora is None) or (want_lora and want_lora.rank != lora.rank):
            raise UserError(f"{field}: {path} holds {'LoRA rank %d' % want_lora.rank if want_lora else 'all weights'}"
                            f", model {model_id} has {'LoRA rank %d' % lora.rank if lora else 'all weights'}")
        shardings = jax.tree.map(lambda x: x.sharding, _pure(params))
        loaded = load_params(os.path.join(directory, "params"), _pure(params), shardings)
        if lora is None:
            nnx.replace_by_pure_dict(params, loaded)
            loaded = params
        if opt_state is not None:
            if not meta.get("has_optimizer"):
                raise UserError(f"{field}: {path} holds no optimizer state (a sampler save); load it without optimizer")
            flat = _flat_state(opt_state)
            got = load_params(os.path.join(directory, "optimizer"), flat,
                              {k: v.sharding for k, v in flat.items()})
            leaves = [got[f"{i:05d}"] for i in range(len(got))]
            opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
        return loaded, opt_state, meta

    def load(self, model_id: str, path: str, optimizer: bool) -> dict:
        m = self.model(model_id)
        params, opt_state, meta = self._read(path, model_id, m.lora, m.state.params,
                                             m.state.opt_state if optimizer else None)
        step = int(meta.get("step", 0)) if optimizer else m.step
        self._set_state(m, self.engine.new_state(params, self.engine.optimizer, step=step, opt_state=opt_state))
        m.grads, m.pending = None, 0
        return {"type": "load_weights", "path": path, "model_id": model_id}

    def meta_of(self, path: str, field: str = "path") -> dict:
        try:
            return self.storage.resolve(path, field)[1]
        except storage.PathError as e:
            raise NotFound(str(e)) from None

    # ----------------------------------------------------------------------------------------- sampling
    def sampling_params_of(self, m: TrainedModel):
        """Full parameters for sampling, a snapshot: the base with the model's adapters merged in (LoRA), or a copy
        of its weights (the next optim_step donates the live ones)."""
        if m.lora is None:
            return jax.tree.map(jnp.copy, m.state.params)
        _, merge = self._programs_of(m.lora, m.adapter)
        return merge(m.state.params)

    def open_sampler(self, session_id: str, *, model_id: str | None = None, path: str | None = None) -> dict:
        """A sampling session on a snapshot of a model's current weights (model_id) or of saved weights (path;
        None for both: the base model)."""
        if model_id is not None:
            params, source = self.sampling_params_of(self.model(model_id)), None
        elif path is not None:
            meta = self.meta_of(path, "model_path")
            spec = LoraSpec(**meta["lora"]) if meta.get("lora") else None
            if spec is not None:  # read into a new adapter's tree, then merged into the base
                adapter = self._adapter(spec)
                lora, _, _ = self._read(path, "<load>", spec, adapter.params, field="model_path")
                _, merge = self._programs_of(spec, adapter)
                params = merge(lora)
            else:  # read into a copy of the weights' tree (filled in place: not the model's own)
                params, _, _ = self._read(path, "<load>", None, jax.tree.map(lambda x: x, self._weights()),
                                          field="model_path")
            source = path
        else:  # LoRA: the frozen base; all weights: a copy of the one model's as they are now
            weights = self._weights()
            params, source = (weights if self.lora_mode else jax.tree.map(jnp.copy, weights)), None
        self.sampling_sessions[session_id] = {"params": params, "model_path": source}
        while len(self.sampling_sessions) > MAX_SAMPLING_SESSIONS:
            old, meta = self.sampling_sessions.popitem(last=False)
            if meta["model_path"] is not None:
                self._closed_sessions[old] = meta["model_path"]
        return {"sampler_id": session_id, "base_model": self.base_model, "model_path": source}

    def sample(self, session_id: str, prompt: np.ndarray, num_samples: int, params: dict,
               prompt_logprobs: bool) -> bytes:
        if session_id not in self.sampling_sessions and session_id in self._closed_sessions:
            self.open_sampler(session_id, path=self._closed_sessions.pop(session_id))
        s = self.sampling_sessions.get(session_id)
        if s is None:
            raise NotFound(f"sampling_session_id: no sampling session {session_id!r} on this server (or it was "
                           f"among the least recently used beyond the {MAX_SAMPLING_SESSIONS} kept)")
        self.sampling_sessions.move_to_end(session_id)
        if prompt.size == 0 or prompt.min() < 0 or prompt.max() >= self.vocab_size:
            raise UserError(f"prompt: token ids must be in 0..{self.vocab_size - 1} (and at least one)")
        seed = params.get("seed")
        if seed is None:
            self._sample_counter += 1
            seed = self._sample_counter  # the same on every process (they execute the same requests in order)
        if self._sampler is None:
            e = self.engine
            self._sampler = sampling.SessionSampler(e.graphdef, s["params"], mesh=e.mesh, rules=e.rules,
                                                    eos_token_ids=self.stop_ids, tokenizer=self.tokenizer)
        try:
            seqs, plp = self._sampler.sample(s["params"], prompt, num_samples, params, seed=int(seed),
                                             prompt_logprobs=prompt_logprobs)
        except ValueError as e:  # a stop sequence the sampler cannot use
            raise UserError(str(e)) from None
        return wire.encode_sample_response(seqs, plp)


def _batch_multiples(mesh, model_config) -> tuple[int, int, int]:
    """(rows: a multiple of the mesh's data-parallel size, tokens: a multiple of the pieces a context-parallel mesh
    splits each row into, the fewest tokens a row may have: every piece holds at least one token and, for Gated
    DeltaNet layers, the short convolution's halo). Padding rows and tokens are masked out of every loss."""
    ring, ulysses = int(mesh.shape.get("ring", 1)), int(mesh.shape.get("ulysses", 1))
    pieces = (2 * ring if ring > 1 else 1) * ulysses
    halo = int(getattr(model_config, "linear_conv_kernel_dim", 0) or 0) - 1
    return data_parallel_size(mesh), pieces, pieces * max(halo, 1)


def _pure(tree):
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _flat_state(opt_state) -> dict:
    """An optimizer state as {"00000": leaf, ...} (Orbax saves dicts; the structure comes from a fresh init)."""
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}


def _tokenizer(path: str | None):
    """The model's tokenizer (string stop sequences, end-of-turn token), or None when it has no tokenizer files."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a model without tokenizer files still trains and samples on token ids
        log.info("no tokenizer at %s (%s): stop sequences must be token ids", path, type(e).__name__)
        return None


def _stop_ids(hf_config: dict, tok) -> list[int]:
    """Sampling's default stop tokens: config.json's eos_token_id and the tokenizer's end of turn (<|im_end|>)."""
    ids = hf_config.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tok is not None:
        for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(t, int) and t >= 0 and t != tok.unk_token_id:
                ids.append(t)
    return sorted(set(ids))
