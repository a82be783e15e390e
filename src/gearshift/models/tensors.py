"""``validate_model_dir(..., load=True)``: tensor names and shapes against the architecture.

The architecture of ``config.json`` is instantiated on the meta device (no memory, no
initialisation), and the weight files are read only as far as their headers: safetensors
headers, or for a legacy ``pytorch_model.bin`` a memory-mapped ``torch.load(weights_only=True)``
onto the meta device. No tensor data is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# PEFT's adapter tensors: ``base_model.model.<module>.<lora part>[.weight]``.
_PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                        r"lora_embedding_B|lora_magnitude_vector)(?:\.weight|\.bias)?$")


@dataclass
class Architecture:
    """The tensors a model class expects, from a meta-device instance."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    tied: list[set[str]]  # names sharing one tensor: storing any one of them is enough
    modules: dict[str, torch.nn.Module]
    ignore_missing: list[str]
    ignore_unexpected: list[str]


def architecture(path: Path, config: dict[str, Any], problems: list[str]) -> Architecture | None:
    """The architecture ``config.json`` in ``path`` describes (None, with a problem, if none)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError... per field
        problems.append(f"config.json cannot be read by transformers ({_first_line(exc)})")
        return None
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if names and cls is None:
        problems.append(f"config.json names the architecture {names[0]!r}, which transformers "
                        f"{transformers.__version__} does not provide; tensor names not checked")
        return None
    try:
        with torch.device("meta"):
            model = cls(hf_config) if cls is not None else AutoModelForCausalLM.from_config(
                hf_config)
    except Exception as exc:  # an inconsistent config fails inside the model's __init__
        problems.append(f"config.json does not build its architecture ({_first_line(exc)})")
        return None
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return Architecture(
        name=type(model).__name__,
        shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
        tied=[g for g in groups.values() if len(g) > 1],
        modules=dict(model.named_modules()),
        ignore_missing=list(getattr(model, "_keys_to_ignore_on_load_missing", None) or []),
        ignore_unexpected=list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []))


def read_shapes(file: Path, problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of one weight file, from its header (None, with a problem)."""
    if file.suffix == ".safetensors":
        from gearshift.checkpoint.inspection import read_tensor_file

        info = read_tensor_file(file)
        if info.error is not None:
            problems.append(f"{file.name} {info.error}")
            return None
        return {t.name: t.shape for t in info.tensors}
    try:
        # mmap + meta: the pickle's structure is read, the tensor data is not.
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError... for bad files
        problems.append(f"{file.name} cannot be read as a weights-only torch file "
                        f"({_first_line(exc)})")
        return None
    if not isinstance(state, dict):
        problems.append(f"{file.name} holds a {type(state).__name__}, not a state dict")
        return None
    return {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_model_tensors(path: Path, config: dict[str, Any], files: list[Path],
                        shard_map: dict[str, str], problems: list[str]) -> int | None:
    """Compare the tensors of ``files`` with the architecture; problems appended.

    Returns:
        How many tensors the files hold (None when they could not be compared).
    """
    arch = architecture(path, config, problems)
    found: dict[str, tuple[int, ...]] = {}
    misplaced = []
    for file in files:
        shapes = read_shapes(file, problems)
        if shapes is None:
            return None
        found.update(shapes)
        misplaced += [n for n, shard in shard_map.items() if shard == file.name and n not in shapes]
    if misplaced:
        problems.append(f"{len(misplaced)} tensors of the shard index are not in the shard it "
                        f"names: {_listed(sorted(misplaced))}")
    if arch is None:
        return len(found)
    unexpected = [n for n in found if n not in arch.shapes
                  and not _ignored(n, arch.ignore_unexpected)]
    tied = {n for group in arch.tied for n in group}
    missing = [n for n in arch.shapes if n not in found and n not in tied
               and not _ignored(n, arch.ignore_missing)]
    missing += [sorted(g)[0] for g in arch.tied if not g & found.keys()]
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in the weights are not in the {arch.name} "
                        f"architecture of config.json: {_listed(sorted(unexpected))}")
    if missing:
        problems.append(f"{len(missing)} tensors of {arch.name} are not in the weights: "
                        f"{_listed(sorted(missing))}")
    _shape_problems(found, arch.shapes, arch.name, problems)
    return len(found)


def check_adapter_tensors(base: Path, base_config: dict[str, Any], weights: Path,
                          problems: list[str]) -> int | None:
    """Compare an adapter's tensors with the modules of its base; problems appended."""
    found = read_shapes(weights, problems)
    arch = architecture(base, base_config, problems)
    if found is None or arch is None:
        return None if found is None else len(found)
    foreign, no_module, plain = [], [], {}
    for name, shape in found.items():
        if not name.startswith(_PEFT_PREFIX):
            foreign.append(name)
            continue
        inner = name[len(_PEFT_PREFIX):]
        match = _LORA_PART.match(inner)
        if match is None:
            # A whole base tensor PEFT saved with the adapter (modules_to_save, or the embedding
            # layers it keeps with a LoRA on them: ``lm_head.base_layer.weight``).
            plain[inner.replace(".base_layer.", ".")] = shape
            continue
        module = arch.modules.get(match["module"])
        if module is None:
            no_module.append(name)
            continue
        _lora_shape(name, match["part"], shape, module, problems)
    if foreign:
        problems.append(f"{len(foreign)} tensors of {weights.name} do not start with PEFT's "
                        f"'{_PEFT_PREFIX}': {_listed(sorted(foreign))}")
    if no_module:
        problems.append(f"{len(no_module)} adapter tensors name modules that the base "
                        f"{arch.name} does not have: {_listed(sorted(no_module))}")
    unknown = [n for n in plain if n not in arch.shapes]
    if unknown:
        problems.append(f"{len(unknown)} tensors of {weights.name} are neither LoRA weights nor "
                        f"tensors of the base {arch.name}: {_listed(sorted(unknown))}")
    _shape_problems({n: s for n, s in plain.items() if n in arch.shapes}, arch.shapes,
                    arch.name, problems)
    return len(found)


def _lora_shape(name: str, part: str, shape: tuple[int, ...], module: torch.nn.Module,
                problems: list[str]) -> None:
    """A LoRA matrix must fit the Linear layer it adapts: A is (r, in), B is (out, r)."""
    if not isinstance(module, torch.nn.Linear) or len(shape) != 2:
        return
    if part == "lora_A" and shape[1] != module.in_features:
        problems.append(f"{name} has shape {list(shape)}, but the base layer takes "
                        f"{module.in_features} inputs")
    if part == "lora_B" and shape[0] != module.out_features:
        problems.append(f"{name} has shape {list(shape)}, but the base layer gives "
                        f"{module.out_features} outputs")


def _shape_problems(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                    arch: str, problems: list[str]) -> None:
    wrong = [f"{n} {list(s)} (expected {list(expected[n])})" for n, s in sorted(found.items())
             if n in expected and tuple(s) != expected[n]]
    if wrong:
        problems.append(f"{len(wrong)} tensors have another shape than {arch} expects: "
                        f"{_listed(wrong)}")


def _ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _listed(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
