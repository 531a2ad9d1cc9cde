"""Rows to documents: token ids plus next-token targets (targets[t] = token to predict at t, -100 = no loss)."""
from __future__ import annotations

import numpy as np

from xorl_jax.data.chat import ChatFormat
from xorl_jax.data.sources import DataError
from xorl_jax.data.targets import IGNORE, shift_targets


_COLUMN_OF = {"tokenized": "input_ids", "messages": "messages", "text": "text"}


def _missing_column(row: dict, kind: str) -> DataError:
    """The row lacks its type's column: name it, and the type the row looks like when it has another's column."""
    other = next((k for k, col in _COLUMN_OF.items() if k != kind and row.get(col) is not None), None)
    hint = f"; the row has '{_COLUMN_OF[other]}': set this dataset's type: {other}" if other else ""
    columns = ", ".join(map(repr, list(row)[:8])) or "none"
    return DataError(f"a {kind} row needs the column '{_COLUMN_OF[kind]}' (its columns: {columns}){hint}")


def _int_list(value, name: str) -> np.ndarray:
    if value is None or isinstance(value, (str, bytes)):
        raise DataError(f"column {name!r} must be a list of token ids")
    try:
        given = np.asarray(value)
        with np.errstate(invalid="ignore"):  # NaN or inf: refused below
            arr = given.astype(np.int64, copy=False)
    except (TypeError, ValueError):
        raise DataError(f"column {name!r} must be a list of integers") from None
    if given.size and given.dtype.kind not in "iu" and (given.dtype.kind != "f" or np.any(arr != given)):
        # 1.5 would be read as 1, "7" or true as 7 or 1: not the token the row names
        bad = next((v for v in given.ravel().tolist() if not isinstance(v, float) or not v.is_integer()), None)
        raise DataError(f"column {name!r} must be a list of integers, got {bad!r}")
    if arr.ndim != 1:
        raise DataError(f"column {name!r} must be a flat list of token ids, got shape {arr.shape}")
    return arr


def _labels_are_shifted(ids: np.ndarray, labels: np.ndarray) -> bool:
    """xorl's test of a tokenized row: its first label (not -100) equal to the next input token means the labels are
    already next-token targets; equal to its own input token (HF's convention, checked second), or no label, means
    they are not. A first label equal to neither is taken as shifted, as xorl takes it."""
    valid = np.flatnonzero(labels[:-1] != IGNORE)
    if valid.size == 0:
        return False
    i = int(valid[0])
    return labels[i] == ids[i + 1] or labels[i] != ids[i]


def tokenized_doc(row: dict, vocab_size: int | None):
    if row.get("input_ids") is None:
        raise _missing_column(row, "tokenized")
    ids = _int_list(row["input_ids"], "input_ids")
    if len(ids) == 0:
        raise DataError("column 'input_ids' is empty")
    if "labels" in row and row["labels"] is not None:
        labels = _int_list(row["labels"], "labels")
        if len(labels) != len(ids):
            raise DataError(f"labels has {len(labels)} tokens but input_ids has {len(ids)}")
        if _labels_are_shifted(ids, labels):
            targets = labels  # already next-token targets: used as they are
        else:
            targets = np.full(len(ids), IGNORE, np.int64)
            targets[:-1] = labels[1:]  # HF convention: unshifted labels; the shift happens here
    else:
        targets = shift_targets(ids, np.ones(len(ids), bool))
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"input_ids outside [0, {vocab_size}) (min {ids.min()}, max {ids.max()})")
    return ids, targets


def text_of(row) -> str:
    """The checked 'text' column of a text row."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}")
    text = row.get("text")
    if text is None:
        raise _missing_column(row, "text")
    if not isinstance(text, str) or not text:
        raise DataError("column 'text' must be a non-empty string")
    return text


def text_docs(texts: list[str], tokenizer) -> list:
    """Documents of many texts from one tokenizer call (a fast tokenizer spreads a batch over its threads)."""
    docs = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = list(ids)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)  # the model learns where a document ends
        ids = np.asarray(ids, np.int64)
        docs.append((ids, shift_targets(ids, np.ones(len(ids), bool))))
    return docs


def text_doc(row: dict, tokenizer):
    return text_docs([text_of(row)], tokenizer)[0]


def messages_doc(row: dict, tokenizer, chat=None):
    """A conversation rendered with the chat template; trainable = each assistant turn's text and its end-of-turn
    token (see xorl_jax.data.chat and docs/DATA.md). `chat`: the dataset's ChatFormat (template, its variables,
    which turns); None = the tokenizer's template, every assistant turn."""
    if row.get("messages") is None:
        raise _missing_column(row, "messages")
    return (chat or ChatFormat(tokenizer)).document(row)


def row_to_doc(row, kind: str, tokenizer, vocab_size: int | None = None, chat=None):
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}")
    if kind == "tokenized":
        return tokenized_doc(row, vocab_size)
    if kind == "messages":
        return messages_doc(row, tokenizer, chat)
    if kind == "text":
        return text_doc(row, tokenizer)
    raise DataError(f"unknown dataset type {kind!r}; use tokenized, messages or text")
