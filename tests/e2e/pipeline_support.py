"""Tiny real stage configs for the pipeline tests: seconds per stage on a CPU, no downloads."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

CHAT_DATA = {"source": "synthetic", "seq_len": 96, "synthetic": {
    "name": "addition", "num_train": 160, "num_eval": 12, "options": {"digits": 1}}}
QUIET = {"progress_bar": False, "tensorboard": False}


def pretrain_stage(corpus: Path, **training: Any) -> dict[str, Any]:
    """A ~30k-parameter byte-level Llama on a small corpus (task lm)."""
    return {"name": "pretrain", "config": {
        "task": "lm", "name": "pretrain", "seed": 7,
        "model": {"build": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 128}},
        "data": {"source": "text", "paths": [str(corpus)], "seq_len": 32},
        "optim": {"learning_rate": 3e-3},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 2},
        "training": {"max_steps": 8, "batch_size": 8, "eval_every": 4, "log_every": 1,
                     **training},
        "checkpoint": {"every": 4, "keep_last": 10},
        "logging": dict(QUIET)}}


def chat_config(name: str, **sections: Any) -> dict[str, Any]:
    """A chat stage (task sft) on 1-digit addition under the concise profile."""
    cfg: dict[str, Any] = {
        "task": "sft", "name": name, "seed": 5,
        "model": {"tokenizer": "auto"},
        "data": CHAT_DATA,
        "profile": {"name": "concise", "date": "2026-12-03"},
        "eval": {"generate": {"num_samples": 6, "max_new_tokens": 3, "batch_size": 6,
                              "keep_samples": 2}},
        "optim": {"learning_rate": 3e-3},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 1},
        "training": {"max_steps": 8, "batch_size": 8, "eval_every": 4, "log_every": 1},
        "checkpoint": {"every": 4, "keep_last": 10},
        "logging": QUIET,
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(cfg.get(section), dict) else values
    return copy.deepcopy(cfg)  # tests change their copy; the module's constants stay as they are


#: LoRA with two alpha phases, the second forced after a few steps.
LORA = {"enabled": True, "r": 4, "alpha": 4.0}
PHASES = {"window": 3, "patience": 1, "phases": [
    {"name": "foundation", "alpha": 4, "min_steps": 2, "max_steps": 4},
    {"name": "emphasis", "alpha": 8}]}


def sft_stage(source: str = "pretrain", **sections: Any) -> dict[str, Any]:
    return {"name": "sft", "from": source,
            "config": chat_config("sft", lora=LORA, phases=PHASES, **sections)}


def qat_stage(source: str = "sft", name: str = "qat", **sections: Any) -> dict[str, Any]:
    return {"name": name, "from": source, "config": chat_config(
        name, quantization={"method": "bitnet_b158", "ramp": {"steps": 2}}, **sections)}


def three_stages(corpus: Path, output_dir: Path, name: str = "chain") -> dict[str, Any]:
    """pretrain -> sft (LoRA, alpha phases) -> qat (from the merged SFT model)."""
    return {"name": name, "output_dir": str(output_dir),
            "stages": [pretrain_stage(corpus), sft_stage(), qat_stage()]}


def sha256_tree(directory: Path, root: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``; with ``root``, the text
    files are hashed with ``root``'s absolute path replaced (an adapter names its base model
    by absolute path, which differs between two pipeline directories)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if root is not None and p.suffix in (".json", ".md"):
            data = data.replace(str(root.resolve()).encode(), b"ROOT")
        if root is not None and p.name == "adapter_config.json":
            # PEFT writes target_modules from a set: its order follows the process's hash seed.
            config = json.loads(data)
            config["target_modules"] = sorted(config["target_modules"])
            data = json.dumps(config, sort_keys=True).encode()
        out[p.relative_to(directory).as_posix()] = hashlib.sha256(data).hexdigest()
    return out
