"""The REST endpoints the `tinker` SDK calls, served with the standard library's threading HTTP server.

Each request is read (size-limited), authenticated (X-API-Key, when the server has a key), validated (a 4xx JSON
error `{"detail": "<field>: <problem>"}` for anything malformed; the server keeps serving) and either answered
at once (sessions, info, listings) or queued on the worker as an operation whose future the client polls.
Endpoints and shapes: docs/SERVER.md.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from xorl_jax import rl_losses
from xorl_jax.server import ops, storage, wire
from xorl_jax.server.futures import POLL_WAIT_S, FutureStore, Worker
from xorl_jax.server.host import ModelHost, UserError

log = logging.getLogger("xorl_jax.server")

PROTO = "application/x-protobuf"
DEFAULT_MAX_BODY = 64 * 2**20


class HTTPError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# ------------------------------------------------------------------------------------------------ validation
_MISSING = object()


def field(body: dict, name: str, kind, default=_MISSING, where: str = ""):
    """body[name] checked against `kind` (a type or tuple of types); 400 naming the field otherwise."""
    label = f"{where}{name}"
    if not isinstance(body, dict):
        raise HTTPError(400, f"{where.rstrip('.') or 'body'}: expected a JSON object")
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise HTTPError(400, f"{label}: missing")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise HTTPError(400, f"{label}: expected {'/'.join(k.__name__ for k in kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise HTTPError(400, f"{label}: expected {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def _tokens(model_input, where: str) -> list[int]:
    chunks = field(model_input, "chunks", list, where=f"{where}.")
    out = []
    for i, c in enumerate(chunks):
        kind = c.get("type", "encoded_text") if isinstance(c, dict) else None
        if kind != "encoded_text":
            raise HTTPError(400, f"{where}.chunks[{i}]: only encoded_text chunks are served (text models)")
        toks = field(c, "tokens", list, where=f"{where}.chunks[{i}].")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise HTTPError(400, f"{where}.chunks[{i}].tokens: expected integers")
        out.extend(toks)
    return out


def adam_params(body: dict) -> dict:
    p = body.get("adam_params", body.get("optim_params", body.get("optimizer_params")))
    if p is None:
        raise HTTPError(400, "adam_params: missing")
    if isinstance(p, dict) and p.get("type") not in (None, "adam", "adamw"):
        raise HTTPError(400, f"optimizer_params.type: {p.get('type')!r} is not served here (AdamW only)")
    out = {
        "learning_rate": field(p, "learning_rate", float, 1e-4, "adam_params."),
        "beta1": field(p, "beta1", float, 0.9, "adam_params."),
        "beta2": field(p, "beta2", float, 0.95, "adam_params."),
        "eps": field(p, "eps", float, 1e-12, "adam_params."),
        "weight_decay": field(p, "weight_decay", float, 0.0, "adam_params."),
        "grad_clip_norm": field(p, "grad_clip_norm", float, 0.0, "adam_params."),
    }
    for k, lo, hi in (("learning_rate", 0, float("inf")), ("beta1", 0, 1), ("beta2", 0, 1), ("eps", 0, 1),
                      ("weight_decay", 0, float("inf")), ("grad_clip_norm", 0, float("inf"))):
        v = out[k]
        if not (lo <= v < hi) or v != v:
            raise HTTPError(400, f"adam_params.{k}: {v} is outside [{lo}, {hi})")
    return out


def sampling_params(body: dict) -> dict:
    sp = field(body, "sampling_params", dict)
    out = {
        "max_tokens": field(sp, "max_tokens", int, 16, "sampling_params."),
        "temperature": field(sp, "temperature", float, 1.0, "sampling_params."),
        "top_k": field(sp, "top_k", int, -1, "sampling_params."),
        "top_p": field(sp, "top_p", float, 1.0, "sampling_params."),
        "seed": field(sp, "seed", int, None, "sampling_params."),
        "stop": sp.get("stop"),
    }
    if not 1 <= out["max_tokens"] <= 65536:
        raise HTTPError(400, f"sampling_params.max_tokens: {out['max_tokens']} is outside 1..65536")
    if not out["temperature"] >= 0:
        raise HTTPError(400, "sampling_params.temperature: must be >= 0")
    if not 0 < out["top_p"] <= 1:
        raise HTTPError(400, "sampling_params.top_p: must be in (0, 1]")
    stop = out["stop"]
    if isinstance(stop, str):
        stop = out["stop"] = [stop]
    if stop is not None and not (isinstance(stop, list) and all(
            (isinstance(s, int) and not isinstance(s, bool)) or (isinstance(s, str) and s) or (
                isinstance(s, list) and s and all(isinstance(t, int) for t in s)) for s in stop)):
        raise HTTPError(400, "sampling_params.stop: expected strings, token ids or token-id lists")
    return out


# ---------------------------------------------------------------------------------------------- the service
class Service:
    """State shared by the request threads: the host, the worker, futures, sessions."""

    def __init__(self, host: ModelHost, worker: Worker, store: FutureStore, *, api_key: str | None,
                 max_body: int = DEFAULT_MAX_BODY):
        self.host, self.worker, self.store = host, worker, store
        self.api_key = api_key
        self.max_body = max_body
        self.sessions: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.started = time.time()

    # sessions -----------------------------------------------------------------------------------------
    def session(self, session_id, field_name="session_id") -> dict:
        s = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None:
            raise HTTPError(404, f"{field_name}: no session {session_id!r} on this server")
        return s

    def submit(self, kind: str, name: str, args: dict, extra: dict | None = None) -> dict:
        f = self.worker.submit(kind, lambda: ops.run(self.host, name, args), op=(name, args))
        return {"request_id": f.request_id, **(extra or {})}

    def run_now(self, kind: str, name: str, args: dict):
        """Queue an operation and wait for it (endpoints whose answer is not a future)."""
        f = self.worker.submit(kind, lambda: ops.run(self.host, name, args), op=(name, args))
        f.done.wait()
        if f.error:
            raise HTTPError(400 if f.category == "user" else 500, f.error)
        return f.result


ROUTES: list[tuple[str, re.Pattern, str]] = []


def route(method: str, pattern: str):
    def deco(fn):
        ROUTES.append((method, re.compile(f"^{pattern}$"), fn.__name__))
        return fn
    return deco


class Endpoints:
    """One method per endpoint: (service, body (dict or bytes), path groups) -> (status, JSON dict or bytes)."""

    @route("GET", "/api/v1/healthz")
    def healthz(svc, body, *_):
        return {"status": "ok"}

    @route("POST", "/api/v1/client/config")
    def client_config(svc, body, *_):
        # chunks of one forward_backward arrive one after another (their order is the order they run in);
        # plain httpx; API keys (no JWT exchange); results come from retrieve_future
        return {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": False, "proto_compress_fwdbwd": False,
                "use_pyqwest_transport": False, "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False, "sample_join_sampling_session": False,
                "fwdbwd_max_chunk_bytes_count": svc.max_body // 2}

    @route("POST", "/api/v1/client/dynamic_config")
    def client_dynamic_config(svc, body, *_):
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @route("GET", "/api/v1/get_server_capabilities")
    def get_server_capabilities(svc, body, *_):
        h = svc.host
        return {"supported_models": [{"model_name": h.base_model, "trainable": True, "sampleable": True,
                                      "max_context_length": int(getattr(h.model_config, "max_position_embeddings",
                                                                        0) or 0) or None}]}

    @route("POST", "/api/v1/telemetry")
    def telemetry(svc, body, *_):
        return {"status": "accepted"}

    @route("POST", "/api/v1/create_session")
    def create_session(svc, body, *_):
        sid = uuid.uuid4().hex[:16]
        with svc.lock:
            svc.sessions[sid] = {"models": [], "samplers": [], "heartbeat": time.time(), "finished": False,
                                 "user_metadata": body.get("user_metadata") if isinstance(body, dict) else None,
                                 "display_name": body.get("display_name") if isinstance(body, dict) else None}
        log.info("session %s opened (sdk %s)", sid, body.get("sdk_version") if isinstance(body, dict) else "?")
        return {"type": "create_session", "session_id": sid}

    @route("POST", "/api/v1/session_heartbeat")
    def session_heartbeat(svc, body, *_):
        s = svc.session(field(body, "session_id", str))
        if s["finished"]:
            raise HTTPError(410, "session_id: the session has finished")
        s["heartbeat"] = time.time()
        return {"type": "session_heartbeat"}

    @route("POST", "/api/v1/sessions/([^/]+)/finish")
    def finish_session(svc, body, sid):
        """A closed ServiceClient: its models and sampling sessions are dropped (their saved weights stay)."""
        s = svc.session(sid)
        if not s["finished"]:
            s["finished"] = True
            svc.submit("FinishSession", "finish_session", {"model_ids": list(s["models"]),
                                                           "sampling_session_ids": list(s["samplers"])})
        return {}

    @route("GET", "/api/v1/sessions/([^/]+)")
    def get_session(svc, body, sid):
        s = svc.session(sid)
        return {"training_run_ids": list(s["models"]), "sampler_ids": list(s["samplers"]),
                "user_metadata": s["user_metadata"], "display_name": s["display_name"]}

    @route("POST", "/api/v1/cancel_future")
    def cancel_future(svc, body, *_):
        return {}

    # models -------------------------------------------------------------------------------------------
    @route("POST", "/api/v1/create_model")
    def create_model(svc, body, *_):
        sid = field(body, "session_id", str)
        s = svc.session(sid)
        seq = field(body, "model_seq_id", int)
        base = field(body, "base_model", str)
        if base != svc.host.base_model:
            raise HTTPError(400, f"base_model: this server trains {svc.host.base_model!r}, not {base!r}")
        lora = field(body, "lora_config", dict, None)
        opt = field(body, "optimizer_config", dict, {"type": "adamw"})
        if opt.get("type", "adamw") != "adamw":
            raise HTTPError(400, f"optimizer_config.type: {opt.get('type')!r} is not served here (adamw only)")
        if lora is not None:
            rank = field(lora, "rank", int, where="lora_config.")
            if rank < 1:
                raise HTTPError(400, f"lora_config.rank: {rank} must be >= 1")
        model_id = f"{sid}:train:{seq}"
        s["models"].append(model_id)
        return svc.submit("CreateModel", "create_model", {"model_id": model_id, "lora_config": lora,
                                                          "user_metadata": body.get("user_metadata")},
                          {"model_id": model_id})

    @route("POST", "/api/v1/get_info")
    def get_info(svc, body, *_):
        mid = field(body, "model_id", str)
        if mid not in svc.host.models:
            raise HTTPError(404, f"model_id: no model {mid!r} on this server")
        return svc.host.info(mid)

    @route("POST", "/api/v1/unload_model")
    def unload_model(svc, body, *_):
        mid = field(body, "model_id", str)
        return svc.submit("UnloadModel", "unload", {"model_id": mid}, {"model_id": mid})

    # training -----------------------------------------------------------------------------------------
    @route("POST", "/api/v1/forward_backward")
    def forward_backward(svc, body, *_):
        if not isinstance(body, bytes):
            raise HTTPError(415, f"body: forward_backward takes a protobuf ForwardBackwardRequest ({PROTO})")
        try:
            request = wire.decode_forward_backward(body)
        except wire.WireError as e:
            raise HTTPError(400, str(e)) from None
        try:
            rl_losses.resolved_config(request["loss_fn"], request["loss_fn_config"]) \
                if request["loss_fn"] in rl_losses.LOSS_NAMES else None
            svc.host.check_data(request["data"], request["loss_fn"])
        except (UserError, ValueError) as e:
            raise HTTPError(400, str(e)) from None
        kind = "Forward" if request["forward_only"] else "ForwardBackward"
        return svc.submit(kind, "forward_backward", {"body": body}, {"model_id": request["model_id"]})

    @route("POST", "/api/v1/optim_step")
    def optim_step(svc, body, *_):
        mid = field(body, "model_id", str)
        return svc.submit("OptimStep", "optim_step", {"model_id": mid, "adam": adam_params(body)}, {"model_id": mid})

    # weights ------------------------------------------------------------------------------------------
    @route("POST", "/api/v1/save_weights")
    def save_weights(svc, body, *_):
        mid = field(body, "model_id", str)
        name = field(body, "path", str, None) or f"step-{uuid.uuid4().hex[:8]}"
        try:
            storage.check_name(name)
        except storage.PathError as e:
            raise HTTPError(400, str(e)) from None
        return svc.submit("SaveWeights", "save", {
            "model_id": mid, "segment": "weights", "name": name, "overwrite": bool(body.get("overwrite")),
            "user_metadata": body.get("user_metadata"), "response_type": "save_weights"}, {"model_id": mid})

    @route("POST", "/api/v1/save_weights_for_sampler")
    def save_weights_for_sampler(svc, body, *_):
        mid = field(body, "model_id", str)
        name = field(body, "path", str, None)
        if name is None:  # a sampling session on the current weights, nothing written
            seq = field(body, "sampling_session_seq_id", int)
            sid = mid.split(":train:")[0]
            session_id = f"{sid}:sample:{seq}"
            if sid in svc.sessions:
                svc.sessions[sid]["samplers"].append(session_id)
            return svc.submit("SaveWeightsForSampler", "snapshot_sampler",
                              {"model_id": mid, "sampling_session_id": session_id}, {"model_id": mid})
        try:
            storage.check_name(name)
        except storage.PathError as e:
            raise HTTPError(400, str(e)) from None
        return svc.submit("SaveWeightsForSampler", "save", {
            "model_id": mid, "segment": "sampler_weights", "name": name, "overwrite": True,
            "user_metadata": body.get("user_metadata"), "response_type": "save_weights_for_sampler"},
            {"model_id": mid})

    @route("POST", "/api/v1/load_weights")
    def load_weights(svc, body, *_):
        path = field(body, "path", str)
        optimizer = field(body, "optimizer", bool, False)
        try:
            storage.parse(path)
        except storage.PathError as e:
            raise HTTPError(400, str(e)) from None
        sid = field(body, "session_id", str, None)
        if sid is not None:  # create-via-load: the load is the model's first request
            svc.session(sid)
            mid = f"{sid}:train:{field(body, 'model_seq_id', int)}"
            svc.sessions[sid]["models"].append(mid)
            args = {"model_id": mid, "path": path, "optimizer": optimizer, "create": True,
                    "user_metadata": body.get("user_metadata")}
        else:
            mid = field(body, "model_id", str)
            args = {"model_id": mid, "path": path, "optimizer": optimizer}
        return svc.submit("LoadWeights", "load", args, {"model_id": mid})

    @route("POST", "/api/v1/weights_info")
    def weights_info(svc, body, *_):
        path = field(body, "tinker_path", str)
        try:
            _, meta = svc.host.storage.resolve(path, "tinker_path")
        except storage.PathError as e:
            raise HTTPError(404, str(e)) from None
        lora = meta.get("lora") or {}
        return {"base_model": meta["base_model"], "is_lora": bool(lora), "lora_rank": lora.get("rank"),
                "train_mlp": lora.get("train_mlp"), "train_attn": lora.get("train_attn"),
                "train_unembed": lora.get("train_unembed")}

    @route("GET", "/api/v1/training_runs/([^/]+)/checkpoints")
    def list_checkpoints(svc, body, mid):
        return {"checkpoints": svc.host.storage.list(mid)}

    @route("DELETE", "/api/v1/training_runs/([^/]+)/checkpoints/(.+)")
    def delete_checkpoint(svc, body, mid, cid):
        try:
            svc.host.storage.delete(mid, cid)
        except storage.PathError as e:
            raise HTTPError(404, str(e)) from None
        return {}

    @route("GET", "/api/v1/checkpoints")
    def list_user_checkpoints(svc, body, *_, query=None):
        items = svc.host.storage.list()
        offset, limit = _page(query, len(items))
        return {"checkpoints": items[offset:offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(items)}}

    @route("GET", "/api/v1/training_runs/([^/]+)")
    def get_training_run(svc, body, mid):
        return _training_run(svc, mid)

    @route("GET", "/api/v1/training_runs")
    def list_training_runs(svc, body, *_, query=None):
        ids = sorted(set(svc.host.models) | set(_saved_ids(svc)))
        runs = [_training_run(svc, m) for m in ids]
        offset, limit = _page(query, len(runs))
        return {"training_runs": runs[offset:offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    # sampling -----------------------------------------------------------------------------------------
    @route("POST", "/api/v1/create_sampling_session")
    def create_sampling_session(svc, body, *_):
        sid = field(body, "session_id", str)
        s = svc.session(sid)
        seq = field(body, "sampling_session_seq_id", int)
        path = field(body, "model_path", str, None)
        base = field(body, "base_model", str, None)
        if path is None and base is not None and base != svc.host.base_model:
            raise HTTPError(400, f"base_model: this server samples {svc.host.base_model!r}, not {base!r}")
        if path is not None:
            try:
                svc.host.storage.resolve(path, "model_path")
            except storage.PathError as e:
                raise HTTPError(404, str(e)) from None
        session_id = f"{sid}:sample:{seq}"
        svc.run_now("CreateSamplingSession", "open_sampler", {"sampling_session_id": session_id, "model_path": path})
        s["samplers"].append(session_id)
        return {"type": "create_sampling_session", "sampling_session_id": session_id}

    @route("GET", "/api/v1/samplers/([^/]+)")
    def get_sampler(svc, body, sampler_id):
        s = svc.host.sampling_sessions.get(sampler_id)
        path = s["model_path"] if s is not None else svc.host._closed_sessions.get(sampler_id)
        if s is None and path is None:
            raise HTTPError(404, f"sampler_id: no sampling session {sampler_id!r} on this server")
        return {"sampler_id": sampler_id, "base_model": svc.host.base_model, "model_path": path}

    @route("POST", "/api/v1/asample")
    def asample(svc, body, *_):
        session_id = field(body, "sampling_session_id", str, None)
        if session_id is None:
            raise HTTPError(400, "sampling_session_id: missing (create a sampling session first)")
        if session_id not in svc.host.sampling_sessions and session_id not in svc.host._closed_sessions:
            raise HTTPError(404, f"sampling_session_id: no sampling session {session_id!r} on this server")
        n = field(body, "num_samples", int, 1)
        if not 1 <= n <= 1024:
            raise HTTPError(400, f"num_samples: {n} is outside 1..1024")
        prompt = _tokens(field(body, "prompt", dict), "prompt")
        if not prompt:
            raise HTTPError(400, "prompt: empty")
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(unsupported):
                raise HTTPError(400, f"{unsupported}: not served here")
        if body.get("target_prompt_logprobs") is not None or body.get("prompt_logprobs_last_n") is not None:
            raise HTTPError(400, "target_prompt_logprobs / prompt_logprobs_last_n: not served here")
        args = {"sampling_session_id": session_id, "prompt": prompt, "num_samples": n,
                "sampling_params": sampling_params(body), "prompt_logprobs": bool(body.get("prompt_logprobs"))}
        reply = svc.submit("Sample", "sample", args)
        reply["sample_sequence_ids"] = [f"{reply['request_id']}:{i}" for i in range(n)]
        return reply

    # futures ------------------------------------------------------------------------------------------
    @route("POST", "/api/v1/retrieve_future")
    def retrieve_future(svc, body, *_):
        rid = field(body, "request_id", str)
        f = svc.store.get(rid)
        if f is None:
            raise HTTPError(404, f"request_id: no request {rid!r} on this server (unknown, or expired)")
        if not f.done.wait(POLL_WAIT_S):
            return {"type": "try_again", "request_id": rid, "queue_state": "active"}
        if f.error is not None:
            return {"error": f.error, "category": f.category}
        return f.result


def _page(query, total) -> tuple[int, int]:
    try:
        offset = int((query or {}).get("offset", ["0"])[0])
        limit = int((query or {}).get("limit", [str(max(total, 1))])[0])
    except ValueError:
        raise HTTPError(400, "offset/limit: expected integers") from None
    return max(offset, 0), max(limit, 0)


def _saved_ids(svc) -> list[str]:
    return sorted({c["tinker_path"][len("tinker://"):].split("/")[0] for c in svc.host.storage.list()})


def _training_run(svc, mid: str) -> dict:
    m = svc.host.models.get(mid)
    saved = svc.host.storage.list(mid)
    if m is None and not saved:
        raise HTTPError(404, f"training_run_id: no training run {mid!r} on this server")
    last = {k: next((c for c in saved if c["checkpoint_type"] == k), None) for k in ("training", "sampler")}
    lora = m.lora if m is not None else None
    return {"training_run_id": mid, "base_model": svc.host.base_model, "model_owner": "local",
            "is_lora": svc.host.lora_mode, "lora_rank": lora.rank if lora else None,
            "last_request_time": storage.dt.datetime.fromtimestamp(
                m.last_request if m else time.time(), storage.dt.timezone.utc).isoformat(),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
            "user_metadata": (m.user_metadata or None) if m else None}


_HANDLERS = {name: getattr(Endpoints, name) for _, _, name in ROUTES}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "xorl_jax"
    service: Service  # set on the subclass made by make_server

    def log_message(self, fmt, *args):  # the server's own log lines say what matters
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    def _serve(self, method: str):
        from urllib.parse import parse_qs, urlsplit

        status, payload = 500, {"detail": "internal error"}
        try:
            url = urlsplit(self.path)
            body = self._read_body()  # read first: an error reply on a connection with unread data breaks it
            self._authenticate()
            for m, pattern, name in ROUTES:
                match = pattern.match(url.path)
                if match and m == method:
                    kwargs = {"query": parse_qs(url.query)} if name in ("list_user_checkpoints",
                                                                        "list_training_runs") else {}
                    status, payload = 200, _HANDLERS[name](self.service, body, *match.groups(), **kwargs)
                    break
            else:
                known = any(p.match(url.path) for _, p, _ in ROUTES)
                raise HTTPError(405 if known else 404, f"{method} {url.path}: no such endpoint")
        except HTTPError as e:
            status, payload = e.status, {"detail": e.detail}
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("%s %s failed", method, self.path)
            status, payload = 500, {"detail": f"{type(e).__name__}: {e}"}
        self._reply(status, payload)

    def _read_body(self):
        if self.command == "GET" or self.command == "DELETE":
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(min(n, self.service.max_body))
            return {}
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise HTTPError(411, "Content-Length: required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "Content-Length: not an integer") from None
        if n > self.service.max_body or n < 0:
            self.close_connection = True  # the body is not read: this connection cannot carry another request
            raise HTTPError(413, f"body: {n} bytes is over this server's limit of {self.service.max_body}")
        raw = self.rfile.read(n)
        if self.headers.get("Content-Encoding", "identity") not in ("identity", ""):
            raise HTTPError(415, f"Content-Encoding: {self.headers['Content-Encoding']} is not served")
        if PROTO in (self.headers.get("Content-Type") or ""):
            return raw
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"body: not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "body: expected a JSON object")
        return body

    def _authenticate(self):
        key = self.service.api_key
        if key is None:
            return
        given = self.headers.get("X-API-Key") or ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise HTTPError(401, "X-API-Key: missing or wrong API key")

    def _reply(self, status: int, payload):
        if isinstance(payload, bytes):
            data, ctype = payload, PROTO
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # the client went away; its result stays in the future store for the next poll
            log.info("client %s disconnected before the reply to %s", self.address_string(), self.path)


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
