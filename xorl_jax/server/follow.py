"""Several processes (one per host, as for training): process 0 serves HTTP and runs the worker; before each
operation it sends the operation to every other process, which runs the same one, so the JAX programs of all
processes line up (each holds its shards of the same sharded arrays). Only process 0 answers the client and writes
checkpoint metadata; every process writes its own shards (Orbax).

The transport is JAX's own: `multihost_utils.broadcast_one_to_all` of the encoded operation (its length first,
then its bytes), over the same coordination the training run uses (`jax.distributed`; one node or SLURM).
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from xorl_jax.server import ops

log = logging.getLogger("xorl_jax.server")

STOP = b"__stop__"


def _broadcast(blob: bytes | None) -> bytes:
    from jax.experimental import multihost_utils

    is_source = jax.process_index() == 0
    n = np.array([len(blob) if is_source else 0], np.int64)
    n = int(multihost_utils.broadcast_one_to_all(n, is_source=is_source)[0])
    buf = np.frombuffer(blob, np.uint8).copy() if is_source else np.zeros(n, np.uint8)
    if n == 0:
        return b""
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=is_source)))


def send(op) -> None:
    """Process 0, before running `op` = (name, args): hand it to the other processes."""
    if op is None or jax.process_count() == 1:
        return
    name, args = op
    _broadcast(ops.encode(name, args))


def stop_followers() -> None:
    if jax.process_count() > 1 and jax.process_index() == 0:
        _broadcast(STOP)


def follow(host) -> None:
    """Processes other than 0: run every operation process 0 sends until it stops."""
    log.info("process %d follows process 0's operations", jax.process_index())
    while True:
        blob = _broadcast(None)
        if blob == STOP:
            return
        name, args = ops.decode(blob)
        try:
            ops.run(host, name, args)
        except Exception as e:  # noqa: BLE001 - process 0 reports it to the client; stay in step
            log.warning("operation %s failed here too: %s", name, e)
