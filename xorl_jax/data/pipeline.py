"""Train and eval iterators: documents from all datasets, shuffled per epoch, packed, split across processes.

Every process tokenizes the documents and packs the same rows (packing is a pure function of the seed and
the epoch), then keeps only its slice of each global batch: rows [p * B/P, (p + 1) * B/P) of batch b. The
iterator position is (epoch, batch index), so resuming is exact. The last batch of an epoch is completed with
all-padding rows, so every label token appears exactly once per epoch.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from xorl_jax.data import cache
from xorl_jax.data.chat import ChatFormat
from xorl_jax.data.documents import IGNORE, row_to_doc, text_docs, text_of
from xorl_jax.data.packing import build_row, pack_first_fit_decreasing, pack_sequential
from xorl_jax.data.sources import DataError, iter_rows
from xorl_jax.data.sources import setting as _get

logger = logging.getLogger(__name__)

DUMMY_DOCS = 1024
TEXT_BATCH = 256  # text rows per tokenizer call (Documents' default)


# Files that hold a tokenizer's vocabulary (fast tokenizer, sentencepiece, or BPE vocab + merges). Without one,
# transformers builds an empty tokenizer from tokenizer_config.json / config.json alone, and text encodes to nothing.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(path, *, key: str = "model.tokenizer_path"):
    """A fast tokenizer from a model or tokenizer directory (local files only, no remote code). `key`: the config
    key that named the directory, for the error messages."""
    from transformers import AutoTokenizer

    if not path or not os.path.isdir(os.path.expanduser(str(path))):
        raise DataError(f"tokenizer directory {path!r} ({key}) not found; set model.tokenizer_path to a directory "
                        "holding tokenizer.json")
    path = os.path.expanduser(str(path))
    if not any(os.path.isfile(os.path.join(path, name)) for name in VOCABULARY_FILES):
        raise DataError(f"{path} ({key}) holds no tokenizer files ({', '.join(VOCABULARY_FILES)}); set "
                        "model.tokenizer_path to the directory of the model's tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} ({key}): the tokenizer cannot be loaded ({first}); set model.tokenizer_path to "
                        "the directory of the model's tokenizer") from None
    if len(tokenizer) < 2:
        raise DataError(f"{path} ({key}): the tokenizer has {len(tokenizer)} tokens; set model.tokenizer_path to "
                        "the directory of the model's tokenizer")
    return tokenizer


def check_token_range(ids: np.ndarray, targets: np.ndarray, vocab_size: int) -> None:
    """Token ids and label ids (other than -100) must be rows of the model's embedding: [0, vocab_size)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"input_ids outside [0, {vocab_size}) (min {ids.min()}, max {ids.max()}); the model's "
                        f"config.json has vocab_size {vocab_size}: were these rows tokenized for another model?")
    labels = targets[targets != IGNORE]
    if labels.size and (labels.min() < 0 or labels.max() >= vocab_size):
        raise DataError(f"labels outside [0, {vocab_size}) and not {IGNORE} (min {labels.min()}, max "
                        f"{labels.max()}); the model's config.json has vocab_size {vocab_size}: use {IGNORE} for "
                        "tokens without a loss and ids below vocab_size for the others")


class Documents:
    """All documents of a list of dataset entries, tokenized, with long ones cut to their max length."""

    def __init__(self, dataset_cfgs, tokenizer, data_cfg, *, seed: int = 0, vocab_size: int | None = None,
                 text_batch: int = TEXT_BATCH, key: str = "data.datasets"):
        """`vocab_size`: the model's (token and label ids must be below it); None = the tokenizer's size.
        `text_batch`: text rows per tokenizer call (the documents are the same for any). `key`: the config key of
        `dataset_cfgs`, for the error messages."""
        self.text_batch = text_batch
        if not dataset_cfgs:
            raise DataError(f"{key} is empty; add at least one {{path, type}} entry")
        capacity = int(_get(data_cfg, "sample_packing_sequence_len"))
        cached = None
        if _get(data_cfg, "dataset_prepared_path"):
            path = cache.cache_file(_get(data_cfg, "dataset_prepared_path"),
                                    cache.cache_key(dataset_cfgs, tokenizer, data_cfg, seed, vocab_size=vocab_size))
            cached = cache.load(path)
        if cached is not None:
            self.ids, self.targets, stats = cached
            for name, value in stats.items():
                setattr(self, name, value)
            logger.info(f"data: tokenized documents from the cache {path}")
        else:
            self._tokenize(dataset_cfgs, tokenizer, data_cfg, seed, capacity, vocab_size)
        if not self.ids:
            dropped = getattr(self, "docs_dropped", 0)
            read, skipped = getattr(self, "rows_read", 0), getattr(self, "rows_skipped", 0)
            why = (f" ({dropped} longer than their max_seq_len were dropped: data.long_sequence_policy drop; "
                   f"raise max_seq_len or use truncate or split)" if dropped else
                   f" (all {read} rows were bad and skipped: data.skip_bad_rows; set it false to see the first "
                   f"one's error)" if read and skipped >= read else
                   f" (the files hold no rows); point {key} at files with rows" if not read else "")
            raise DataError(f"no documents read from {[_get(d, 'path') for d in dataset_cfgs]}{why}")
        if cached is None and _get(data_cfg, "dataset_prepared_path"):
            cache.save(path, self.ids, self.targets, {k: getattr(self, k) for k in cache.STATS})
        self.lengths = np.asarray([len(x) for x in self.ids], np.int64)
        msg = (f"data: {len(self.ids)} documents, {int(self.lengths.sum())} tokens from {self.rows_read} rows; "
               f"{self.rows_skipped} bad rows skipped; {getattr(self, 'docs_dropped', 0)} documents dropped, "
               f"{self.docs_truncated} truncated ({self.tokens_dropped} tokens dropped), {self.docs_split} split "
               f"(limit {capacity} tokens)")
        logger.info(msg)

    def _tokenize(self, dataset_cfgs, tokenizer, data_cfg, seed, capacity, vocab_size=None):
        policy = _get(data_cfg, "long_sequence_policy", "drop")
        if policy not in ("drop", "truncate", "split"):
            raise DataError(f"data.long_sequence_policy={policy!r}; use drop, truncate or split")
        skip_bad = bool(_get(data_cfg, "skip_bad_rows", False))
        columns = _get(data_cfg, "select_columns")
        vocab = vocab_size if vocab_size is not None else len(tokenizer) if tokenizer is not None else None
        self.ids: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.rows_read = self.rows_skipped = self.docs_truncated = self.docs_split = self.docs_dropped = 0
        self.tokens_dropped = 0
        for ds in dataset_cfgs:
            path, kind = _get(ds, "path"), _get(ds, "type", "tokenized")
            limit = min(int(_get(ds, "max_seq_len") or capacity), capacity)
            if path == "dummy":
                docs = self._dummy(vocab or 1024, limit, seed, _get(ds, "num_samples") or DUMMY_DOCS)
            else:
                docs = self._read(ds, path, kind, tokenizer, vocab, columns, skip_bad)
            dropped = self.docs_dropped
            for ids, targets in docs:
                self._add(ids, targets, limit, policy)
            if self.docs_dropped > dropped:
                logger.warning(f"data: {_get(ds, 'name') or path}: {self.docs_dropped - dropped} documents longer "
                               f"than {limit} tokens dropped (data.long_sequence_policy drop, as xorl drops "
                               f"samples longer than max_seq_len; truncate or split keep them)")

    def _read(self, ds, path, kind, tokenizer, vocab, columns, skip_bad):
        texts = []  # text rows wait for one batched tokenizer call
        if kind in ("messages", "text") and tokenizer is None:
            raise DataError(f"{path}: {kind} rows need a tokenizer; set model.tokenizer_path")
        chat = ChatFormat.for_dataset(ds, tokenizer) if kind == "messages" else None
        for where, row in iter_rows(path, split=_get(ds, "split", "train") or "train",
                                    data_files=_get(ds, "data_files"), columns=columns, name=_get(ds, "name"),
                                    revision=_get(ds, "revision")):
            self.rows_read += 1
            try:
                if isinstance(row, Exception):
                    raise row
                if columns and isinstance(row, dict):
                    row = {k: v for k, v in row.items() if k in columns or k in ("input_ids", "labels")}
                if kind == "text":
                    texts.append(text_of(row))
                    if len(texts) == self.text_batch:
                        yield from text_docs(texts, tokenizer)
                        texts = []
                    continue
                doc = row_to_doc(row, kind, tokenizer, None, chat)  # token ranges: checked here, labels too
                if vocab is not None and kind == "tokenized":
                    check_token_range(*doc, vocab)
                yield doc
            except DataError as e:
                self._bad_row(where, e, skip_bad)
        if texts:
            yield from text_docs(texts, tokenizer)

    def _bad_row(self, where: str, error: DataError, skip_bad: bool):
        text = str(error) if str(error).startswith(where) else f"{where}: {error}"
        if not skip_bad:
            raise DataError(f"{text} (set data.skip_bad_rows: true to skip such rows)") from None
        self.rows_skipped += 1
        if self.rows_skipped <= 5:
            logger.warning(f"skipping bad row {text}")

    @staticmethod
    def _dummy(vocab: int, limit: int, seed: int, count: int = DUMMY_DOCS):
        rng = np.random.default_rng([seed, 12345])
        for _ in range(count):
            n = int(rng.integers(max(2, limit // 8), limit + 1))
            ids = rng.integers(0, vocab, n, dtype=np.int64)
            targets = np.full(n, IGNORE, np.int64)
            targets[:-1] = ids[1:]
            yield ids, targets

    def _add(self, ids, targets, limit, policy):
        if len(ids) <= limit:
            self.ids.append(ids)
            self.targets.append(targets)
        elif policy == "drop":
            self.docs_dropped += 1
        elif policy == "truncate":
            self.docs_truncated += 1
            self.tokens_dropped += len(ids) - limit
            self.ids.append(ids[:limit])
            self.targets.append(targets[:limit])
        else:  # pieces keep their original targets: the label at a cut predicts the next piece's first token
            self.docs_split += 1
            for s in range(0, len(ids), limit):
                self.ids.append(ids[s:s + limit])
                self.targets.append(targets[s:s + limit])


def row_length(data_cfg) -> int:
    """Tokens per packed row, as xorl pads them: sample_packing_sequence_len (what documents fill) rounded up to a
    multiple of pad_to_multiple_of."""
    length = int(_get(data_cfg, "sample_packing_sequence_len"))
    multiple = int(_get(data_cfg, "pad_to_multiple_of", 1) or 1)
    return -(-length // multiple) * multiple


def _pack_epoch(docs: Documents, data_cfg, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    capacity = int(_get(data_cfg, "sample_packing_sequence_len"))
    n = len(docs.ids)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    method = _get(data_cfg, "sample_packing_method", "sequential")
    if method == "sequential":
        return pack_sequential(docs.lengths, order, capacity)
    if method == "multipack":
        rows = pack_first_fit_decreasing(docs.lengths, order, capacity)
        if shuffle:  # FFD emits the longest documents first; mix the rows
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows
    raise DataError(f"data.sample_packing_method={method!r}; use sequential or multipack")


# Batch entry (a Python int): the most segments in any row of the global batch, which the host turns into the
# packed attention layout of the step (kernels.attention.LayoutPlanner) on every process alike.
MAX_DOCUMENTS_KEY = "max_documents"


class _Batcher:
    def __init__(self, docs, data_cfg, global_batch_size, process_index, process_count, micro_batches=1):
        if global_batch_size % (process_count * micro_batches):
            raise DataError(f"global batch of {global_batch_size} rows does not split into {micro_batches} "
                            f"micro-batches over {process_count} processes; make it a multiple of their product")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} outside [0, {process_count})")
        self.docs, self.cfg = docs, data_cfg
        self.capacity = row_length(data_cfg)  # documents fill sample_packing_sequence_len; padding the rest
        self.global_batch_size = global_batch_size
        self.micro_batches = micro_batches
        self.micro_rows = global_batch_size // micro_batches  # rows of one global micro-batch
        self.local_micro_rows = self.micro_rows // process_count
        self.first = process_index * self.local_micro_rows

    def batches_in(self, rows) -> int:
        return -(-len(rows) // self.global_batch_size)

    def _segments(self, members) -> int:
        """Segments of a packed row (runs of its segment ids): its documents, and the padding unless they fill it."""
        return len(members) + (sum(len(self.docs.ids[i]) for i in members) < self.capacity)

    def batch(self, rows, b: int) -> dict:
        """This process's rows of global batch b, micro-batch major: its share of micro-batch 0, then of 1, ...
        so micro-batch a holds the same rows whatever the process count. MAX_DOCUMENTS_KEY: the most segments in
        any row of the whole global batch (every process packs every row, so all agree without talking)."""
        out = []
        starts = (b * self.global_batch_size + a * self.micro_rows + self.first for a in range(self.micro_batches))
        for r in (s + i for s in starts for i in range(self.local_micro_rows)):
            members = rows[r] if r < len(rows) else []
            out.append(build_row([(self.docs.ids[i], self.docs.targets[i]) for i in members], self.capacity))
        batch = {k: np.stack([row[k] for row in out]) for k in out[0]}
        first = b * self.global_batch_size
        batch[MAX_DOCUMENTS_KEY] = max(self._segments(rows[r] if r < len(rows) else [])
                                       for r in range(first, first + self.global_batch_size))
        return batch


class TrainIterator:
    """Endless packed batches (this process's rows), epochs reshuffled with (seed, epoch)."""

    def __init__(self, docs: Documents, data_cfg, *, global_batch_size, process_index=0, process_count=1,
                 seed=0, micro_batches=1):
        self.docs = docs
        self.cfg = data_cfg
        self.seed = int(seed)
        self.shuffle = bool(_get(data_cfg, "shuffle", True))
        self._batcher = _Batcher(docs, data_cfg, global_batch_size, process_index, process_count, micro_batches)
        self.epoch = 0
        self.batch_index = 0
        self._rows_epoch = None
        self._rows = self._pack(0)
        self.rows_per_epoch = len(self._rows)
        self.documents = len(docs.ids)
        self.documents_truncated = docs.docs_truncated
        self.documents_split = docs.docs_split
        self.rows_skipped = docs.rows_skipped
        fill = float(docs.lengths.sum()) / max(1, self.rows_per_epoch * self._batcher.capacity)
        logger.info(f"data: {self.rows_per_epoch} packed rows of {self._batcher.capacity} tokens per epoch "
                    f"({_get(data_cfg, 'sample_packing_method', 'sequential')}, {fill:.1%} filled)")

    def _pack(self, epoch):
        if self._rows_epoch != epoch:
            self._rows = _pack_epoch(self.docs, self.cfg, self.seed, epoch, self.shuffle)
            self._rows_epoch = epoch
        return self._rows

    @property
    def batches_per_epoch(self) -> int:
        return self._batcher.batches_in(self._rows)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self._pack(self.epoch)
        if self.batch_index >= self._batcher.batches_in(rows):
            self.epoch += 1
            self.batch_index = 0
            rows = self._pack(self.epoch)
        batch = self._batcher.batch(rows, self.batch_index)
        self.batch_index += 1
        return batch

    def get_state(self) -> dict:
        return {"epoch": int(self.epoch), "batch_index": int(self.batch_index), "seed": self.seed,
                "documents": self.documents}

    def set_state(self, state: dict):
        if state.get("seed", self.seed) != self.seed or state.get("documents", self.documents) != self.documents:
            logger.warning("data: resuming with a different seed or dataset than the checkpoint; the order differs")
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])


def build_train_iterator(data_cfg, tokenizer, *, global_batch_size, process_index=0, process_count=1, seed=None,
                         micro_batches=1, vocab_size=None):
    seed = _get(data_cfg, "seed", 0) if seed is None else seed
    docs = Documents(_get(data_cfg, "datasets"), tokenizer, data_cfg, seed=seed, vocab_size=vocab_size)
    return TrainIterator(docs, data_cfg, global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, seed=seed, micro_batches=micro_batches)


def build_eval_batches(data_cfg, tokenizer, *, global_batch_size, process_index=0, process_count=1,
                       vocab_size=None) -> list:
    """All eval documents once, in file order, packed the same way as training (no shuffle)."""
    docs = Documents(_get(data_cfg, "eval_datasets"), tokenizer, data_cfg, seed=0, vocab_size=vocab_size,
                     key="data.eval_datasets")
    rows = _pack_epoch(docs, data_cfg, 0, 0, shuffle=False)
    batcher = _Batcher(docs, data_cfg, global_batch_size, process_index, process_count)
    return [batcher.batch(rows, b) for b in range(batcher.batches_in(rows))]
