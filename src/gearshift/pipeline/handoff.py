"""Handing a model from one stage to the next: a manifest, a merge when needed, a check.

When a stage's model is ready for the next stage (it finished, or a ``from:`` path was named),
what the next stage will load is recorded in ``handoff/<i>-<name>.json``: its path, kind, the
sha256 and size of every file, and the result of ``validate_model_dir(load=True)``. Before the
stage starts (and before every resume of it) the directory is validated again and compared with
that record, so a model that was changed or corrupted in between stops the pipeline, naming the
stage and the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gearshift.checkpoint.manifest import sha256_file
from gearshift.models import is_adapter_dir, tokenizer_dir, validate_model_dir
from gearshift.pipeline.layout import PipelineError, now, read_json, write_json_atomic

HANDOFF_FORMAT = "gearshift-handoff"


def dir_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` of every file under ``directory``, sorted."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): {"sha256": sha256_file(p),
                                                  "bytes": p.stat().st_size} for p in files}


def manifest_problems(directory: Path, recorded: dict[str, Any]) -> list[str]:
    """How ``directory`` differs from its recorded manifest, one line per file (empty: same)."""
    if not directory.is_dir():
        return [f"{directory}: the directory is missing"]
    problems = []
    present = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*")
               if p.is_file()}
    for name, entry in recorded.items():
        path = present.pop(name, None)
        if path is None:
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: size is {path.stat().st_size} bytes, recorded "
                            f"{entry.get('bytes')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the one recorded")
    problems.extend(f"{name}: not there when the hand-off was recorded" for name in present)
    return problems


def merge_adapter(adapter_dir: Path, target: Path) -> Path:
    """Fold the LoRA adapter in ``adapter_dir`` into its base and save a full model directory
    (safetensors, with the tokenizer) at ``target``, atomically (temp dir, then rename)."""
    from transformers import AutoTokenizer

    from gearshift.models import load_adapter, load_base_model
    from gearshift.transforms import save_plain

    model = load_adapter(load_base_model(adapter_dir), adapter_dir, trainable=False)
    merged = model.merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_plain(merged, tmp)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(adapter_dir)), local_files_only=True)
    tok.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def record_handoff(file: Path, *, stage: str, source: str, model_dir: Path,
                   merged_from: Path | None = None) -> dict[str, Any]:
    """Validate ``model_dir`` (``load=True``) and write ``file`` with its manifest.

    Raises:
        PipelineError: When the directory is not a valid model directory (naming the stage).
    """
    report = validate_model_dir(model_dir, load=True)
    if not report.ok:
        raise PipelineError(f"stage {stage}: the model it starts from ({source}) is not "
                            f"valid:\n{report.message()}")
    record = {"format": HANDOFF_FORMAT, "version": 1, "stage": stage, "from": source,
              "path": str(model_dir), "kind": report.kind,
              "merged_from": str(merged_from) if merged_from is not None else None,
              "recorded": now(), "validation": report.to_dict(),
              "manifest": dir_manifest(model_dir)}
    write_json_atomic(file, record)
    return record


def check_handoff(file: Path, *, stage: str) -> dict[str, Any]:
    """Check the model ``stage`` starts from against ``file``: valid (``load=True``) and every
    file as recorded.

    Raises:
        PipelineError: Naming the stage, the directory and each file that changed.
    """
    record = read_json(file, f"it records what stage {stage} starts from; run the pipeline "
                       "again or restore the file")
    model_dir = Path(str(record.get("path")))
    changed = manifest_problems(model_dir, record.get("manifest") or {})
    if changed:
        raise PipelineError(
            f"stage {stage}: the model it starts from, {model_dir} (from {record.get('from')}), "
            f"changed since it was handed over:\n" + "\n".join(f"  - {p}" for p in changed) +
            f"\nrestore the files (the record is {file}), or start the pipeline again")
    report = validate_model_dir(model_dir, load=True)
    if not report.ok:
        raise PipelineError(f"stage {stage}: the model it starts from is not valid:\n"
                            f"{report.message()}")
    return record


def prepare_handoff(file: Path, *, stage: str, source: str, final_dir: Path, target: Path,
                    want: str) -> dict[str, Any]:
    """Make what ``stage`` starts from out of an earlier stage's ``final/`` and record it.

    Args:
        file: ``handoff/<i>-<name>.json``.
        stage: The receiving stage.
        source: The earlier stage's name.
        final_dir: The earlier stage's ``final/``.
        target: Where the stage's ``model.path`` points: ``final_dir`` itself, or the place of
            a merged copy.
        want: ``full`` or ``adapter``.

    Raises:
        PipelineError: When the earlier stage's output cannot be given in that form.
    """
    adapter = is_adapter_dir(final_dir)
    if want == "adapter" and not adapter:
        raise PipelineError(f"stage {stage}: handoff: adapter, but stage {source} exported a "
                            f"full model ({final_dir}); use handoff: full")
    if target.resolve() != final_dir.resolve():
        if not adapter:
            raise PipelineError(f"stage {stage}: expected a LoRA adapter from stage {source} "
                                f"to merge, but {final_dir} is a full model")
        report = validate_model_dir(final_dir, load=True)
        if not report.ok:
            raise PipelineError(f"stage {stage}: the adapter of stage {source} is not valid:\n"
                                f"{report.message()}")
        merge_adapter(final_dir, target)
        return record_handoff(file, stage=stage, source=f"stage {source} (merged)",
                              model_dir=target, merged_from=final_dir)
    return record_handoff(file, stage=stage, source=f"stage {source}", model_dir=final_dir)
