"""Text corpora: the built-in CPython reference manual, plain-text files and JSONL files.

Every bad input names the file and line: a missing file, an empty one, bytes that are not UTF-8,
a JSONL line that is not JSON, or one missing the field. With ``on_error="skip"`` bad JSONL lines
are skipped and counted instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gearshift.errors import DataError


@dataclass
class Corpus:
    """Documents (strings) plus what was skipped on the way in."""

    documents: list[str]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each skipped line


def pydoc_topics() -> list[str]:
    """The Python reference-manual topics that ship with CPython, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def load_corpus(
    source: str,
    paths: Sequence[str | Path] = (),
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    on_error: str = "error",
    format_messages: Any = None,
) -> Corpus:
    """Load documents from the built-in corpus or from files.

    Args:
        source: ``pydoc_topics``, ``text`` (each file one document) or ``jsonl``.
        paths: files for ``text`` / ``jsonl``.
        text_field: JSONL field holding plain text.
        messages_field: JSONL field holding a chat (list of ``{role, content}``).
        on_error: ``error`` stops at the first bad JSONL line; ``skip`` skips and counts it.
        format_messages: callable turning a message list into text (e.g. a chat template);
            defaults to ``role: content`` lines.

    Raises:
        DataError: naming the file (and line) that is wrong.
    """
    if source == "pydoc_topics":
        return Corpus(pydoc_topics())
    if not paths:
        raise DataError(f"data.source is {source!r} but data.paths is empty; list your files")
    corpus = Corpus([])
    for path in paths:
        p, raw = Path(path), read_data_file(path)
        if source == "text":
            corpus.documents.append(decode_text(p, raw))
        elif source == "jsonl":
            _read_jsonl(p, raw, corpus, text_field, messages_field, on_error,
                        format_messages or _plain_chat)
        else:
            raise DataError(f"unknown data.source {source!r}; valid: pydoc_topics, text, jsonl")
    if not corpus.documents:
        raise DataError(
            f"no usable documents in {', '.join(map(str, paths))} "
            f"({len(corpus.skipped)} lines skipped as bad)"
        )
    return corpus


def decode_text(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "is this a binary file? Convert it to UTF-8 text"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{path}:{line}: contains NUL bytes; this looks like a binary file")
    return text



def read_data_file(path: str | Path) -> bytes:
    """The bytes of a data file, or a :class:`DataError` when it is missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found (check data.paths)")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p}: data file is empty")
    return raw


def jsonl_lines(path: Path, raw: bytes) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of a JSONL file's bytes.

    Only ``"\n"`` ends a JSONL line: ``str.splitlines()`` would also split inside records
    holding U+2028, form feeds and the like, and shift every later line number.
    """
    for lineno, line in enumerate(decode_text(path, raw).split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield lineno, line

def _read_jsonl(
    path: Path,
    raw: bytes,
    corpus: Corpus,
    text_field: str,
    messages_field: str,
    on_error: str,
    format_messages: Any,
) -> None:
    for lineno, line in jsonl_lines(path, raw):
        try:
            corpus.documents.append(_jsonl_record(line, text_field, messages_field, format_messages))
        except ValueError as exc:
            where = f"{path}:{lineno}: {exc}"
            if on_error != "skip":
                raise DataError(where + " (or set data.on_error: skip to skip bad lines)") from None
            corpus.skipped.append(where)


def _jsonl_record(line: str, text_field: str, messages_field: str, format_messages: Any) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get(text_field), str):
        return record[text_field]
    messages = record.get(messages_field)
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError(f"{messages_field!r} must be a list of {{role, content}} strings")
        return format_messages(messages)
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(f"missing field {text_field!r} (or {messages_field!r}); keys found: {keys}")


def _plain_chat(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)
