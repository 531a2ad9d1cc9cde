"""Data pipeline: chat loss masks, label shift, packing, per-process slicing, exact resume, bad rows."""

import json

import numpy as np
import pytest

from xorl_jax.config import DataConfig, DatasetConfig
from xorl_jax.data import DataError, build_eval_batches, build_train_iterator, load_tokenizer
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.data.documents import IGNORE, row_to_doc
from xorl_jax.data.packing import build_row, pack_first_fit_decreasing, pack_sequential
from xorl_jax.data.pipeline import MAX_DOCUMENTS_KEY


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_DIR)


def data_cfg(path, kind="messages", **kw):
    kw.setdefault("sample_packing_sequence_len", 64)
    return DataConfig(datasets=[DatasetConfig(path=str(path), type=kind)], **kw)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_messages_train_only_on_assistant_turns(tok):
    conv = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                         {"role": "assistant", "content": "2 + 3 = 5."},
                         {"role": "user", "content": "And 4 - 1?"},
                         {"role": "assistant", "content": "4 - 1 = 3."}]}
    ids, targets = row_to_doc(conv, "messages", tok)
    assert len(ids) == len(targets) and targets[-1] == IGNORE
    trained = targets[targets != IGNORE]
    assert tok.decode(trained.tolist()) == "2 + 3 = 5.<|im_end|>4 - 1 = 3.<|im_end|>"
    # targets are next tokens: wherever there is a target it equals the following input token
    where = np.nonzero(targets != IGNORE)[0]
    np.testing.assert_array_equal(targets[where], ids[where + 1])


def test_tokenized_rows_shift_labels_and_check_vocab():
    ids, targets = row_to_doc({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, "tokenized", None, 10)
    np.testing.assert_array_equal(targets, [IGNORE, 7, 8, IGNORE])
    ids, targets = row_to_doc({"input_ids": [1, 2, 3]}, "tokenized", None, 10)
    np.testing.assert_array_equal(targets, [2, 3, IGNORE])
    with pytest.raises(DataError, match=r"outside \[0, 10\)"):
        row_to_doc({"input_ids": [1, 12]}, "tokenized", None, 10)
    with pytest.raises(DataError, match="labels has 2 tokens but input_ids has 3"):
        row_to_doc({"input_ids": [1, 2, 3], "labels": [1, 2]}, "tokenized", None, 10)


@pytest.mark.parametrize("packer", [pack_sequential, pack_first_fit_decreasing])
def test_packers_respect_capacity_and_keep_every_document_once(packer):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 300)
    rows = packer(lengths, rng.permutation(300), 64)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    if packer is pack_first_fit_decreasing:  # FFD is within 11/9 OPT + 1 of the lower bound
        assert len(rows) <= 11 / 9 * np.ceil(lengths.sum() / 64) + 1


def test_build_row_restarts_positions_and_numbers_segments():
    docs = [(np.array([1, 2, 3]), np.array([2, 3, IGNORE])), (np.array([4, 5]), np.array([5, IGNORE]))]
    row = build_row(docs, 8)
    np.testing.assert_array_equal(row["input_ids"], [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["labels"], [2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE])


def test_every_label_appears_once_per_epoch_and_processes_split_rows(tok):
    cfg = data_cfg(f"{DEMO_DIR}/eval.jsonl", sample_packing_method="multipack", shuffle=True)
    single = build_train_iterator(cfg, tok, global_batch_size=4, seed=3)
    n_batches = single.batches_per_epoch
    batches = [next(single) for _ in range(n_batches)]
    labels = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    assert labels == sum(int((t != IGNORE).sum()) for t in single.docs.targets)
    assert single.epoch == 0
    for p in range(2):  # process p holds rows [2p, 2p + 2) of every global batch
        part = build_train_iterator(cfg, tok, global_batch_size=4, process_index=p, process_count=2, seed=3)
        for b in batches[:3]:
            got = next(part)
            np.testing.assert_array_equal(got["input_ids"], b["input_ids"][2 * p:2 * p + 2])
            # every process knows the most segments in any row of the global batch, from its own packing
            seg = b["segment_ids"]
            runs = 1 + int(np.max(np.sum(seg[:, 1:] != seg[:, :-1], axis=1)))
            assert got[MAX_DOCUMENTS_KEY] == b[MAX_DOCUMENTS_KEY] == runs


def test_resume_continues_with_the_same_batches(tok):
    cfg = data_cfg(f"{DEMO_DIR}/eval.jsonl")
    it = build_train_iterator(cfg, tok, global_batch_size=2, seed=1)
    for _ in range(it.batches_per_epoch + 2):  # cross an epoch boundary
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"] for _ in range(3)]
    again = build_train_iterator(cfg, tok, global_batch_size=2, seed=1)
    again.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(again)["input_ids"], e)
    assert state["epoch"] == 1


def test_epochs_are_reshuffled(tok):
    it = build_train_iterator(data_cfg(f"{DEMO_DIR}/eval.jsonl"), tok, global_batch_size=2, seed=1)
    first = next(it)["input_ids"]
    it.set_state({"epoch": 1, "batch_index": 0})
    assert not np.array_equal(next(it)["input_ids"], first)


def test_bad_row_names_file_and_line_or_is_skipped(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, '{"messages": [{"role": "user"}]}', good, "{not json"])
    with pytest.raises(DataError, match=r"chat.jsonl:2.*skip_bad_rows"):
        build_train_iterator(data_cfg(path), tok, global_batch_size=1)
    it = build_train_iterator(data_cfg(path, skip_bad_rows=True), tok, global_batch_size=1)
    assert it.rows_skipped == 2 and it.documents == 2


def test_long_documents_drop_truncate_or_split(tmp_path):
    path = write_jsonl(tmp_path / "tok.jsonl", [{"input_ids": list(range(1, 151))}, {"input_ids": [1, 2, 3]}])
    kept = build_train_iterator(data_cfg(path, "tokenized"), None, global_batch_size=1)  # xorl's: drop
    assert kept.documents == 1 and kept.docs.docs_dropped == 1 and len(kept.docs.ids[0]) == 3
    path = write_jsonl(tmp_path / "tok.jsonl", [{"input_ids": list(range(1, 151))}])
    with pytest.raises(DataError, match="1 longer than their max_seq_len were dropped"):
        build_train_iterator(data_cfg(path, "tokenized"), None, global_batch_size=1)
    cut = build_train_iterator(data_cfg(path, "tokenized", long_sequence_policy="truncate"), None, global_batch_size=1)
    assert cut.documents == 1 and cut.documents_truncated == 1
    split = build_train_iterator(data_cfg(path, "tokenized", long_sequence_policy="split"), None,
                                 global_batch_size=1, seed=0)
    assert split.documents == 3 and split.documents_split == 1
    labels = np.concatenate([t for t in split.docs.targets])
    np.testing.assert_array_equal(labels[:-1], np.arange(2, 151))  # no label lost at the cuts


def test_missing_dataset_and_eval_batches(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl"):
        build_train_iterator(data_cfg(tmp_path / "nope.jsonl"), tok, global_batch_size=1)
    cfg = DataConfig(datasets=[DatasetConfig(path=f"{DEMO_DIR}/eval.jsonl", type="messages")],
                     eval_datasets=[DatasetConfig(path=f"{DEMO_DIR}/eval.jsonl", type="messages")],
                     sample_packing_sequence_len=128)
    batches = build_eval_batches(cfg, tok, global_batch_size=4)
    assert all(b["input_ids"].shape == (4, 128) for b in batches)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) > 0


def test_prefetcher_gives_the_same_batches_and_exact_resume_state(tok):
    from xorl_jax.data.prefetch import Prefetcher

    cfg = data_cfg(f"{DEMO_DIR}/eval.jsonl")
    plain = build_train_iterator(cfg, tok, global_batch_size=2, seed=1)
    ahead = Prefetcher(build_train_iterator(cfg, tok, global_batch_size=2, seed=1), depth=3)
    assert ahead.rows_per_epoch == plain.rows_per_epoch
    for _ in range(plain.batches_per_epoch + 2):
        np.testing.assert_array_equal(next(ahead)["input_ids"], next(plain)["input_ids"])
        # the worker has prepared more, but the state counts only what was handed out
        assert ahead.get_state() == plain.get_state()
    state = ahead.get_state()
    expected = [next(plain)["input_ids"] for _ in range(3)]
    resumed = Prefetcher(build_train_iterator(cfg, tok, global_batch_size=2, seed=1), depth=2)
    resumed.set_state(state)
    for e in expected[:2]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], e)
    resumed.close()  # closed with prepared batches unused: the next call starts again where the trainer was
    np.testing.assert_array_equal(next(resumed)["input_ids"], expected[2])
    ahead.close()
    resumed.close()


def test_prefetcher_raises_the_workers_error_in_the_caller():
    from xorl_jax.data.prefetch import Prefetcher

    class Broken:
        n = 0

        def get_state(self):
            return {"n": self.n}

        def __next__(self):
            self.n += 1
            if self.n == 3:
                raise DataError("row 7 is not JSON")
            return {"input_ids": np.full((1, 4), self.n)}

    it = Prefetcher(Broken(), depth=4)
    assert next(it)["input_ids"][0, 0] == 1 and next(it)["input_ids"][0, 0] == 2
    for _ in range(2):  # and keeps raising, it never blocks
        with pytest.raises(DataError, match="row 7"):
            next(it)


def test_dataset_prepared_path_caches_tokenized_documents(tmp_path, tok, monkeypatch):
    from xorl_jax.data import pipeline

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i} " * (i + 1)} for i in range(40)])
    cfg = data_cfg(src, kind="text", dataset_prepared_path=str(tmp_path / "prep"), long_sequence_policy="split")
    first = pipeline.Documents(cfg.datasets, tok, cfg)
    files = list((tmp_path / "prep").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(pipeline.Documents, "_tokenize", no_tokenizing)
        second = pipeline.Documents(cfg.datasets, tok, cfg)
    assert len(second.ids) == len(first.ids) and second.docs_split == first.docs_split > 0
    for a, b, c, d in zip(first.ids, second.ids, first.targets, second.targets):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, d)
    # a changed file or option is another entry, never a stale hit
    write_jsonl(src, [{"text": "changed"}] * 3)
    assert len(pipeline.Documents(cfg.datasets, tok, cfg).ids) == 3
    cfg.sample_packing_sequence_len = 32
    pipeline.Documents(cfg.datasets, tok, cfg)
    assert len(list((tmp_path / "prep").iterdir())) == 3


def test_text_rows_tokenized_in_batches_equal_one_by_one(tmp_path, tok):
    """Text rows go through the tokenizer in batches (`text_batch`): the same documents, in order, as one call per
    row; a bad row inside a batch is named or skipped like any other."""
    from xorl_jax.data.pipeline import Documents

    rows = [{"text": f"row {i}: " + "word " * (i % 7 + 1)} for i in range(11)]
    rows.insert(6, {"text": ""})
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    strict = data_cfg(path, "text")
    with pytest.raises(DataError, match=r"t.jsonl:7.*skip_bad_rows"):
        Documents(strict.datasets, tok, strict, text_batch=4)
    cfg = data_cfg(path, "text", skip_bad_rows=True)
    docs = Documents(cfg.datasets, tok, cfg, text_batch=4)
    assert docs.rows_skipped == 1 and len(docs.ids) == 11
    for (ids, targets), got_ids, got_targets in zip((row_to_doc(r, "text", tok) for r in rows if r["text"]),
                                                     docs.ids, docs.targets):
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_targets, targets)


def test_segment_count_of_a_row_counts_padding_only_when_there_is_some():
    from types import SimpleNamespace

    from xorl_jax.data.pipeline import _Batcher

    batcher = _Batcher.__new__(_Batcher)
    batcher.capacity = 8
    batcher.docs = SimpleNamespace(ids=[np.ones(3, np.int32), np.ones(5, np.int32), np.ones(2, np.int32)],
                                   targets=[np.ones(3, np.int32), np.ones(5, np.int32), np.ones(2, np.int32)])
    for members in ([0, 1], [0, 2], [], [1]):
        seg = build_row([(batcher.docs.ids[i], batcher.docs.targets[i]) for i in members], 8)["segment_ids"]
        assert batcher._segments(members) == 1 + int(np.sum(seg[1:] != seg[:-1])), members


def test_demo_tokenizer_writes_each_digit_as_a_token(tok):
    """As Qwen's tokenizer does: a result is computed digit by digit (a rule over digits serves every question; the
    RL demo depends on it), not looked up as one whole-number token. The shipped assets are what
    train_tokenizer makes (split_digits on), and without it BPE merges numbers."""
    from xorl_jax.data.demo import train_tokenizer

    text = "57 + 86 = 143."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == ["5", "7", "8", "6", "1", "4", "3"], pieces
    assert tok.decode(ids) == text
    texts = [f"{a} + {b} = {a + b}." for a in range(60) for b in range(60)]
    merged = train_tokenizer(texts, vocab_size=400, split_digits=False)
    assert any(len(merged.decode([i]).strip()) > 1 and merged.decode([i]).strip().isdigit()
               for i in merged(text, add_special_tokens=False)["input_ids"])
    split = train_tokenizer(texts, vocab_size=400)
    assert all(len(split.decode([i]).strip()) <= 1 for i in split("143 + 2024", add_special_tokens=False)["input_ids"])


def test_shipped_demo_assets_are_what_make_assets_writes(tmp_path):
    """xorl_jax/assets/demo is regenerated by scripts/make_demo_assets.py: same data, same tokenizer."""
    from xorl_jax.data.demo import make_assets

    make_assets(str(tmp_path))
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == open(f"{DEMO_DIR}/{name}").read(), name
    fresh, shipped = (json.load(open(p)) for p in (tmp_path / "tokenizer.json", f"{DEMO_DIR}/tokenizer.json"))
    for key in ("pre_tokenizer", "decoder", "model", "added_tokens"):
        assert fresh[key] == shipped[key], key


def test_a_training_step_as_model_path_reads_with_its_runs_tokenizer(tmp_path):
    """A step directory holds no tokenizer files (docs/LORA.md: a LoRA step works as model.model_path): chat data
    is tokenized with the tokenizer its run recorded (the first recorded directory that still holds one); one that
    is gone stays an error naming model.tokenizer_path."""
    from xorl_jax.config import load_config
    from xorl_jax.preflight import tokenizer_for

    step = tmp_path / "checkpoints" / "2"
    (step / "params").mkdir(parents=True)
    (step / "meta").mkdir()

    def record(side_dirs):
        (step / "meta" / "metadata").write_text(json.dumps(
            {"step": 2, "hf_config": {"model_type": "qwen3_moe"}, "source": {"side_dirs": side_dirs}}))

    cfg = load_config(None, [f"--model.model_path={step}", "--data.datasets=[{path: a.jsonl, type: messages}]"])
    record([str(tmp_path / "gone"), DEMO_DIR])
    assert tokenizer_for(cfg, 768).name_or_path == DEMO_DIR
    record([str(tmp_path / "gone")])
    with pytest.raises(DataError, match="holds no tokenizer files.*model.tokenizer_path"):
        tokenizer_for(cfg, 768)
