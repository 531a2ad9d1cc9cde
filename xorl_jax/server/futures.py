"""Futures and the worker: every model operation is queued, executed in arrival order by one thread (JAX programs
of one model are not run concurrently), and its result kept under a request id until the client fetches it.

The Tinker futures protocol: a POST that starts work answers `{"request_id": ...}` at once; the client then polls
`retrieve_future` with that id and gets `{"type": "try_again", ...}` while the work is queued or running (the
server holds each poll up to `POLL_WAIT_S` first, so a result goes out as soon as it exists), then the result (JSON,
or protobuf bytes for forward/backward and sampling outputs), or `{"error": ..., "category": ...}`.

A result stays retrievable after it was fetched (a client whose connection dropped mid-response asks again) until
`KEEP_S` after completion or until the store holds more than `MAX_KEPT` finished futures (oldest go first).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
import traceback
import uuid
from typing import Any, Callable

log = logging.getLogger("xorl_jax.server")

POLL_WAIT_S = 20.0  # the SDK's poll timeout is 45 s
KEEP_S = 3600.0
MAX_KEPT = 10000


@dataclasses.dataclass
class Future:
    request_id: str
    kind: str
    created: float = dataclasses.field(default_factory=time.time)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None  # dict (JSON) or bytes (protobuf)
    error: str | None = None
    category: str = "server"
    finished: float | None = None


class FutureStore:
    def __init__(self):
        self._lock = threading.Lock()
        self._futures: collections.OrderedDict[str, Future] = collections.OrderedDict()

    def new(self, kind: str) -> Future:
        f = Future(uuid.uuid4().hex, kind)
        with self._lock:
            self._futures[f.request_id] = f
            self._evict()
        return f

    def get(self, request_id: str) -> Future | None:
        with self._lock:
            return self._futures.get(request_id)

    def _evict(self):
        now = time.time()
        finished = [k for k, f in self._futures.items() if f.finished is not None]
        excess = max(0, len(finished) - MAX_KEPT)
        for k in finished:
            f = self._futures[k]
            if excess > 0 or now - f.finished > KEEP_S:
                del self._futures[k]
                excess -= 1

    def pending(self) -> int:
        with self._lock:
            return sum(1 for f in self._futures.values() if f.finished is None)


class Worker:
    """One thread running queued operations in order. `before_each(op)` runs first (multi-process: broadcast the
    operation to the other processes, which run the same one)."""

    def __init__(self, store: FutureStore, before_each: Callable | None = None):
        self.store = store
        self.before_each = before_each
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="xorl-server-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[], Any], op: Any = None) -> Future:
        f = self.store.new(kind)
        self._queue.put((f, fn, op))
        return f

    def stop(self):
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self):
        from xorl_jax.server.host import UserError

        while True:
            item = self._queue.get()
            if item is None:
                return
            f, fn, op = item
            t0 = time.perf_counter()
            try:
                if self.before_each is not None:
                    self.before_each(op)
                f.result = fn()
            except UserError as e:
                f.error, f.category = str(e), "user"
                log.info("%s %s refused: %s", f.kind, f.request_id[:8], e)
            except Exception as e:  # noqa: BLE001 - the server keeps serving; the client gets the error
                f.error, f.category = f"{type(e).__name__}: {e}", "server"
                log.error("%s %s failed:\n%s", f.kind, f.request_id[:8], traceback.format_exc())
            f.finished = time.time()
            f.done.set()
            log.debug("%s %s done in %.3f s", f.kind, f.request_id[:8], time.perf_counter() - t0)
