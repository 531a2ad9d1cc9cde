"""A user fine-tunes on chat data with Qwen's chat formats through the CLI: multi-turn, thinking and tool-call
conversations in OpenAI format, one dataset with the template the tokenizer directory ships (Qwen3's) and one with a
named template and template variables (Qwen3.5, enable_thinking: false). No row is dropped, and the documents the run
tokenized (read back from its data cache) train exactly each assistant turn's text and end-of-turn token. A row that
no template can mask stops the run with one line naming it."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import yaml

from xorl_jax.data.chat import TEMPLATE_DIR
from xorl_jax.data.demo import DEMO_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text, **kw: {"role": "assistant", "content": text, **kw}  # noqa: E731
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
ADD = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
JSON_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
XML_CALL = ("<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n3\n</parameter>\n</function>\n"
            "</tool_call>")

# (row, the trained text of each assistant turn) under the tokenizer's template: Qwen3's, thinking on
QWEN3_ROWS = [
    ({"messages": [U("What is 2 + 3?"), A("2 + 3 = 5.")]},
     ["<think>\n\n</think>\n\n2 + 3 = 5.<|im_end|>"]),
    ({"messages": [U("What is 2 + 3?"), A("5.", reasoning_content="Add."), U("And 4 - 1?"),
                   A("3.", reasoning_content="Subtract.")]},
     ["5.<|im_end|>", "<think>\nSubtract.\n</think>\n\n3.<|im_end|>"]),
    ({"messages": [{"role": "system", "content": "Use the tool."}, U("Add 2 and 3, twice."),
                   A(None, tool_calls=[ADD, ADD]), {"role": "tool", "content": "5"}, {"role": "tool", "content": "5"},
                   A("<think>\nBoth 5.\n</think>\n\n5 and 5.")], "tools": TOOLS},
     [f"{JSON_CALL}\n{JSON_CALL}<|im_end|>", "<think>\nBoth 5.\n</think>\n\n5 and 5.<|im_end|>"]),
]
# under `chat_template: qwen3_5` with enable_thinking false: the empty thinking block is the prompt's
QWEN3_5_ROWS = [
    ({"messages": [U("Hi"), A("Hello."), U("What is 7 * 6?"), A("42.")]},
     ["Hello.<|im_end|>", "42.<|im_end|>"]),
    ({"messages": [U("Add 2 and 3."), A("", tool_calls=[ADD]), {"role": "tool", "content": "5"}, A("5.")]},
     [f"{XML_CALL}<|im_end|>", "5.<|im_end|>"]),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tokenizer_with_qwen3_template(tmp_path):
    """The demo tokenizer as a Qwen3 checkpoint directory holds it: its chat template in chat_template.jinja."""
    out = tmp_path / "tokenizer"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO_DIR, name), out / name)
    shutil.copy(os.path.join(TEMPLATE_DIR, "qwen3.jinja"), out / "chat_template.jinja")
    return str(out)


def train(tmp_path, datasets, *extra):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo_cpu.yaml")))
    cfg["model"]["config_path"] = DEMO_DIR
    cfg["model"]["tokenizer_path"] = tokenizer_with_qwen3_template(tmp_path)
    cfg["data"].update(datasets=datasets, eval_datasets=[], sample_packing_sequence_len=1024,
                       long_sequence_policy="truncate", dataset_prepared_path=str(tmp_path / "prepared"))
    cfg["train"].update(output_dir=str(tmp_path / "run"), max_steps=2, micro_batch_size=2,
                        gradient_accumulation_steps=1, save_steps=0, save_hf_weights=False, sample_eval_prompts=0,
                        log_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=flags)  # one CPU device, as a user's laptop has
    return subprocess.run([sys.executable, "-m", "xorl_jax.train", "--config", str(tmp_path / "cfg.yaml"), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_chat_conversations_with_qwen_templates_train_through_the_cli(tmp_path):
    from transformers import AutoTokenizer

    from xorl_jax.data import cache

    datasets = [{"path": write_jsonl(tmp_path / "qwen3.jsonl", [r for r, _ in QWEN3_ROWS]), "type": "messages"},
                {"path": write_jsonl(tmp_path / "qwen3_5.jsonl", [r for r, _ in QWEN3_5_ROWS]), "type": "messages",
                 "chat_template": "qwen3_5", "chat_template_kwargs": {"enable_thinking": False}}]
    proc = train(tmp_path, datasets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    rows = len(QWEN3_ROWS) + len(QWEN3_5_ROWS)
    found = re.search(r"data: (\d+) documents.* from (\d+) rows; (\d+) bad rows skipped", log)
    assert found and found.groups() == (str(rows), str(rows), "0"), log[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))

    # the run's own tokenized documents, in dataset and row order: exactly the assistant turns are trained
    (entry,) = (tmp_path / "prepared").iterdir()
    ids, targets, _ = cache.load(str(entry))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    for doc_ids, doc_targets, (_, want) in zip(ids, targets, QWEN3_ROWS + QWEN3_5_ROWS):
        where = np.nonzero(doc_targets != -100)[0]
        np.testing.assert_array_equal(doc_targets[where], doc_ids[where + 1])
        runs = np.split(where + 1, np.nonzero(np.diff(where) > 1)[0] + 1)
        assert [tok.decode(doc_ids[r].tolist()) for r in runs] == want


def test_a_conversation_the_template_cannot_mask_stops_the_run_naming_it(tmp_path):
    good, _ = QWEN3_ROWS[1]
    bad = {"messages": [U("Hi"), A("say <|im_end|> twice")]}  # an end-of-turn token inside the answer
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    proc = train(tmp_path, [{"path": path, "type": "messages"}])
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "chat.jsonl:2: assistant turn 1 (message 1)" in last, proc.stderr[-2000:]
