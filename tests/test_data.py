"""Data: the built-in corpus, files with errors named by file and line, tokenizer, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gearshift.data import byte_level_tokenizer, load_corpus, pack_documents, pydoc_topics
from gearshift.errors import DataError


def test_pydoc_topics_is_real_text() -> None:
    docs = pydoc_topics()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 100_000
    assert any("The "in d for d in docs)


def test_byte_tokenizer_round_trip_and_save(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = byte_level_tokenizer()
    text = "héllo\n\twörld ✓"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids


def test_text_and_jsonl(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("first document", encoding="utf-8")
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                          "content": "hello"}]}) + "\n",
        encoding="utf-8")
    assert load_corpus("text", [a]).documents == ["first document"]
    assert load_corpus("jsonl", [j]).documents == ["second", "user: hi\nassistant: hello\n"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"text": "ok"}\n{"txt": "x"}\n', r"b.jsonl:2: missing field 'text'.*keys found: txt"),
        (b'{"text": "ok"}\n{"text": "trunc', r"b.jsonl:2: not valid JSON"),
        (b'{"text": "ok"}\n[1, 2]\n', r"b.jsonl:2: expected a JSON object"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"b.jsonl:2: not valid UTF-8"),
        (b"   \n", r"b.jsonl: data file is empty"),
        (b'{"messages": "hi"}\n', r"b.jsonl:1: 'messages' must be a list"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: bytes, expected: str) -> None:
    f = tmp_path / "b.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        load_corpus("jsonl", [f])


def test_skip_counts_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "b.jsonl"
    f.write_text('{"text": "a"}\nnot json\n{"other": 1}\n{"text": "b"}\n', encoding="utf-8")
    corpus = load_corpus("jsonl", [f], on_error="skip")
    assert corpus.documents == ["a", "b"]
    assert [s.split(": ")[0] for s in corpus.skipped] == [f"{f}:2", f"{f}:3"]


def test_binary_text_file(tmp_path: Path) -> None:
    f = tmp_path / "blob.txt"
    f.write_bytes(b"abc\n\x00\x01\x02")
    with pytest.raises(DataError, match=r"blob.txt:2: contains NUL bytes"):
        load_corpus("text", [f])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_corpus("text", [tmp_path / "nope.txt"])


def test_packing_keeps_every_token_and_holds_out() -> None:
    tok = byte_level_tokenizer()
    docs = ["a" * 50, "b" * 70, "c" * 33]
    packed = pack_documents(docs, tok, seq_len=16, eval_fraction=0.2, seed=1)
    total = 50 + 70 + 33 + 3  # an EOS after each document
    assert packed.num_tokens == total
    n = total // 16
    assert len(packed.train) + len(packed.eval) == n
    assert len(packed.eval) == round(n * 0.2)
    rows = torch.cat([packed.train.input_ids, packed.eval.input_ids])
    assert rows.shape[1] == 16
    assert int((rows == tok.eos_token_id).sum()) <= 3
    again = pack_documents(docs, tok, seq_len=16, eval_fraction=0.2, seed=1)
    assert torch.equal(again.eval.input_ids, packed.eval.input_ids)


def test_too_little_data_is_an_error() -> None:
    with pytest.raises(DataError, match="fewer than one sequence"):
        pack_documents(["abc"], byte_level_tokenizer(), seq_len=64)


def test_byte_tokenizer_chat_template_survives_save_and_marks_assistant_tokens(
        tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    byte_level_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "yes"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|bos|>system: Be brief.\nuser: 1+2=\nassistant: 3<|eos|>\nuser: ok?\n"
        "assistant: yes<|eos|>\n")
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    targets = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(targets) == "3<|eos|>yes<|eos|>"
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) \
        .endswith("user: 1+2=\nassistant: ")
