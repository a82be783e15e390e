"""Convert legacy torch checkpoints into ``model.safetensors`` + ``metadata.json``, never
running code stored in them.

Sources: ``.pt`` / ``.pth`` / ``.bin`` files (``pytorch_model.bin`` included), sharded
``*.bin.index.json`` indexes, Lightning ``.ckpt`` files, plain state dicts and dicts that hold
one under ``state_dict`` / ``model_state_dict`` / ``model`` / ``module`` next to metadata (epoch,
step, ...). Every file is read with ``torch.load(weights_only=True)``, which rebuilds tensors and
plain containers but refuses any other global; a file that needs one is refused with the name of
the global it asked for. ``allow_pickle=True`` (``--unsafe-allow-pickle``) exists for a user's own
trusted files and warns on stderr before it unpickles anything.

Tensor names are kept exactly as stored. Tensors that are the same memory (tied weights) are
written once and the other names recorded as aliases in ``metadata.json``; tensors that merely
overlap are written as separate copies. Tensor data outside the model state (optimizer state, EMA
copies, ...) is dropped and listed under ``dropped``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gearshift.checkpoint.atomic import encode_json, fsync_dir, fsync_file, write_bytes
from gearshift.checkpoint.layout import MANIFEST_FILE, MODEL_FILE, make_temp_name
from gearshift.checkpoint.manifest import sha256_file
from gearshift.errors import CheckpointError, UsageError

METADATA_FILE = "metadata.json"
CONVERTED_FORMAT = "gearshift-converted"
CONVERTED_VERSION = 1
# Where a checkpoint dict keeps the model's state dict, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Top-level entries that hold optimizer state; dropped whole even when they carry no tensors.
OPTIMIZER_KEYS = frozenset({"optimizer_states", "optimizer", "optimizer_state_dict",
                            "optimizer_state", "optim", "optim_state", "opt"})
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_DEPTH = 32
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_checkpoint` wrote.

    Attributes:
        destination: The folder holding ``model.safetensors`` and ``metadata.json``.
        tensors: Tensors written (aliases not counted).
        elements: Their elements.
        bytes: Their data bytes.
        aliases: Alias name to the stored name it shares memory with (tied weights).
        dropped: What was not converted (``key``, ``what``, ``tensors``, ``elements``).
        metadata: Everything written to ``metadata.json``.
    """

    destination: Path
    tensors: int
    elements: int
    bytes: int
    aliases: dict[str, str]
    dropped: list[dict[str, Any]]
    metadata: dict[str, Any]


def convert_checkpoint(src: str | Path, dst: str | Path, *, force: bool = False,
                       allow_pickle: bool = False) -> ConversionResult:
    """Convert a legacy torch checkpoint into ``DST/model.safetensors`` + ``DST/metadata.json``.

    Args:
        src: A torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ...), a sharded
            ``*.bin.index.json``, or a folder holding exactly one of those.
        dst: The output folder; created if missing. Both files appear at once: a new folder is
            written under a temporary name and renamed, an existing one gets each file by
            ``os.replace``.
        force: Replace a ``model.safetensors`` / ``metadata.json`` already in ``dst``.
        allow_pickle: Unpickle files that ``weights_only=True`` refuses. This EXECUTES
            ARBITRARY CODE from the file; only for files you made yourself. A warning naming the
            file goes to stderr before each such load.

    Returns:
        What was written, including tied-weight aliases and what was dropped.

    Raises:
        UsageError: If ``src`` does not exist or ``dst`` is not usable.
        CheckpointError: If a file needs arbitrary unpickling (and ``allow_pickle`` is off), is
            corrupt, holds no state dict, or the output cannot be written; nothing is written.

    Example:
        >>> result = convert_checkpoint("old/pytorch_model.bin", "converted")  # doctest: +SKIP
        >>> result.aliases
        {'lm_head.weight': 'model.embed_tokens.weight'}
    """
    src, dst = Path(src), Path(dst)
    kind, files = _source_files(src)
    _check_destination(dst, force)
    unsafe: list[str] = []
    if kind == "sharded-index":
        state, record = _read_sharded(files[0], allow_pickle, unsafe)
    else:
        obj = _torch_load(files[0], allow_pickle, unsafe)
        state, record = _split(obj, files[0].name)
        record["source"] = {"kind": record.pop("kind"), "files": files[:1]}
    tensors, aliases, overlapping = _dedupe(state)
    source = record.pop("source")
    elements = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    names = list(state)
    heads = {n.split(".", 1)[0] for n in names}
    metadata: dict[str, Any] = {
        "format": CONVERTED_FORMAT, "version": CONVERTED_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "source": {
            "path": str(src.resolve()), "kind": source["kind"],
            "loaded_with": "torch.load(weights_only=False) --unsafe-allow-pickle" if unsafe
            else "torch.load(weights_only=True)",
            "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
                      for f in source["files"]],
        },
        "tensors": {"count": len(tensors), "elements": elements, "bytes": nbytes},
        "aliases": aliases,
        "overlapping_copied": overlapping,
        # Lightning prefixes every name with the attribute that holds the module; kept as stored.
        "name_prefix": f"{heads.pop()}." if len(heads) == 1 and all("." in n for n in names)
        else None,
        **record,
    }
    if unsafe:
        metadata["source"]["unpickled_unsafely"] = unsafe
    payload = encode_json(metadata, METADATA_FILE)
    _write(dst, tensors, payload)
    return ConversionResult(destination=dst, tensors=len(tensors), elements=elements,
                            bytes=nbytes, aliases=aliases, dropped=metadata["dropped"],
                            metadata=metadata)


def load_converted(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a converted folder's tensors with every alias restored (tied names share a tensor).

    Args:
        path: A folder written by :func:`convert_checkpoint`.

    Returns:
        The state dict as it was before conversion, ready for ``model.load_state_dict``.

    Raises:
        CheckpointError: If a file is missing or an alias names a tensor that is not stored.
    """
    folder = Path(path)
    try:
        tensors = load_file(str(folder / MODEL_FILE))
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors raises its own error type for every parse failure
        raise CheckpointError(f"{folder}: not a readable converted checkpoint ({exc})") from exc
    aliases = meta.get("aliases") if isinstance(meta, dict) else None
    for alias, target in (aliases if isinstance(aliases, dict) else {}).items():
        if target not in tensors:
            raise CheckpointError(f"{folder / METADATA_FILE}: alias {alias!r} names {target!r}, "
                                  f"which is not in {MODEL_FILE}")
        tensors[alias] = tensors[target]
    return tensors


# ---------------------------------------------------------------------------------- reading


def _source_files(src: Path) -> tuple[str, list[Path]]:
    if not src.exists():
        raise UsageError(f"{src} does not exist; give a .pt/.pth/.bin/.ckpt file, a "
                         "*.bin.index.json or a folder holding one")
    if src.is_dir():
        indexes = sorted(p for p in src.glob("*.index.json") if "safetensors" not in p.name)
        if indexes:
            return "sharded-index", indexes[:1]
        if (src / "pytorch_model.bin").is_file():
            return "file", [src / "pytorch_model.bin"]
        found = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)
        if len(found) != 1:
            what = f"several ({', '.join(p.name for p in found)})" if found else "none"
            raise CheckpointError(
                f"{src}: expected one torch file ({', '.join(TORCH_SUFFIXES)}) or a "
                f"*.bin.index.json, found {what}; give the file itself as SRC")
        return "file", found
    if src.name.endswith(".safetensors") or src.name.endswith(".safetensors.index.json"):
        raise CheckpointError(f"{src} is already safetensors; nothing to convert (see it with "
                              "`gearshift checkpoint inspect`)")
    return ("sharded-index" if src.name.endswith(".index.json") else "file"), [src]


def _torch_load(file: Path, allow_pickle: bool, unsafe: list[str]) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{file}: not a readable torch file ({exc})") from exc
        wanted = _GLOBAL_RE.search(str(exc))
        detail = _unpickler_detail(str(exc))
        if wanted is None and not allow_pickle:
            raise CheckpointError(
                f"{file}: not a readable torch file: torch.load(weights_only=True) failed "
                f"({detail}). It is corrupt, truncated or not a torch file, or it uses pickle "
                "features beyond plain data; only if you made it yourself and trust it, retry "
                "with --unsafe-allow-pickle") from exc
        reason = (f"it asks for the global {wanted.group(1)}, which is not a tensor or plain "
                  "container type" if wanted else detail)
    except Exception as exc:  # zip, pickle and storage errors all mean the same to the user
        raise CheckpointError(f"{file}: not a readable torch file ({type(exc).__name__}: "
                              f"{exc}); is it truncated or in another format?") from exc
    if not allow_pickle:
        raise CheckpointError(
            f"{file}: refused: loading it needs arbitrary unpickling ({reason}). Unpickling "
            "can run any code the file's author chose, so gearshift reads torch files only with "
            "torch.load(weights_only=True), which accepts tensors and plain containers. If you "
            "made this file yourself and trust it, re-run with --unsafe-allow-pickle "
            "(allow_pickle=True in Python); otherwise ask its author for a safetensors file or a "
            "plain state dict (torch.save(model.state_dict(), ...)).")
    print(f"\n!!! WARNING: --unsafe-allow-pickle: unpickling {file} with "
          f"torch.load(weights_only=False) ({reason}).\n!!! This EXECUTES ARBITRARY CODE stored "
          "in the file, with your permissions: whoever made it can run any command on this "
          "machine.\n!!! Use it only on files you created yourself or fully trust.\n",
          file=sys.stderr, flush=True)
    unsafe.append(file.name)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # anything the file's own code raises
        raise CheckpointError(f"{file}: cannot be unpickled even with --unsafe-allow-pickle "
                              f"({type(exc).__name__}: {exc})") from exc


def _unpickler_detail(message: str) -> str:
    # torch wraps the real reason in advice about weights_only; keep only the reason.
    detail = message.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
    return " ".join(detail.split()) or "weights_only unpickler error"


def _read_sharded(index: Path, allow_pickle: bool,
                  unsafe: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("'weight_map' must map tensor names to shard file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a usable shard index ({exc})") from exc
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if "/" in s or "\\" in s or s in ("", ".", "..")]
    if bad:  # An index is untrusted input: a path could point outside its folder.
        raise CheckpointError(f"{index}: shard names {bad} are not plain file names")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) missing next to the index: "
                              f"{', '.join(missing)}")
    state: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"metadata": {"index": _jsonable(data.get("metadata"))},
                              "state_dict_key": None, "state_dict_extras": {}, "dropped": []}
    for shard in shards:
        part, info = _split(_torch_load(index.parent / shard, allow_pickle, unsafe), shard)
        absent = sorted(n for n, s in weight_map.items() if s == shard and n not in part)
        twice = sorted(set(part) & set(state))
        if absent or twice:
            raise CheckpointError(
                f"{index.parent / shard}: " + "; ".join(
                    ([f"lacks {', '.join(absent[:8])} (listed in {index.name})"] if absent
                     else []) + ([f"repeats {', '.join(twice[:8])} from another shard"] if twice
                                 else [])))
        state.update(part)
        if info["metadata"]:
            record["metadata"][shard] = info["metadata"]
        record["state_dict_extras"].update(info["state_dict_extras"])
        record["dropped"].extend({**d, "file": shard} for d in info["dropped"])
    record["source"] = {"kind": "sharded-index",
                        "files": [index, *(index.parent / s for s in shards)]}
    return state, record


def _split(obj: Any, label: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate the model state dict from metadata and from data that is dropped."""
    kind = "state-dict"
    if isinstance(obj, torch.nn.Module):
        obj, kind = obj.state_dict(), f"nn.Module ({type(obj).__name__})"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: holds a {type(obj).__name__}, not a state dict or a "
                              "dict containing one")
    key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), torch.nn.Module)
                or (isinstance(obj.get(k), Mapping)
                    and any(isinstance(v, torch.Tensor) for v in obj[k].values()))), None)
    if key is not None:
        found = obj[key]
        source = found.state_dict() if isinstance(found, torch.nn.Module) else found
        rest = {k: v for k, v in obj.items() if k != key}
        kind = "lightning" if "pytorch-lightning_version" in obj else "checkpoint-dict"
    else:
        source = obj
        rest = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    state = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"{label}: no tensors found; top-level keys are {sorted(map(str, obj))[:12]}; expected "
            f"a state dict or a dict with one under {', '.join(map(repr, STATE_DICT_KEYS))}")
    not_str = [k for k in state if not isinstance(k, str)]
    if not_str:
        raise CheckpointError(f"{label}: tensor names must be strings, found {not_str[:5]}")
    extras = {str(k): _jsonable(v) for k, v in source.items() if not isinstance(v, torch.Tensor)}
    metadata: dict[str, Any] = {}
    dropped: list[dict[str, Any]] = []
    for k, v in rest.items():
        found = list(_tensors_in(v))
        # Scalar tensors (a loss, a best score) are kept as numbers; anything larger is data.
        if k in OPTIMIZER_KEYS or any(t.numel() > 1 for t in found):
            what = ("optimizer state" if k in OPTIMIZER_KEYS or "optim" in str(k)
                    else "tensors outside the model state dict")
            dropped.append({"key": str(k), "what": what, "tensors": len(found),
                            "elements": sum(t.numel() for t in found)})
        else:
            metadata[str(k)] = _jsonable(v)
    return state, {"kind": kind, "state_dict_key": key, "metadata": metadata,
                   "state_dict_extras": extras, "dropped": dropped}


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < _MAX_DEPTH and isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < _MAX_DEPTH and isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _tensors_in(v, depth + 1)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: numbers, strings and containers as they are, the rest summarized."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.layout == torch.strided and value.device.type != "meta":
            return _jsonable(value.item(), depth)
        return f"<tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}>"
    if depth >= _MAX_DEPTH:  # also ends self-referencing containers, which pickle can build
        return f"<{type(value).__name__} nested too deep>"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    text = repr(value)
    return f"<{type(value).__qualname__}: {text[:200]}{'...' if len(text) > 200 else ''}>"


# ---------------------------------------------------------------------------------- writing


def _dedupe(state: Mapping[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[list[str]]]:
    """Store each tied tensor once; copy tensors that only overlap so safetensors accepts them."""
    by_storage: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is {tensor.layout} on {tensor.device}: "
                                  "safetensors stores dense tensors with data only")
        if tensor.numel() > 0:
            storage = tensor.untyped_storage()
            by_storage.setdefault((storage.data_ptr(), storage.nbytes()), []).append(name)
    shared = {name for names in by_storage.values() if len(names) > 1 for name in names}
    aliases: dict[str, str] = {}
    overlapping: list[list[str]] = []
    for names in by_storage.values():
        views: dict[tuple[Any, ...], str] = {}
        for name in names:
            t = state[name]
            view = (t.dtype, t.storage_offset(), tuple(t.shape), t.stride())
            if view in views:
                aliases[name] = views[view]
            else:
                views[view] = name
        if len(views) > 1:
            overlapping.append(sorted(views.values()))
    tensors = {}
    for name, tensor in state.items():
        if name in aliases:
            continue
        tensor = tensor.detach()
        # safetensors refuses tensors that share memory or are not contiguous; private copies.
        if name in shared or not tensor.is_contiguous() or tensor.numel() == 0:
            tensor = tensor.clone().contiguous()
        tensors[name] = tensor
    return tensors, aliases, overlapping


def _check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} exists and is not a folder; DST is the folder that receives "
                         f"{MODEL_FILE} and {METADATA_FILE}")
    if (dst / MANIFEST_FILE).exists():
        raise UsageError(f"{dst} is a gearshift checkpoint; writing into it would break its "
                         "manifest. Choose another DST")
    present = [n for n in (MODEL_FILE, METADATA_FILE) if (dst / n).exists()]
    if present and not force:
        raise UsageError(f"{dst} already contains {' and '.join(present)}; pass --force "
                         "(force=True in Python) to replace, or choose another DST")


def _write(dst: Path, tensors: dict[str, torch.Tensor], metadata: bytes) -> None:
    replace_in = dst.is_dir()
    if not replace_in:
        dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = (dst if replace_in else dst.parent) / make_temp_name("tmp", f"convert-{dst.name}")
    try:
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot write {MODEL_FILE}: {exc}") from exc
        write_bytes(tmp / METADATA_FILE, metadata)
        fsync_file(tmp / MODEL_FILE)
        fsync_dir(tmp)
        if replace_in:
            # A folder with other files cannot be swapped whole; each file is, model first.
            for name in (MODEL_FILE, METADATA_FILE):
                os.replace(tmp / name, dst / name)
            tmp.rmdir()
            fsync_dir(dst)
        else:
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write {dst} ({exc})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
