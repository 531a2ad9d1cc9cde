"""A real English text corpus that exists on every machine with Python: the docstrings of the standard library.

For loss curves on machines without network access (GPU nodes in a closed cluster): prose written by people, a
few MB, deterministic for one Python version. One document per module: its name, then its module, class and
function docstrings in source order. `make_text_corpus` writes `train.jsonl` / `eval.jsonl` rows of
{"text": ...} (data type `text`) and a byte-level BPE tokenizer trained on the training split.
"""
from __future__ import annotations

import ast
import inspect
import os
import sysconfig

from xorl_jax.data.demo import train_tokenizer, write_jsonl

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def _module_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node, clean=False) for node in ast.walk(tree) if isinstance(node, kinds)]
    return [inspect.cleandoc(d) for d in docs if d and len(d.split()) >= 5]


def default_roots(site_packages: bool = True) -> list[str]:
    """The standard library, and the installed packages (more text, but it depends on what is installed)."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]]
    if site_packages and paths["purelib"] not in roots:
        roots.append(paths["purelib"])
    return roots


def docstring_documents(roots: list[str] | None = None, *, min_words: int = 50) -> list[dict]:
    """[{"text": ...}] with one document per module (under `roots`) that has at least `min_words` words."""
    rows = []
    for root in roots or default_roots():
        rows += _documents_under(root, min_words)
    return rows


def _documents_under(root: str, min_words: int) -> list[dict]:
    rows = []
    for path in _module_files(root):
        with open(path, encoding="utf-8", errors="replace") as f:
            docs = _docstrings(f.read())
        text = "\n\n".join(docs)
        if len(text.split()) >= min_words:
            name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            rows.append({"text": f"{name}\n\n{text}"})
    return rows


def make_text_corpus(out_dir: str, *, vocab_size: int = 32768, eval_every: int = 50,
                     roots: list[str] | None = None, min_words: int = 50):
    """Write train.jsonl, eval.jsonl (every `eval_every`-th module) and the tokenizer to `out_dir`."""
    roots = roots or default_roots()
    rows = docstring_documents(roots, min_words=min_words)
    if not rows:
        raise RuntimeError(f"no documented Python modules found under {roots}")
    evals = rows[::eval_every]
    train = [r for i, r in enumerate(rows) if i % eval_every]
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(train, os.path.join(out_dir, "train.jsonl"))
    write_jsonl(evals, os.path.join(out_dir, "eval.jsonl"))
    tok = train_tokenizer((r["text"] for r in train), vocab_size=vocab_size)
    tok.save_pretrained(out_dir)
    return {"train_docs": len(train), "eval_docs": len(evals), "train_chars": sum(len(r["text"]) for r in train),
            "vocab": len(tok)}
