"""Regenerates xorl_jax/assets/demo/: the arithmetic chat jsonl files and the byte-level BPE ChatML tokenizer.

Usage: python scripts/make_demo_assets.py [--out DIR]
"""
import argparse

from xorl_jax.data.demo import DEMO_DIR, make_assets

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEMO_DIR)
    args = parser.parse_args()
    tok = make_assets(args.out)
    print(f"wrote {args.out}: vocab {len(tok)}")
