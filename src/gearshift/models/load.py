"""Loading what a model directory holds: a model, or the base of an adapter and the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gearshift.errors import ModelError
from gearshift.models.validate import adapter_base, is_adapter_dir, require_model_dir


def load_base_model(path: str | Path) -> Any:
    """The causal LM to build on: the model in ``path``, or for an adapter directory its base.

    The adapter itself is put on by the model transform that continues it
    (:class:`gearshift.transforms.AdapterTransform`), so that checkpoints and the export treat
    it as trainable LoRA weights.

    Raises:
        ModelError: When the directory (or the adapter's base) is invalid, naming every
            problem, or when transformers cannot load it.
    """
    path = Path(path)
    require_model_dir(path, tokenizer=False)
    source = (adapter_base(path) if is_adapter_dir(path) else path).resolve()
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True,
                                                    use_safetensors=None)
    except Exception as exc:  # transformers, safetensors and torch each raise their own types
        raise ModelError(f"cannot load the model in {source}: {_first_line(exc)}") from None


def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = True) -> Any:
    """Put the PEFT adapter in ``path`` on ``model`` (its base); the ``PeftModel``.

    Raises:
        ModelError: When the adapter does not fit the model or PEFT cannot read it.
    """
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except Exception as exc:  # PEFT raises ValueError, KeyError, RuntimeError... per fault
        raise ModelError(f"cannot load the adapter in {path} onto its base model: "
                         f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
