"""Chat rows with real chat-template behaviours: which tokens are trained for single-turn, multi-turn, thinking and
tool-call conversations, under Qwen3's and Qwen3.5's formats (the shipped qwen3 / qwen3_5 templates render what the
published ones render), ChatML, and templates with {% generation %} markers; templates that cannot be masked fail
with a DataError naming the turn."""

import json
import os

import numpy as np
import pytest

from xorl_jax.config import ConfigError, DataConfig, DatasetConfig, config_from_dict
from xorl_jax.data import DataError, load_tokenizer
from xorl_jax.data.chat import ChatFormat, normalize_messages, resolve_template
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.data.documents import IGNORE, row_to_doc


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_DIR)


def render(tok, name, messages, gen=False, **kw):
    return tok.apply_chat_template(messages, chat_template=resolve_template(name, tok), tokenize=False,
                                   add_generation_prompt=gen, **kw)


def trained_runs(tok, row, fmt):
    """The trained text of a document, one string per run of consecutive trained tokens."""
    ids, targets = fmt.document(row)
    assert len(ids) == len(targets) and targets[-1] == IGNORE
    where = np.nonzero(targets != IGNORE)[0]
    np.testing.assert_array_equal(targets[where], ids[where + 1])  # a target is always the next input token
    runs = np.split(where + 1, np.nonzero(np.diff(where) > 1)[0] + 1) if len(where) else []
    return [tok.decode(ids[r].tolist()) for r in runs]


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text, **kw: {"role": "assistant", "content": text, **kw}  # noqa: E731
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CONV = [{"role": "system", "content": "Be brief."}, U("Weather in Paris and Rome?"),
             A(None, reasoning_content="Ask the tool twice.", tool_calls=[CALL, CALL]),
             {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"},
             A("Paris sunny, Rome rain.", reasoning_content="Both answered.")]
CALL_JSON = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_XML = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
THINK_CONV = [U("What is 2 + 3?"), A("5.", reasoning_content="Add them."), U("And 4 - 1?"),
              A("<think>\nSubtract.\n</think>\n\n3.")]


# ------------------------------------------------------------------------------ the published behaviours
def test_qwen3_renders_history_without_thinking_and_merges_tool_results(tok):
    full = render(tok, "qwen3", THINK_CONV)
    # the first answer comes before the last user query: its reasoning is not rendered; the last keeps it
    assert "<|im_start|>assistant\n5.<|im_end|>" in full and "Add them." not in full
    assert full.endswith("<|im_start|>assistant\n<think>\nSubtract.\n</think>\n\n3.<|im_end|>\n")
    # so a prefix of the conversation is not a prefix of its render (what broke prefix-by-prefix masking)
    assert not full.startswith(render(tok, "qwen3", THINK_CONV[:2]))
    assert render(tok, "qwen3", THINK_CONV[:1], gen=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(tok, "qwen3", THINK_CONV[:1], gen=True).endswith("<|im_start|>assistant\n")

    full = render(tok, "qwen3", TOOL_CONV, tools=[WEATHER])
    assert full.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and '"name": "get_weather"' in full
    call = CALL_JSON
    assert f"<think>\nAsk the tool twice.\n</think>\n\n{call}\n{call}<|im_end|>" in full  # after the query: kept
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n"
            "</tool_response><|im_end|>") in full


def test_qwen3_5_opens_thinking_after_the_last_query_and_calls_tools_in_xml(tok):
    full = render(tok, "qwen3_5", THINK_CONV + [U("Thanks"), A("You're welcome.")])
    assert "<|im_start|>assistant\n3.<|im_end|>" in full  # history: no reasoning
    assert full.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nYou're welcome.<|im_end|>\n")  # empty block
    assert render(tok, "qwen3_5", THINK_CONV[:1], gen=True).endswith("<|im_start|>assistant\n<think>\n")
    assert render(tok, "qwen3_5", THINK_CONV[:1], gen=True, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    full = render(tok, "qwen3_5", TOOL_CONV, tools=[WEATHER])
    assert CALL_XML in full
    assert "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>" in full


# ------------------------------------------------------------------------------ what is trained
MARKED = ("{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}"
          "{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}{%- else %}"
          "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

CASES = {
    "single turn, tokenizer's template": (None, {}, [U("What is 2 + 3?"), A("2 + 3 = 5.")], ["2 + 3 = 5.<|im_end|>"]),
    "multi-turn chatml with a system prompt": (
        "chatml", {}, [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hello."), U("Bye"), A("Bye.")],
        ["Hello.<|im_end|>", "Bye.<|im_end|>"]),
    "qwen3 thinking: history without reasoning, last turn with it": (
        "qwen3", {}, THINK_CONV, ["5.<|im_end|>", "<think>\nSubtract.\n</think>\n\n3.<|im_end|>"]),
    "qwen3 non-thinking: the empty thinking block is prompt": (
        "qwen3", {"enable_thinking": False}, [U("Hi"), A("Hello."), U("Bye"), A("Bye.")],
        ["Hello.<|im_end|>", "Bye.<|im_end|>"]),
    "qwen3 non-thinking, an answer starting like the thinking block": (
        "qwen3", {"enable_thinking": False}, [U("Hi"), A("<thinking aloud> no."), U("Bye"), A("Bye.")],
        ["<thinking aloud> no.<|im_end|>", "Bye.<|im_end|>"]),
    "qwen3 tool calls": (
        "qwen3", {}, TOOL_CONV,
        [f"<think>\nAsk the tool twice.\n</think>\n\n{CALL_JSON}\n{CALL_JSON}<|im_end|>",
         "<think>\nBoth answered.\n</think>\n\nParis sunny, Rome rain.<|im_end|>"]),
    "qwen3_5 thinking: '<think>\\n' is prompt": (
        "qwen3_5", {}, THINK_CONV, ["5.<|im_end|>", "Subtract.\n</think>\n\n3.<|im_end|>"]),
    "qwen3_5 non-thinking prompt, reasoning in the data": (
        "qwen3_5", {"enable_thinking": False}, THINK_CONV,
        ["5.<|im_end|>", "<think>\nSubtract.\n</think>\n\n3.<|im_end|>"]),
    "qwen3_5 tool calls": (
        "qwen3_5", {}, TOOL_CONV,
        [f"Ask the tool twice.\n</think>\n\n{CALL_XML}\n{CALL_XML}<|im_end|>",
         "Both answered.\n</think>\n\nParis sunny, Rome rain.<|im_end|>"]),
    "generation markers": ("MARKED", {}, [U("Hi"), A("Hello."), U("Bye"), A("Bye.")],
                           ["Hello.<|im_end|>", "Bye.<|im_end|>"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trained_tokens_are_each_assistant_turns_text_and_end_of_turn(tmp_path, tok, case):
    template, kwargs, messages, want = CASES[case]
    if template == "MARKED":
        template = str(tmp_path / "marked.jinja")
        (tmp_path / "marked.jinja").write_text(MARKED)
    row = {"messages": messages, "tools": [WEATHER] if messages is TOOL_CONV else None}
    assert trained_runs(tok, row, ChatFormat(tok, template, kwargs)) == want


def test_mask_history_and_weight_pick_the_trained_turns(tok, tmp_path):
    conv = [U("Hi"), A("Hello."), U("Bye"), A("Bye.")]
    assert trained_runs(tok, {"messages": conv}, ChatFormat(tok, "qwen3", mask_history=True)) == [
        "<think>\n\n</think>\n\nBye.<|im_end|>"]
    weighted = [U("Hi"), A("Hello.", weight=0), U("Bye"), A("Bye.")]
    assert trained_runs(tok, {"messages": weighted}, ChatFormat(tok, "chatml")) == ["Bye.<|im_end|>"]
    (tmp_path / "marked.jinja").write_text(MARKED)
    assert trained_runs(tok, {"messages": weighted}, ChatFormat(tok, str(tmp_path / "marked.jinja"))) == [
        "Bye.<|im_end|>"]
    with pytest.raises(DataError, match="no assistant turn to train"):
        ChatFormat(tok, "chatml", mask_history=True).document({"messages": conv[:3] + [A("x", weight=0)]})


def test_row_to_doc_uses_the_tokenizers_template_by_default(tok):
    ids, targets = row_to_doc({"messages": [U("What is 2 + 3?"), A("2 + 3 = 5.")]}, "messages", tok)
    assert tok.decode(targets[targets != IGNORE].tolist()) == "2 + 3 = 5.<|im_end|>"


# ------------------------------------------------------------------------------ what cannot be masked
@pytest.mark.parametrize("template, match", [
    ("{%- for m in messages %}{{- m.role + ': ' + (m.content | upper) + '<|im_end|>' }}{%- endfor %}"
     "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}", r"turn 1 \(message 1\): its content is not"),
    ("{%- for m in messages %}{{- m.role + ': ' + m.content + '\n' }}{%- endfor %}"
     "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}", "no end-of-turn token"),
    ("{{- 'Conversation of ' ~ (messages | length) ~ ' messages\n' }}{%- for m in messages %}"
     "{{- m.role + ': ' + m.content + '<|im_end|>' }}{%- endfor %}{%- if add_generation_prompt %}"
     "{{- 'assistant: ' }}{%- endif %}", "renders the conversation before this turn differently"),
    ("{{- raise_exception('unsupported') }}", "template failed.*unsupported"),
])
def test_templates_that_cannot_be_masked_are_errors_naming_the_turn(tok, tmp_path, template, match):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    with pytest.raises(DataError, match=match):
        ChatFormat(tok, str(path)).document({"messages": [U("Hi"), A("Hello.")]})


def test_a_bad_row_is_named_by_file_and_line(tok, tmp_path):
    from xorl_jax.data.pipeline import Documents

    good = {"messages": THINK_CONV}
    bad = {"messages": [U("Hi"), A("see <|im_end|> here")]}  # the end token inside the answer: no clean span
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad)))
    cfg = DataConfig(datasets=[DatasetConfig(path=str(path), type="messages", chat_template="qwen3")],
                     sample_packing_sequence_len=256, long_sequence_policy="truncate")
    with pytest.raises(DataError, match=r"chat.jsonl:2: assistant turn 1 \(message 1\)"):
        Documents(cfg.datasets, tok, cfg)


def test_a_tokenizer_without_a_template_asks_for_one(tmp_path):
    bare = load_tokenizer(DEMO_DIR)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template; set chat_template"):
        ChatFormat(bare)
    assert trained_runs(bare, {"messages": [U("Hi"), A("Hello.")]}, ChatFormat(bare, "chatml")) == ["Hello.<|im_end|>"]


# ------------------------------------------------------------------------------ rows, config, cache
def test_messages_accept_tool_calls_without_content_and_reject_what_text_cannot_hold():
    msgs = normalize_messages([{"role": "system", "content": "s"}, U([{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]),
                               {"role": "assistant", "tool_calls": [CALL], "content": None, "reasoning": "r"},
                               {"role": "tool", "content": "ok", "tool_calls": None}, A("done")])
    assert msgs[1]["content"] == "ab" and msgs[2]["content"] == "" and msgs[2]["reasoning_content"] == "r"
    assert "tool_calls" not in msgs[3]
    for bad, match in [([U("x")], "no assistant turn"), ([{"role": "user"}, A("x")], "no 'content'"),
                       ([U([{"type": "image", "image": "x.png"}]), A("x")], "'image' is not text"),
                       ([U("x"), A(None, tool_calls=[{"function": {"arguments": {}}}])], "function name"),
                       ([U("x"), A("y", weight=2)], "'weight' must be"), ([U("x"), {"content": "y"}], "role")]:
        with pytest.raises(DataError, match=match):
            normalize_messages(bad)


def test_config_dataset_chat_options(tmp_path):
    base = {"model": {"config_path": DEMO_DIR}, "train": {"init_from": "scratch"}}

    def entry(**kw):
        return config_from_dict({**base, "data": {"datasets": [{"path": "a.jsonl", "type": "messages", **kw}]}})

    ds = entry(chat_template="qwen3_5", chat_template_kwargs={"enable_thinking": False}, mask_history=True)
    ds = ds.data.datasets[0]
    assert ds.chat_template_kwargs == {"enable_thinking": False} and ds.mask_history
    (tmp_path / "t.jinja").write_text("x")
    assert entry(chat_template=str(tmp_path / "t.jinja")).data.datasets[0].chat_template.endswith("t.jinja")
    for kw, match in [({"chat_template": "qwen9"}, "neither a file nor a shipped template"),
                      ({"chat_template_kwargs": {"add_generation_prompt": True}}, "set by the data pipeline"),
                      ({"chat_template_kwargs": "enable_thinking"}, "must be mapping"),
                      ({"type": "text", "mask_history": True}, "type: messages only")]:
        with pytest.raises(ConfigError, match=match):
            entry(**kw)


def test_cache_key_follows_the_template_its_variables_and_turn_options(tok, tmp_path):
    from xorl_jax.data.cache import cache_key

    template = tmp_path / "t.jinja"
    template.write_text(resolve_template("chatml", tok))
    cfg = DataConfig(sample_packing_sequence_len=64)

    def key(**kw):
        return cache_key([DatasetConfig(path=str(tmp_path / "d.jsonl"), type="messages", **kw)], tok, cfg, 0)

    keys = [key(), key(chat_template="qwen3"),
            key(chat_template="qwen3", chat_template_kwargs={"enable_thinking": False}),
            key(chat_template="qwen3", mask_history=True), key(chat_template=str(template))]
    assert len(set(keys)) == len(keys)
    assert key(chat_template="qwen3") == keys[1]
    template.write_text(resolve_template("chatml", tok) + "{# edited #}")
    assert key(chat_template=str(template)) != keys[-1]


def test_export_serves_with_the_training_datas_own_chat_template(tmp_path, caplog):
    """A run whose messages data names its own template exports chat_template.jinja with that template; datasets
    with different templates leave the source's in place and say so."""
    from types import SimpleNamespace

    from xorl_jax.data.chat import TEMPLATE_DIR
    from xorl_jax.run_export import carry_training_chat_template

    def run(*specs):
        out = tmp_path / f"export{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "chat_template.jinja").write_text("source template")
        datasets = [SimpleNamespace(type="messages", chat_template=s) for s in specs]
        datasets.append(SimpleNamespace(type="tokenized", chat_template=None))
        cfg = SimpleNamespace(data=SimpleNamespace(datasets=datasets))
        carry_training_chat_template(cfg, SimpleNamespace(chat_template="tokenizer template"), str(out))
        return (out / "chat_template.jinja").read_text(), sorted(p.name for p in out.iterdir())

    shipped = open(os.path.join(TEMPLATE_DIR, "chatml.jinja")).read()
    assert run("chatml", "chatml") == (shipped, ["chat_template.jinja"])
    assert run(None) == ("source template", ["chat_template.jinja"])  # the tokenizer's own: nothing to change
    with caplog.at_level("WARNING"):
        assert run("chatml", None)[0] == "source template"
    assert "2 different chat templates" in caplog.text
