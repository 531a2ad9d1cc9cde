"""Chat rows (`type: messages`, OpenAI chat format) to documents: the conversation rendered once with a chat template,
loss on the assistant turns. What is trained, and why, is in docs/DATA.md.

Locating assistant turn i in the full render F without relying on prefixes rendering alike (Qwen's templates render
an assistant turn differently once a later user turn follows it):

- P = render(messages[:i], add_generation_prompt=True) is what a server sends before the model writes turn i. F and P
  agree up to the role header at least; the turn's text starts where they stop agreeing (after the whole generation
  prompt when F repeats it, e.g. a prefilled '<think>\\n'; else right after the header line, the first line of the
  generation prompt, when F renders the turn otherwise, e.g. without the empty thinking block a non-thinking prompt
  adds).
- The turn ends at the next end-of-turn token in F (`<|im_end|>`, the tokenizer's eos, ...), which is trained too.
- The span must hold the turn's content (or its tool calls' names); a template that renders the turn somewhere else
  is a DataError naming the turn, never a silent wrong mask.

Templates with `{% generation %}` markers say themselves what is trained: transformers' `return_assistant_tokens_mask`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from xorl_jax.data.sources import DataError
from xorl_jax.data.targets import shift_targets

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "chat_templates")
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # used when the tokenizer has them
RESERVED_KWARGS = ("messages", "conversation", "add_generation_prompt", "continue_final_message", "tokenize",
                   "return_dict", "return_assistant_tokens_mask", "chat_template")


def template_names() -> list[str]:
    """Names accepted by `chat_template:` besides a file path (the .jinja files shipped in assets/chat_templates)."""
    return sorted(f[:-len(".jinja")] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".jinja"))


def resolve_template(spec: str | None, tokenizer) -> str:
    """The template text: a shipped name, a file, or (spec None) the tokenizer's own."""
    if spec:
        if spec in template_names():
            path = os.path.join(TEMPLATE_DIR, f"{spec}.jinja")
        else:
            path = os.path.expanduser(spec)
            if not os.path.isfile(path):
                raise DataError(f"chat_template {spec!r} is neither a file nor one of the shipped templates "
                                f"({', '.join(template_names())})")
        with open(path, encoding="utf-8") as f:
            return f.read()
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise DataError(f"the tokenizer has no chat template; set chat_template in the dataset entry to a .jinja file "
                        f"or one of {', '.join(template_names())}")
    return own


def _text_of(content) -> str:
    """A message's content as one string: text parts joined (what a text-only model sees)."""
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def normalize_messages(messages) -> list[dict]:
    """Checked copies of the messages as templates expect them: None fields dropped, missing content "", text parts
    joined into one string. DataError (naming the message) for anything a text chat cannot hold."""
    if not isinstance(messages, list) or not messages:
        raise DataError("column 'messages' must be a non-empty list of {role, content} objects")
    out = []
    for k, m in enumerate(messages):
        where = f"message {k}"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise DataError(f"{where} needs a string 'role'")
        m = {key: value for key, value in m.items() if value is not None}  # parquet/arrow fill absent fields with None
        where = f"message {k} ({m['role']})"
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise DataError(f"{where}: 'tool_calls' must be a list of objects")
            for c in calls:
                fn = c.get("function", c)
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise DataError(f"{where}: every tool call needs a function name ({{'function': {{'name': ...}}}})")
            if not calls:
                del m["tool_calls"]
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise DataError(f"{where}: content part of type {kind!r} is not text; only text is trained")
            m["content"] = _text_of(content)
        elif content is None:
            if not (m["role"] == "assistant" and m.get("tool_calls")):
                raise DataError(f"{where} has no 'content' (only an assistant turn with tool_calls may omit it)")
            m["content"] = ""
        elif not isinstance(content, str):
            raise DataError(f"{where}: 'content' must be a string, a list of text parts, or null on a tool-call turn")
        if "reasoning_content" not in m:  # other names datasets use for it
            for alias in ("reasoning", "thinking"):
                if isinstance(m.get(alias), str):
                    m["reasoning_content"] = m[alias]
                    break
        if not isinstance(m.get("reasoning_content", ""), str):
            raise DataError(f"{where}: 'reasoning_content' must be a string")
        if m.get("weight", 1) not in (0, 1):
            raise DataError(f"{where}: 'weight' must be 0 (not trained) or 1, got {m['weight']!r}")
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError("conversation has no assistant turn, so nothing to train on")
    return out


def _tools_of(row) -> list | None:
    tools = row.get("tools")
    if isinstance(tools, str):  # often a JSON string in parquet / HF datasets
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"column 'tools' is a string but not JSON ({e.msg})") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError("column 'tools' must be a list of tool definitions (objects)")
    return tools


def _answer(m: dict) -> str:
    """The part of an assistant turn every template keeps: its content without an inline reasoning block."""
    text = m["content"]
    if "reasoning_content" not in m and "</think>" in text:
        text = text.split("</think>")[-1]
    return text.strip()


def _call_names(m: dict) -> list[str]:
    return [c.get("function", c)["name"] for c in m.get("tool_calls", [])]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _snippet(text: str, at: int) -> str:
    return repr(text[at:at + 40] + ("..." if len(text) > at + 40 else ""))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


class ChatFormat:
    """How one dataset's conversations become documents: template, its variables and which turns are trained."""

    def __init__(self, tokenizer, chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                 mask_history: bool = False):
        if tokenizer is None:
            raise DataError("messages datasets need a tokenizer (model.tokenizer_path)")
        self.tokenizer = tokenizer
        self.template = resolve_template(chat_template, tokenizer)
        self.kwargs = dict(chat_template_kwargs or {})
        bad = sorted(set(self.kwargs) & set(RESERVED_KWARGS))
        if bad:
            raise DataError(f"chat_template_kwargs may not set {', '.join(bad)} (the data pipeline sets them)")
        self.mask_history = bool(mask_history)
        self.marked = bool(GENERATION_MARK.search(self.template))
        vocab = tokenizer.get_vocab()
        eos = getattr(tokenizer, "eos_token", None)
        self.end_tokens = [t for t in dict.fromkeys([*END_OF_TURN, eos]) if t and t in vocab]

    @classmethod
    def for_dataset(cls, ds, tokenizer) -> "ChatFormat":
        get = (lambda k: ds.get(k)) if isinstance(ds, dict) else (lambda k: getattr(ds, k, None))
        try:
            return cls(tokenizer, get("chat_template"), get("chat_template_kwargs"), bool(get("mask_history")))
        except DataError as e:
            raise DataError(f"dataset {get('path')}: {e}") from None

    def fingerprint(self) -> dict:
        """What the documents depend on besides the rows and the tokenizer (for the tokenized-data cache)."""
        return {"template": hashlib.sha256(self.template.encode()).hexdigest(), "kwargs": self.kwargs,
                "mask_history": self.mask_history}

    # ------------------------------------------------------------------------------------------------ rendering
    def render(self, messages, tools, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **self.kwargs)
        except Exception as e:  # jinja raises many types (TemplateError, TypeError, ...): all mean "this row"
            text = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"the chat template failed on this conversation ({type(e).__name__}: {text})") from None

    def document(self, row: dict):
        """(ids, targets): the rendered conversation's tokens; targets[t] = ids[t + 1] where that token is trained."""
        messages = normalize_messages(row.get("messages"))
        tools = _tools_of(row)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        chosen = turns[-1:] if self.mask_history else turns
        chosen = [i for i in chosen if messages[i].get("weight", 1) != 0]
        if not chosen:
            raise DataError("no assistant turn to train on (every one has weight 0"
                            + (", or the last one does and mask_history is set)" if self.mask_history else ")"))
        if self.marked:
            ids, mask = self._marked(messages, tools, turns, chosen)
        else:
            ids, mask = self._located(messages, tools, turns, chosen)
        return ids, shift_targets(ids, mask)

    def _located(self, messages, tools, turns, chosen):
        full = self.render(messages, tools, False)
        spans = []
        for i in chosen:
            n = turns.index(i) + 1
            start, end = self._span(messages, tools, full, i, n)
            if spans and start < spans[-1][1]:
                raise DataError(f"assistant turn {n} (message {i}) starts inside the previous turn's text; the "
                                f"template's turns cannot be told apart")
            spans.append((start, end))
        self._check_context_rendered(messages, full)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int64)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
        mask = np.zeros(len(ids), bool)
        for s, e in spans:
            mask |= (starts >= s) & (starts < e)
        return ids, mask

    @staticmethod
    def _check_context_rendered(messages, full: str) -> None:
        """A template drops the turns of roles it does not know (Qwen3's drops 'human', 'developer', ...): the
        assistant turns would be trained without what they answer. Every turn's text must be in the conversation."""
        for k, m in enumerate(messages):
            text = m["content"].strip() if m["role"] != "assistant" else ""
            if text and text not in full:
                raise DataError(f"message {k} ({m['role']}): the chat template leaves its content out of the "
                                f"conversation (a role it does not render?); use the roles it renders (Qwen's: "
                                f"system, user, assistant, tool)")

    def _span(self, messages, tools, full: str, i: int, n: int) -> tuple[int, int]:
        what = f"assistant turn {n} (message {i})"
        prompt = self.render(messages[:i], tools, True)
        agree = _common_prefix(prompt, full)
        if agree == len(prompt):
            start = agree
        else:
            before = self.render(messages[:i], tools, False)
            header = prompt[len(before):] if prompt.startswith(before) else ""
            header = header[:header.find("\n") + 1] if "\n" in header else header
            if not header or agree < len(before) + len(header):
                raise DataError(f"{what}: the template renders the conversation before this turn differently from "
                                f"the prompt it gives for it (at character {agree}: prompt {_snippet(prompt, agree)}, "
                                f"conversation {_snippet(full, agree)}), so the turn cannot be located")
            start = len(before) + len(header)
        found = [(full.find(t, start), t) for t in self.end_tokens]
        found = [(p, t) for p, t in found if p >= 0]
        if not found:
            raise DataError(f"{what}: no end-of-turn token ({', '.join(self.end_tokens) or 'the tokenizer has no eos'})"
                            f" after it in the rendered conversation; the model would not learn to stop")
        pos, token = min(found, key=lambda f: (f[0], -len(f[1])))  # the first one; the longer at a tie
        end = pos + len(token)
        text = full[start:end]
        answer = _answer(messages[i])
        if answer and answer not in text:
            raise DataError(f"{what}: its content is not in the text the template renders for it ({text[:80]!r}); "
                            f"the template moves or rewrites it, so the turn cannot be located")
        for name in _call_names(messages[i]):
            if name not in text:
                raise DataError(f"{what}: its tool call {name!r} is not in the text the template renders for it "
                                f"({text[:80]!r})")
        return start, end

    def _marked(self, messages, tools, turns, chosen):
        """A template with {% generation %} blocks: transformers' assistant mask, one run of tokens per turn."""
        try:
            out = self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.template,
                                                     tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True, **self.kwargs)
        except Exception as e:
            text = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"the chat template failed on this conversation ({type(e).__name__}: {text})") from None
        ids = np.asarray(out["input_ids"], np.int64)
        mask = np.asarray(out["assistant_masks"], bool)
        runs = _runs(mask)
        if not runs:
            raise DataError("the template's {% generation %} blocks cover no text of this conversation")
        if len(runs) != len(turns):
            if chosen != turns:
                raise DataError(f"the template's {{% generation %}} blocks give {len(runs)} spans for {len(turns)} "
                                f"assistant turns, so weight / mask_history cannot pick turns")
            return ids, mask
        mask = np.zeros(len(ids), bool)
        for i, (a, b) in zip(turns, runs):
            n = turns.index(i) + 1
            text = self.tokenizer.decode(ids[a:b].tolist())
            answer = _answer(messages[i])
            if (answer and answer not in text) or any(name not in text for name in _call_names(messages[i])):
                raise DataError(f"assistant turn {n} (message {i}): the template's generation block "
                                f"{text[:80]!r} does not hold the turn's content")
            if i in chosen:
                mask[a:b] = True
        return ids, mask


def fingerprint(ds, tokenizer) -> dict | None:
    """The chat settings of a dataset entry as the cache key needs them; None for other dataset types."""
    kind = ds.get("type") if isinstance(ds, dict) else getattr(ds, "type", None)
    if kind != "messages" or tokenizer is None:
        return None
    return ChatFormat.for_dataset(ds, tokenizer).fingerprint()
