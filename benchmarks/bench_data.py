"""Host cost of the data pipeline: start-up (tokenize or read the cache, pack epoch 0) and time per global batch.

    python scripts/make_text_corpus.py --out data/docstrings
    python benchmarks/bench_data.py --data data/docstrings --rows 64 --seq 8192 [--cache DIR]

Runs twice when --cache is given (cold: tokenize and write the cache; warm: read it), each in a fresh process.
"""
import argparse
import os
import subprocess
import sys
import time


def measure(args):
    from xorl_jax.config import DataConfig, DatasetConfig
    from xorl_jax.data import build_train_iterator, load_tokenizer

    tok = load_tokenizer(args.data)
    cfg = DataConfig(datasets=[DatasetConfig(path=os.path.join(args.data, "train.jsonl"), type="text")],
                     sample_packing_sequence_len=args.seq, sample_packing_method="multipack",
                     long_sequence_policy="split", dataset_prepared_path=args.cache)
    t0 = time.perf_counter()
    it = build_train_iterator(cfg, tok, global_batch_size=args.rows, seed=0)
    setup = time.perf_counter() - t0
    for _ in range(2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    per_batch = (time.perf_counter() - t0) / args.batches
    tokens = args.rows * args.seq
    print(f"start-up {setup:.1f} s ({it.rows_per_epoch} rows of {args.seq} per epoch); batch of {args.rows} x "
          f"{args.seq}: {per_batch * 1e3:.1f} ms, {tokens / per_batch / 1e6:.1f} M tokens/s on one host thread")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory with train.jsonl (type text) and a tokenizer")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--cache", default=None, help="data.dataset_prepared_path (measured cold, then warm)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child or not args.cache:
        measure(args)
    else:
        for run in ("cold (tokenize, write cache)", "warm (read cache)"):
            print(run + ": ", end="", flush=True)
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], check=True)
