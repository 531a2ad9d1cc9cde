"""The offline real-text corpus (Python docstrings): documents, splits, tokenizer, and the `text` data path."""

import json
import os

from xorl_jax.data import load_tokenizer
from xorl_jax.data.text_corpus import default_roots, docstring_documents, make_text_corpus

MODULE = '''"""{name}: a module docstring with more than five words in it, about {topic}."""


class Thing:
    """A class docstring that also has enough words to be kept, about {topic}."""

    def method(self):
        """Short."""


def function():
    """A function docstring, long enough to be kept in the corpus, on {topic}."""
'''


def write_package(root, n=6):
    os.makedirs(os.path.join(root, "pkg", "tests"))
    for i in range(n):
        with open(os.path.join(root, "pkg", f"mod{i}.py"), "w") as f:
            f.write(MODULE.format(name=f"mod{i}", topic=["queues", "sockets", "parsers"][i % 3]))
    with open(os.path.join(root, "pkg", "tests", "test_x.py"), "w") as f:  # test folders are skipped
        f.write(MODULE.format(name="test_x", topic="tests"))
    with open(os.path.join(root, "pkg", "broken.py"), "w") as f:  # unparsable files are skipped
        f.write("def (:\n")


def test_documents_keep_docstrings_in_order_and_skip_tests(tmp_path):
    write_package(str(tmp_path))
    rows = docstring_documents([str(tmp_path)], min_words=10)
    assert [r["text"].split("\n")[0] for r in rows] == [f"pkg.mod{i}" for i in range(6)]
    text = rows[0]["text"]
    assert text.index("module docstring") < text.index("class docstring") < text.index("function docstring")
    assert "Short." not in text  # fewer than five words


def test_corpus_files_and_tokenizer(tmp_path):
    src, out = tmp_path / "src", tmp_path / "corpus"
    write_package(str(src))
    stats = make_text_corpus(str(out), vocab_size=300, eval_every=3, roots=[str(src)], min_words=10)
    assert stats["train_docs"] == 4 and stats["eval_docs"] == 2
    rows = [json.loads(line) for line in open(out / "train.jsonl")]
    assert len(rows) == 4 and all(set(r) == {"text"} for r in rows)
    tok = load_tokenizer(str(out))
    ids = tok(rows[0]["text"])["input_ids"]
    assert tok.decode(ids) == rows[0]["text"]  # byte-level BPE round-trips


def test_standard_library_gives_a_real_corpus():
    rows = docstring_documents(default_roots(site_packages=False), min_words=50)
    assert len(rows) > 100 and sum(len(r["text"]) for r in rows) > 1_000_000
