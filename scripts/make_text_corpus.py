"""Writes a real-text training corpus (Python docstrings of the standard library and installed packages) and a
byte-level BPE tokenizer trained on it, for loss curves on machines without network access.

Usage: python scripts/make_text_corpus.py --out data/docstrings [--vocab 32768] [--stdlib-only]
Then train with data type `text`: see configs/qwen3_30b_a3b_ep8.yaml.
"""
import argparse
import time

from xorl_jax.data.text_corpus import default_roots, make_text_corpus

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (train.jsonl, eval.jsonl, tokenizer files)")
    parser.add_argument("--vocab", type=int, default=32768, help="tokenizer vocabulary size")
    parser.add_argument("--stdlib-only", action="store_true", help="standard library only (smaller, ~1.6 MB)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    stats = make_text_corpus(args.out, vocab_size=args.vocab, roots=default_roots(site_packages=not args.stdlib_only))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s: {stats}")
