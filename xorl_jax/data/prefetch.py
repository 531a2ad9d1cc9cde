"""Batches prepared ahead on a background thread (`data.dataloader_num_workers` > 0).

The device runs step n while the host packs and stacks batch n + 1..n + depth. Resume stays exact: `get_state`
is the position after the last batch handed to the trainer, not after the last one prepared.
"""
from __future__ import annotations

import queue
import threading

_DONE = object()


class Prefetcher:
    def __init__(self, iterator, depth: int, transform=None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._it = iterator
        self._transform = transform or (lambda batch: batch)  # e.g. the copy to the devices, also done ahead
        self._depth = depth
        self._state = iterator.get_state()
        self._start()

    def _start(self):
        self._queue: queue.Queue = queue.Queue(self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="xorl-data-prefetch", daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            while not self._stop.is_set():
                item = (self._transform(next(self._it)), self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put((_DONE, e))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._stop.is_set():  # closed earlier: start again from the last batch handed out
            self.set_state(self._state)
        batch, state = self._queue.get()
        if batch is _DONE:
            self._queue.put((batch, state))  # every later call raises too
            raise state
        self._state = state
        return batch

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict):
        self.close()
        self._it.set_state(state)
        self._state = self._it.get_state()
        self._start()

    def close(self):
        """Stop the worker; batches it prepared and nobody took are dropped (get_state does not count them)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def __getattr__(self, name):  # rows_per_epoch, batches_per_epoch, ... of the wrapped iterator
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._it, name)
