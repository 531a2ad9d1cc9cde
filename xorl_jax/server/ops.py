"""The operations the worker runs on the model host, as plain (name, args) records.

An operation is data, not a closure, so that with several processes rank 0 can send each one to the others
(xorl_jax.server.follow) and every process runs the same JAX programs in the same order. Args are JSON values;
bytes (the forward/backward protobuf body) travel base64-encoded.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from xorl_jax.server import wire
from xorl_jax.server.host import ModelHost


def encode(name: str, args: dict) -> bytes:
    def conv(v):
        if isinstance(v, bytes):
            return {"__bytes__": base64.b64encode(v).decode()}
        raise TypeError(f"cannot send {type(v).__name__}")
    return json.dumps({"name": name, "args": args}, default=conv).encode()


def decode(blob: bytes) -> tuple[str, dict]:
    def hook(d):
        return base64.b64decode(d["__bytes__"]) if set(d) == {"__bytes__"} else d
    op = json.loads(blob.decode(), object_hook=hook)
    return op["name"], op["args"]


def run(host: ModelHost, name: str, args: dict):
    """Execute one operation; returns its result (a JSON dict or protobuf bytes)."""
    if name == "create_model":
        info = host.create_model(args["model_id"], args.get("lora_config"), args.get("user_metadata"))
        return {"type": "create_model", "model_id": info["model_id"]}
    if name == "forward_backward":
        request = wire.decode_forward_backward(args["body"])
        return host.forward_backward(request)
    if name == "optim_step":
        return host.optim_step(args["model_id"], args["adam"])
    if name == "save":
        path = host.save(args["model_id"], args["segment"], args["name"], overwrite=args.get("overwrite", False),
                         user_metadata=args.get("user_metadata"))
        return {"type": args["response_type"], "path": path}
    if name == "snapshot_sampler":
        host.open_sampler(args["sampling_session_id"], model_id=args["model_id"])
        return {"type": "save_weights_for_sampler", "sampling_session_id": args["sampling_session_id"]}
    if name == "load":
        if args.get("create"):
            meta = host.meta_of(args["path"])
            host.create_model(args["model_id"], {"rank": meta["lora"]["rank"], **{
                k: meta["lora"][k] for k in ("train_mlp", "train_attn", "train_unembed", "seed")}}
                if meta.get("lora") else None, args.get("user_metadata"))
        return host.load(args["model_id"], args["path"], bool(args["optimizer"]))
    if name == "open_sampler":
        return host.open_sampler(args["sampling_session_id"], path=args.get("model_path"))
    if name == "sample":
        return host.sample(args["sampling_session_id"], np.asarray(args["prompt"], np.int64), args["num_samples"],
                           args["sampling_params"], bool(args.get("prompt_logprobs")))
    if name == "unload":
        host.unload(args["model_id"])
        return {}
    if name == "finish_session":
        for model_id in args["model_ids"]:
            host.unload(model_id)
        for session_id in args["sampling_session_ids"]:
            host.sampling_sessions.pop(session_id, None)
            host._closed_sessions.pop(session_id, None)
        return {}
    raise ValueError(f"unknown operation {name!r}")
