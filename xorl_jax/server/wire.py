"""The protobuf messages of the Tinker API that travel as `application/x-protobuf`, read and written by hand.

The SDK sends `forward_backward` requests as a protobuf `ForwardBackwardRequest` and accepts `ForwardBackwardOutput`
and `SampleResponse` results only as protobuf; everything else is JSON. The protobuf wire format is small (varints
and length-prefixed fields), so these few messages are encoded here from their field numbers, with no generated
code and no dependency. Field numbers follow the public schema (package `tinker_public`).

A malformed message raises WireError naming the field that could not be read.
"""

from __future__ import annotations

import struct

import numpy as np

# wire types
VARINT, I64, LEN, I32 = 0, 1, 2, 5

# DType enum of the schema
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
_NUMPY = {DTYPE_FLOAT32: np.float32, DTYPE_INT64: np.int64, DTYPE_INT32: np.int32}

STOP_REASON = {"stop": 0, "length": 1}


class WireError(ValueError):
    """A protobuf body that is not a valid message of the expected type; str(e) names the field."""


# ------------------------------------------------------------------------------------------------- reading
def _varint(buf: bytes, i: int, field: str) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError(f"{field}: truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes, what: str):
    """Yield (field number, wire type, value) of one message: ints for varints, bytes for length-delimited fields,
    raw 4/8 bytes for fixed-size ones."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i, what)
        num, wt = key >> 3, key & 7
        if wt == VARINT:
            value, i = _varint(buf, i, f"{what}.{num}")
        elif wt == LEN:
            n, i = _varint(buf, i, f"{what}.{num}")
            if i + n > len(buf):
                raise WireError(f"{what}.{num}: length {n} runs past the end of the message")
            value, i = buf[i:i + n], i + n
        elif wt == I64:
            value, i = buf[i:i + 8], i + 8
        elif wt == I32:
            value, i = buf[i:i + 4], i + 4
        else:
            raise WireError(f"{what}: field {num} has unsupported wire type {wt}")
        if i > len(buf):
            raise WireError(f"{what}.{num}: truncated")
        yield num, wt, value


def _expect(wt, want, field):
    if wt != want:
        raise WireError(f"{field}: wrong wire type {wt}")


def _tensor(buf: bytes, field: str) -> np.ndarray:
    dense = sparse = None
    dtype, shape = 0, []
    for num, wt, v in fields(buf, field):
        if num == 1:
            _expect(wt, LEN, f"{field}.dense")
            dense = v
        elif num == 2:
            _expect(wt, LEN, f"{field}.sparse_csr")
            sparse = v
        elif num == 3:
            dtype = v
        elif num == 4:  # repeated int64, packed or not
            if wt == LEN:
                j = 0
                while j < len(v):
                    s, j = _varint(v, j, f"{field}.shape")
                    shape.append(s)
            else:
                shape.append(v)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        raise WireError(f"{field}.dtype: unsupported dtype {dtype} (float32 or int64)")
    if sparse is not None:
        parts = {1: b"", 2: b"", 3: b""}
        for num, wt, v in fields(sparse, f"{field}.sparse_csr"):
            parts[num] = v
        if len(shape) != 2:
            raise WireError(f"{field}.shape: a sparse tensor needs a 2-d shape, got {shape}")
        values = _frombuffer(parts[1], np_dtype, f"{field}.sparse_csr.values")
        crow = _frombuffer(parts[2], np.int64, f"{field}.sparse_csr.crow_indices")
        col = _frombuffer(parts[3], np.int64, f"{field}.sparse_csr.col_indices")
        out = np.zeros(shape, np_dtype)
        if len(crow) != shape[0] + 1 or len(col) != len(values) or (len(crow) and crow[-1] != len(values)):
            raise WireError(f"{field}.sparse_csr: indices do not match the shape {shape}")
        if len(col) and (col.min() < 0 or col.max() >= shape[1]):
            raise WireError(f"{field}.sparse_csr.col_indices: out of range for shape {shape}")
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        out[rows, col] = values
        return out
    arr = _frombuffer(dense or b"", np_dtype, f"{field}.dense")
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise WireError(f"{field}.shape: {shape} does not hold {arr.size} values")
        arr = arr.reshape(shape)
    return arr


def _frombuffer(b: bytes, dtype, field: str) -> np.ndarray:
    if len(b) % np.dtype(dtype).itemsize:
        raise WireError(f"{field}: {len(b)} bytes is not a whole number of {np.dtype(dtype).name} values")
    return np.frombuffer(b, dtype).copy()


def _chunk_tokens(buf: bytes, field: str) -> np.ndarray:
    for num, wt, v in fields(buf, field):
        if num == 1:
            for n2, wt2, v2 in fields(v, f"{field}.encoded_text"):
                if n2 == 1:
                    return _frombuffer(v2, np.int32, f"{field}.encoded_text.tokens").astype(np.int64)
            return np.zeros(0, np.int64)
        if num in (2, 3):
            raise WireError(f"{field}: image and audio chunks are not supported (text models only)")
    return np.zeros(0, np.int64)


def _map_entry(buf: bytes, field: str) -> tuple[str, bytes | int, int]:
    key, value, vwt = "", b"", LEN
    for num, wt, v in fields(buf, field):
        if num == 1:
            _expect(wt, LEN, f"{field}.key")
            key = v.decode("utf-8", "replace")
        elif num == 2:
            value, vwt = v, wt
    return key, value, vwt


def decode_forward_backward(buf: bytes) -> dict:
    """ForwardBackwardRequest -> {"model_id", "seq_id", "loss_fn", "loss_fn_config", "forward_only",
    "data": [{"model_input": int64 array, "loss_fn_inputs": {name: array}}]}."""
    out = {"model_id": "", "seq_id": 0, "loss_fn": "", "loss_fn_config": {}, "forward_only": False, "data": []}
    config_v1, config_v2 = {}, {}
    for num, wt, v in fields(buf, "ForwardBackwardRequest"):
        if num == 1:
            out["model_id"] = v.decode("utf-8", "replace")
        elif num == 2:
            out["seq_id"] = v
        elif num == 3:
            out["data"].append(_datum(v, f"data[{len(out['data'])}]"))
        elif num == 4:
            out["loss_fn"] = v.decode("utf-8", "replace")
        elif num == 5:
            k, val, vwt = _map_entry(v, "loss_fn_config")
            if vwt != I64:
                raise WireError(f"loss_fn_config.{k}: not a number")
            config_v1[k] = struct.unpack("<d", val)[0]
        elif num == 6:
            out["forward_only"] = bool(v)
        elif num == 7:
            k, val, _ = _map_entry(v, "loss_fn_config_v2")
            for n2, wt2, v2 in fields(val, f"loss_fn_config.{k}"):
                if n2 == 1:
                    config_v2[k] = struct.unpack("<d", v2)[0]
                elif n2 == 2:
                    config_v2[k] = v2.decode("utf-8", "replace")
    out["loss_fn_config"] = config_v2 or config_v1  # the SDK writes both; v2 carries strings too
    return out


def _datum(buf: bytes, field: str) -> dict:
    chunks, inputs = [], {}
    for num, wt, v in fields(buf, field):
        if num == 1:
            chunks.append(_chunk_tokens(v, f"{field}.model_input.chunks[{len(chunks)}]"))
        elif num == 2:
            k, val, _ = _map_entry(v, f"{field}.loss_fn_inputs")
            inputs[k] = _tensor(val, f"{field}.loss_fn_inputs.{k}")
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return {"model_input": tokens, "loss_fn_inputs": inputs}


# ------------------------------------------------------------------------------------------------- writing
def _key(num: int, wt: int) -> bytes:
    return _enc_varint(num << 3 | wt)


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _key(num, LEN) + _enc_varint(len(payload)) + payload


def _varint_field(num: int, v: int) -> bytes:
    return _key(num, VARINT) + _enc_varint(v)


def _batched_tensor(arrays: list[np.ndarray], dtype: int) -> bytes:
    np_dtype = _NUMPY[dtype]
    flat = [np.ascontiguousarray(a, np_dtype).reshape(-1) for a in arrays]
    offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in flat])]).astype(np.int64)
    data = b"".join(a.tobytes() for a in flat)
    return _len_field(1, data) + _len_field(2, offsets.tobytes()) + _varint_field(3, dtype)


def encode_forward_backward_output(per_datum: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord holding each output field of every datum (1-d float32 arrays)."""
    record = bytearray()
    if per_datum:
        for name in per_datum[0]:
            bt = _batched_tensor([d[name] for d in per_datum], DTYPE_FLOAT32)
            record += _len_field(2, _len_field(1, name.encode()) + _len_field(2, bt))
    record += _varint_field(3, len(per_datum))
    out = _len_field(1, b"ArrayRecord") + _len_field(2, bytes(record))
    for k, v in metrics.items():
        out += _len_field(3, _len_field(1, k.encode()) + _key(2, I64) + struct.pack("<d", float(v)))
    return out


def encode_sample_response(sequences: list[dict], prompt_logprobs: np.ndarray | None = None) -> bytes:
    """SampleResponse from [{"tokens": int array, "logprobs": float array, "stop_reason": "stop" | "length"}]."""
    out = bytearray()
    for s in sequences:
        seq = _varint_field(1, STOP_REASON[s["stop_reason"]])
        seq += _len_field(2, np.asarray(s["tokens"], np.int32).tobytes())
        seq += _len_field(3, np.asarray(s["logprobs"], np.float32).tobytes())
        out += _len_field(1, seq)
    if prompt_logprobs is not None:
        out += _len_field(2, np.asarray(prompt_logprobs, np.float32).tobytes())
    return bytes(out)
