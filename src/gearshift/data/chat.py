"""Chat conversations: reading them from JSONL, rendering them with a chat template, batching.

A conversation is a list of ``{role, content}`` messages (roles ``system``, ``user``,
``assistant``) with at least one assistant turn. It is rendered with the tokenizer's own chat
template (``apply_chat_template``); the template's ``{% generation %}`` markers tell which
tokens the assistant wrote, and only those are targets unless ``train_on="all"``.

Example:
    >>> from gearshift.data import byte_level_tokenizer
    >>> tok = byte_level_tokenizer()
    >>> chat = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    >>> example = tokenize_conversation(tok, chat, seq_len=64)
    >>> tok.decode([t for t in example.labels if t != IGNORE_INDEX])
    '2<|eos|>'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gearshift.data.corpus import jsonl_lines, read_data_file
from gearshift.errors import DataError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass
class Conversations:
    """Conversations read from files, plus the bad lines skipped on the way in."""

    conversations: list[list[dict[str, str]]]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each skipped line


@dataclass
class ChatExample:
    """One rendered conversation: token ids, their targets, and whether history was cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def check_messages(messages: Any, messages_field: str = "messages") -> list[dict[str, str]]:
    """The messages as plain dicts, or a ValueError saying what is wrong with them."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{messages_field!r} must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{messages_field}[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{messages_field}[{i}]: unknown role {role!r}; valid roles: "
                             f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{messages_field}[{i}]: content must be a string, got "
                             f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{messages_field!r} has no assistant turn; there is nothing to learn")
    return out


def load_conversations(paths: Sequence[str | Path], *, messages_field: str = "messages",
                       on_error: str = "error") -> Conversations:
    """Read conversations from JSONL files, one ``{messages_field: [...]}`` object per line.

    Raises:
        DataError: naming ``file:line`` of the first bad line (with ``on_error="error"``), a
            missing or empty file, or files with no usable conversation at all.
    """
    if not paths:
        raise DataError("data.source is 'jsonl' but data.paths is empty; list your files")
    out = Conversations([])
    for path in paths:
        p, raw = Path(path), read_data_file(path)
        for lineno, line in jsonl_lines(p, raw):
            try:
                out.conversations.append(_record(line, messages_field))
            except ValueError as exc:
                where = f"{p}:{lineno}: {exc}"
                if on_error != "skip":
                    raise DataError(where + " (or set data.on_error: skip to skip bad lines)") \
                        from None
                out.skipped.append(where)
    if not out.conversations:
        raise DataError(f"no usable conversations in {', '.join(map(str, paths))} "
                        f"({len(out.skipped)} lines skipped as bad)")
    return out


def _record(line: str, messages_field: str) -> list[dict[str, str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if messages_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(f"missing field {messages_field!r}; keys found: {keys}")
    return check_messages(record[messages_field], messages_field)


def last_assistant(messages: Sequence[dict[str, str]]) -> int:
    """Index of the last assistant message."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def render_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *,
               add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template."""
    if not messages:
        return []
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], *, seq_len: int,
                          train_on: str = "assistant") -> ChatExample | None:
    """Render a conversation, mark its targets, and fit it into ``seq_len`` tokens.

    A conversation longer than ``seq_len`` loses tokens from the left of its history; the cut
    never falls inside the last assistant turn (its header included). When that turn alone does
    not fit, the conversation is skipped: None.

    Args:
        tokenizer: A tokenizer whose chat template has ``{% generation %}`` markers.
        messages: The conversation (with its system prompt already in place).
        seq_len: The most tokens kept.
        train_on: ``assistant`` (targets: the assistant's tokens) or ``all``.
    """
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    labels = ids[:] if train_on == "all" else [
        t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    if len(ids) <= seq_len:
        return ChatExample(ids, labels)
    turn_start = len(render_ids(tokenizer, messages[: last_assistant(messages)]))
    cut = len(ids) - seq_len
    if cut > turn_start:
        return None
    return ChatExample(ids[cut:], labels[cut:], truncated=True)


@dataclass
class ChatCollator:
    """Pads rendered conversations on the right into ``input_ids``, ``labels``,
    ``attention_mask`` tensors (pads are never targets)."""

    pad_token_id: int

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[row, :n] = s["input_ids"]
            labels[row, :n] = s["labels"]
            attention[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}
