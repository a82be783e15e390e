"""The ``final/`` directory: a model that transformers (or safetensors) loads as is."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn


def export_final(model: nn.Module, directory: Path, tokenizer: Any = None, *,
                 adapter: bool = False) -> Path:
    """Write the trained model to ``directory`` atomically (temp dir, then rename).

    A transformers model is saved with ``save_pretrained`` (safetensors); any other module as
    ``model.safetensors``. With ``adapter`` (LoRA), a PEFT adapter directory whose config carries
    the alphas in force. The tokenizer, when given, is saved beside it.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if adapter:
        from gearshift.lora import export_adapter

        export_adapter(model, tmp)
    elif hasattr(model, "save_pretrained"):
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one tiny shard does not need a progress bar
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
    else:
        save_model(model, str(tmp / "model.safetensors"))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory
