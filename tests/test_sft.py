"""The sft task: assistant-only targets, truncation, bad lines, generation eval, the profile date."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import gearshift as gs
from conftest import kill_at_checkpoint
from gearshift.data import byte_level_tokenizer
from gearshift.data.chat import IGNORE_INDEX, ChatCollator, tokenize_conversation
from gearshift.errors import DataError
from gearshift.tasks import CausalLMLoss
from gearshift.tasks.generation import GenerationPrompt, generate_answers
from gearshift.tasks.lm import build_causal_lm

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4, of course"}]


def sft_config(root: Path, name: str = "sft", **sections: Any) -> dict[str, Any]:
    """A ~20k-parameter chat model on 1-digit addition: seconds per run on a CPU."""
    cfg: dict[str, Any] = {
        "task": "sft", "name": name, "seed": 5, "output_dir": str(root / name),
        "model": {"build": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 128}},
        "data": {"source": "synthetic", "seq_len": 96, "synthetic": {
            "name": "addition", "num_train": 160, "num_eval": 12, "options": {"digits": 1}}},
        "profile": {"name": "concise", "date": "2026-12-03"},
        "eval": {"generate": {"num_samples": 6, "max_new_tokens": 3, "batch_size": 4,
                              "keep_samples": 2}},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 1},
        "training": {"max_steps": 12, "batch_size": 8, "eval_every": 4, "log_every": 1},
        "checkpoint": {"every": 4, "keep_last": 10},
        "logging": {"progress_bar": False, "tensorboard": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(cfg.get(section), dict) else values
    return cfg


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.open()] if path.is_file() else []


def test_every_assistant_token_and_only_those_is_a_target() -> None:
    tok = byte_level_tokenizer()
    example = tokenize_conversation(tok, CHAT, seq_len=256)
    assert example is not None and not example.truncated
    text = tok.apply_chat_template(CHAT, tokenize=False)
    # Byte-level and ASCII: token i is character i (the specials are one token each).
    spans, expected = [], set()
    pieces = text.replace("<|bos|>", "\x01").replace("<|eos|>", "\x02")
    assert len(pieces) == len(example.input_ids)
    start = 0
    for reply in ("3", "4, of course"):
        begin = pieces.index("assistant: " + reply, start) + len("assistant: ")
        spans.append((begin, begin + len(reply) + 1))  # the reply and its EOS
        start = begin
    for begin, end in spans:
        expected.update(range(begin, end))
    targets = {i for i, t in enumerate(example.labels) if t != IGNORE_INDEX}
    assert targets == expected
    assert all(example.labels[i] == example.input_ids[i] for i in targets)
    assert tok.decode([example.input_ids[i] for i in sorted(targets)]) == \
        "3<|eos|>4, of course<|eos|>"
    everything = tokenize_conversation(tok, CHAT, seq_len=256, train_on="all")
    assert everything is not None and everything.labels == everything.input_ids
    # Batched: pads are never targets, and the loss counts exactly these tokens (minus the
    # first position, which nothing predicts).
    short = tokenize_conversation(tok, CHAT[1:3], seq_len=256)
    batch = ChatCollator(tok.pad_token_id)([
        {"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels)}
        for e in (example, short)])
    assert CausalLMLoss().units(batch) == len(expected) + 2
    assert int(batch["attention_mask"][1].sum()) == len(short.input_ids)


def test_left_truncation_keeps_the_last_assistant_turn_whole() -> None:
    tok = byte_level_tokenizer()
    long_chat = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "q?"}, {"role": "assistant", "content": "final"}]
    example = tokenize_conversation(tok, long_chat, seq_len=28)
    assert example is not None and example.truncated and len(example.input_ids) == 28
    assert tok.decode(example.input_ids).endswith("user: q?\nassistant: final<|eos|>\n")
    targets = [t for t in example.labels if t != IGNORE_INDEX]
    assert tok.decode(targets) == "final<|eos|>"
    # Cutting into the last turn (its "assistant: " header included) is never done: skipped.
    assert tokenize_conversation(tok, long_chat, seq_len=17) is None
    assert tokenize_conversation(tok, long_chat, seq_len=18) is not None  # the whole last turn


def test_truncated_and_too_long_conversations_are_counted(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    chats = [[{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok"}]
             for n in (1, 2, 3, 30, 31, 2)]
    chats.append([{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 90}])
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    cfg = sft_config(tmp_path, data={"source": "jsonl", "paths": [str(data)], "seq_len": 64,
                                     "synthetic": None, "eval_fraction": 0.0},
                     profile={"name": "none"}, training={"max_steps": 3, "eval_every": None})
    result = gs.train(cfg)
    assert result.metrics["data/truncated"] == 2.0
    assert result.metrics["data/too_long"] == 1.0
    first = rows(result.run_dir / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["data/truncated"] == 2.0


@pytest.mark.parametrize(("messages", "reason"), [
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}],
     "messages[0]: unknown role 'robot'; valid roles: system, user, assistant"),
    ([{"role": "user", "content": "hi"}], "'messages' has no assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}],
     "messages[0]: content must be a string, got int"),
])
def test_bad_conversation_lines_are_named_by_file_and_line(
        tmp_path: Path, messages: list[dict[str, Any]], reason: str) -> None:
    good = json.dumps({"messages": CHAT[1:3]})
    data = tmp_path / "chats.jsonl"
    data.write_text(f"{good}\n{good}\n{json.dumps({'messages': messages})}\n{good}\n")
    cfg = sft_config(tmp_path, data={"source": "jsonl", "paths": [str(data)],
                                     "synthetic": None, "eval_fraction": 0.0},
                     training={"max_steps": 2, "eval_every": None})
    with pytest.raises(DataError) as err:
        gs.train(cfg)
    assert str(err.value).startswith(f"{data}:3: {reason}")
    assert "data.on_error: skip" in str(err.value)
    cfg["data"]["on_error"] = "skip"
    result = gs.train(cfg)
    assert result.metrics["data/skipped_lines"] == 1.0


def test_batched_left_padded_generation_equals_one_at_a_time() -> None:
    tok = byte_level_tokenizer()
    cfg = gs.load_config({"model": {"build": {"hidden_size": 32, "intermediate_size": 64,
                                              "num_hidden_layers": 2, "num_attention_heads": 2}}})
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id).eval()
    prompts = [GenerationPrompt([{"role": "user", "content": "x" * n}], "") for n in (1, 9, 30)]
    batched = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate_answers(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert len({len(a) for a in alone}) >= 1 and any(alone)


def test_sft_run_logs_exact_match_samples_and_final_loads_with_its_template(
        tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = gs.train(sft_config(tmp_path))
    assert result.step == 12 and result.metrics["eval/loss"] < result.metrics["eval/loss_before"]
    evals = [r for r in rows(result.run_dir / "metrics.jsonl") if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all(0.0 <= r["eval/exact_match"] <= 1.0 for r in evals)
    samples = rows(result.run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 4, 4, 8, 8, 12, 12]
    assert all(s["prompt"].endswith("=") and s["reference"] == str(eval(s["prompt"][:-1]))
               for s in samples)
    (event,) = [e for e in rows(result.run_dir / "events.jsonl") if e["event"] == "system_prompt"]
    assert event["system_prompt"] == "Current date: 2026-12-03. Respond naturally and concisely."
    final = result.run_dir / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = [{"role": "system", "content": event["system_prompt"]},
              {"role": "user", "content": samples[-1]["prompt"]}]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    # The run's evaluation saw the same system prompt and template as this user does.
    assert answer.split("<|eos|>")[0].startswith(samples[-1]["completion"])


def test_generation_sees_the_training_system_prompt_and_template(tmp_path: Path) -> None:
    from gearshift.tasks.sft import SftTask

    cfg = gs.load_config(sft_config(tmp_path, profile={"name": "default", "date": "2026-12-04"},
                                    data={"seq_len": 128}))
    task = SftTask(cfg)
    parts = task.build()
    system = {"role": "system",
              "content": "You are sft, a helpful assistant. Today is Friday, 2026-12-04."}
    assert all(p.messages[0] == system and p.messages[-1]["role"] == "user"
               for p in task.prompts)
    tok = parts.tokenizer
    first = parts.train_data[0]["input_ids"].tolist()
    assert "data/truncated" not in task.counts
    assert tok.decode(first).startswith("<|bos|>system: " + system["content"] + "\nuser: ")


class StopAt(gs.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: gs.Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step == self.step:
            trainer.should_stop = True


def test_resumed_tomorrow_the_run_trains_on_the_same_text(tmp_path: Path, cli,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gearshift.data import profiles

    day = datetime.date(2026, 12, 3)
    monkeypatch.setattr(profiles, "today", lambda: day)
    straight = gs.train(sft_config(tmp_path, "straight", profile={"date": None})).run_dir
    stopped = gs.train(sft_config(tmp_path, "stopped", profile={"date": None}),
                       callbacks=[StopAt(5)])
    assert stopped.step == 5
    assert gs.load_config(str(stopped.run_dir / "config.yaml")).profile.date == "2026-12-03"

    monkeypatch.setattr(profiles, "today", lambda: day + datetime.timedelta(days=1))
    code, _, _ = cli("resume", str(stopped.run_dir))
    assert code == 0
    prompts = [e for e in rows(stopped.run_dir / "events.jsonl") if e["event"] == "system_prompt"]
    assert [e["date"] for e in prompts] == ["2026-12-03", "2026-12-03"]
    assert {e["system_prompt"] for e in prompts} == \
        {"Current date: 2026-12-03. Respond naturally and concisely."}
    metric = lambda run: [(r["step"], r.get("loss"), r.get("eval/exact_match"))  # noqa: E731
                          for r in rows(run / "metrics.jsonl")]
    # The stop at step 5 ended that run with an evaluation of its own; the rest is identical.
    assert [m for m in metric(stopped.run_dir) if m[0] != 5 or m[1] is not None] == \
        metric(straight)
    wa = load_file(straight / "final" / "model.safetensors")
    wb = load_file(stopped.run_dir / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A new run started "tomorrow" does render tomorrow's date.
    fresh = gs.train(sft_config(tmp_path, "fresh", profile={"date": None},
                                training={"max_steps": 2, "eval_every": None}))
    (event,) = [e for e in rows(fresh.run_dir / "events.jsonl") if e["event"] == "system_prompt"]
    assert event["date"] == "2026-12-04"


def test_sft_with_generation_eval_survives_sigkill_with_exact_resume(tmp_path: Path) -> None:
    cfg = sft_config(tmp_path, "victim", training={"max_steps": 16})
    straight = gs.train({**cfg, "name": "straight", "output_dir": str(tmp_path / "straight")})
    run_dir = kill_at_checkpoint(cfg, 8, tmp_path / "victim.json")

    resumed = gs.train(cfg, resume=run_dir)
    assert resumed.step == 16
    (resume,) = [e for e in rows(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert 8 <= resume["step"] < 16
    strip = lambda run: [{k: v for k, v in r.items()  # noqa: E731
                          if k not in ("tokens_per_s", "memory/peak_mb")}
                         for r in rows(run / "metrics.jsonl")]
    assert strip(run_dir) == strip(straight.run_dir)  # loss, lr, eval/loss, eval/exact_match
    assert [r["step"] for r in strip(run_dir) if "eval/exact_match" in r] == [0, 4, 8, 12, 16]
    assert rows(run_dir / "samples.jsonl") == rows(straight.run_dir / "samples.jsonl")
    assert resumed.metrics["eval/exact_match"] == straight.metrics["eval/exact_match"]
    wa = load_file(straight.run_dir / "final" / "model.safetensors")
    wb = load_file(run_dir / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_with_lora_generates_through_the_adapter(tmp_path: Path) -> None:
    cfg = sft_config(tmp_path, "lora", lora={"enabled": True, "r": 4, "alpha": 8.0},
                     training={"max_steps": 4})
    result = gs.train(cfg)
    evals = [r for r in rows(result.run_dir / "metrics.jsonl") if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert (result.run_dir / "final" / "adapter_config.json").is_file()
    assert len(rows(result.run_dir / "samples.jsonl")) == 4


def test_config_errors_name_what_sft_needs(tmp_path: Path) -> None:
    with pytest.raises(gs.ConfigError) as err:
        gs.load_config({"task": "sft", "sft": {"train_on": "user"}})
    text = str(err.value)
    assert "data.source: task: sft reads chat conversations, not 'pydoc_topics'" in text
    assert "sft.train_on" in text
    with pytest.raises(gs.ConfigError, match="eval.generate: task: lm has no prompts"):
        gs.load_config({"eval": {"generate": {"num_samples": 4}}})
    with pytest.raises(gs.ConfigError, match="eval.generate.max_new_tokens"):
        gs.load_config(sft_config(tmp_path, eval={"generate": {"max_new_tokens": 0}}))
