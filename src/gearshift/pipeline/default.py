"""The embedded default pipeline: ``gearshift pipeline run`` with no file (and ``make run``).

Four stages on a laptop CPU, nothing downloaded:

1. ``pretrain``: the embedded default model (a small byte-level Llama) on the Python reference
   manual that ships with CPython, the same stage ``gearshift train`` runs alone;
2. ``sft``: LoRA fine-tuning of it, with alpha phases (foundation -> balance -> emphasis), on a
   verifiable synthetic chat task (2-digit addition) under the ``concise`` profile;
3. ``rl``: REINFORCE on that task's exact-match reward, from the merged SFT model;
4. ``qat``: BitNet b1.58 quantization-aware training of the RL model on the same chats, whose
   ``final/`` is a packed ternary model.

``examples/pipeline.yaml`` spells the same pipeline out.
"""

from __future__ import annotations

import copy
from typing import Any

#: The chat task every stage after pretraining works on, and how it is judged.
CHAT_DATA: dict[str, Any] = {
    "source": "synthetic",
    "synthetic": {"name": "addition", "num_train": 20000, "num_eval": 200,
                  "options": {"digits": 2}},
    "seq_len": 128,
}
CHAT_PROFILE: dict[str, Any] = {"name": "concise", "date": None, "policy": "replace"}
CHAT_EVAL: dict[str, Any] = {"generate": {"num_samples": 100, "max_new_tokens": 6,
                                          "temperature": 0, "keep_samples": 4}}

DEFAULT_PIPELINE: dict[str, Any] = {
    "name": "default",
    "output_dir": "pipelines",
    "stages": [
        # Exactly `gearshift train` with no config (2 epochs, 434 steps), under its own name.
        {"name": "pretrain", "config": {"task": "lm", "name": "pretrain"}},
        {"name": "sft", "from": "pretrain", "config": {
            "task": "sft", "name": "sft",
            "model": {"tokenizer": "auto"},
            "data": CHAT_DATA, "profile": CHAT_PROFILE, "eval": CHAT_EVAL,
            "sft": {"train_on": "assistant"},
            "lora": {"enabled": True, "r": 16, "alpha": 8,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj", "lm_head"]},
            "phases": {"window": 30, "patience": 5, "phases": [
                {"name": "foundation", "alpha": 8, "min_steps": 40, "max_steps": 100,
                 "exit": {"relative_improvement_below": 0.002, "max_cv": 0.5}},
                {"name": "balance", "alpha": 12, "min_steps": 40, "max_steps": 100,
                 "exit": {"relative_improvement_below": 0.002, "max_cv": 0.5}},
                {"name": "emphasis", "alpha": 16}]},
            # A decaying LR: with a constant 5e-3 and alpha 32 the exact match fell from 3%
            # (step 100) to 0% (step 300) as the eval loss rose.
            "optim": {"learning_rate": 3.0e-3},
            "schedule": {"name": "warmup_cosine", "warmup_steps": 20},
            "training": {"max_steps": 250, "batch_size": 32, "eval_every": 50,
                         "log_every": 10},
            "checkpoint": {"every": 50},
            "logging": {"progress_bar": False},
        }},
        {"name": "rl", "from": "sft", "config": {
            "task": "reinforce", "name": "rl",
            "model": {"tokenizer": "auto"},
            "data": CHAT_DATA, "profile": CHAT_PROFILE, "eval": CHAT_EVAL,
            "rl": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 6,
                   "temperature": 1.0, "top_p": 1.0, "reward": {"name": "exact_match"},
                   "baseline": "leave_one_out", "normalize_advantages": True,
                   "entropy_coefficient": 0.01, "entropy_decay": 0.995,
                   "kl_coefficient": 0.0, "validation_every": 20, "patience": 10,
                   "keep": "best"},
            "optim": {"learning_rate": 1.0e-4},
            "schedule": {"name": "constant", "warmup_steps": 5},
            "training": {"max_steps": 40, "eval_every": 20, "log_every": 5},
            "checkpoint": {"every": 20},
            "logging": {"progress_bar": False},
        }},
        {"name": "qat", "from": "rl", "config": {
            "task": "sft", "name": "qat",
            "model": {"tokenizer": "auto"},
            "data": CHAT_DATA, "profile": CHAT_PROFILE, "eval": CHAT_EVAL,
            "quantization": {"method": "bitnet_b158", "ramp": {"steps": 30, "shape": "linear"}},
            "optim": {"learning_rate": 1.0e-3},
            "schedule": {"name": "warmup_cosine", "warmup_steps": 10},
            "training": {"max_steps": 100, "batch_size": 32, "eval_every": 50,
                         "log_every": 10},
            "checkpoint": {"every": 50},
            "logging": {"progress_bar": False},
        }},
    ],
}


def default_pipeline() -> dict[str, Any]:
    """A fresh copy of :data:`DEFAULT_PIPELINE`."""
    return copy.deepcopy(DEFAULT_PIPELINE)
