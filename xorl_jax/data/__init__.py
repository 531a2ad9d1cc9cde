"""Data pipeline: sources (jsonl, parquet, HF datasets on disk), chat template + loss mask, packing."""
from xorl_jax.data.pipeline import (Documents, TrainIterator, build_eval_batches, build_train_iterator,
                                    load_tokenizer)
from xorl_jax.data.sources import DataError

__all__ = ["DataError", "Documents", "TrainIterator", "build_eval_batches", "build_train_iterator",
           "load_tokenizer"]
