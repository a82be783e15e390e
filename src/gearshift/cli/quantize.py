"""``gearshift quantize export SRC DST``: a packed BitNet b1.58 model directory from a run or a
model directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from gearshift.cli.options import add_action_verb
from gearshift.errors import ModelError, UsageError

NAME = "quantize"

EXPORT_EPILOG = """\
SRC may be:
  RUN_DIR    a run: its final/ model, or (a run stopped before the end) its newest checkpoint
             rebuilt with the run's own config. A QAT run's final/ is already packed: it is
             copied. The run's quantization section (modules, exclude) chooses the layers.
  MODEL_DIR  a full-precision Hugging Face model directory: every Linear layer but lm_head is
             quantized as it is (post-training ternary quantization, no training).
DST gets model.safetensors with uint8 weights (four 2-bit values per byte) and their
weight_scale, and config.json with quantization_config (quant_method: bitnet, linear_class:
bitlinear, quantization_mode: offline, modules_to_not_convert), loadable with
AutoModelForCausalLM.from_pretrained(DST). The size on disk is printed against fp16.
examples:
  gearshift quantize export runs/qat-20261203-101500 packed/
  gearshift quantize export runs/default-20261203-093000/final packed-ptq/ --exclude o_proj
"""

# Files of a model directory that the export writes itself (everything else is copied).
_WRITTEN = {"config.json", "generation_config.json", "model.safetensors",
            "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift quantize export``."""
    p, actions = add_action_verb(sub, NAME, help="export a ternary (BitNet b1.58) packed model",
                                 description="Write a packed ternary model directory that plain "
                                             "transformers loads.")
    e = actions.add_parser(
        "export", help="write SRC's model with packed 2-bit weights into DST",
        description="Write the model of a run or a model directory with packed 2-bit ternary "
                    "weights (BitNet b1.58) into DST, and print its size against fp16.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("src", metavar="SRC", help="RUN_DIR or MODEL_DIR")
    e.add_argument("dst", metavar="DST", help="output directory (must not exist; written "
                   "atomically)")
    e.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave these Linear layers in full precision (name, suffix or "
                        "regex; repeatable)")
    e.add_argument("--json", action="store_true", help="print the size report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Export ``args.src`` packed into ``args.dst``; print the size report; 0."""
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; give a run directory or a model directory")
    if dst.exists():
        raise UsageError(f"{dst} already exists; give a new output directory")
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        report = _export(src, tmp, list(args.exclude))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dst)
    report = dataclasses.replace(report, directory=dst)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def _export(src: Path, out: Path, exclude: list[str]) -> Any:
    from gearshift.models import is_packed_bitnet
    from gearshift.rundir import RunPaths, final_model_dir
    from gearshift.transforms.bitnet_export import copy_export

    if (src / "config.json").is_file():
        if is_packed_bitnet(src):
            return copy_export(src, out)
        return _from_model_dir(src, out, _quant_section(None, exclude))
    if not RunPaths(src).checkpoints.is_dir() and not RunPaths(src).final.is_dir():
        raise UsageError(f"{src} is neither a model directory (config.json) nor a run directory "
                         "(checkpoints/ or final/); check the path")
    from gearshift.rundir import read_run_config

    config = read_run_config(src)
    quant = _quant_section(config.quantization, exclude)
    final = final_model_dir(src)
    if final is not None:
        if (final / "adapter_config.json").is_file():
            raise ModelError(f"{final} is a LoRA adapter: a packed export needs a full model "
                             "(QAT with LoRA keeps the adapters separate); export the base "
                             "model directory instead")
        if is_packed_bitnet(final):
            return copy_export(final, out)
        return _from_model_dir(final, out, quant)
    return _from_checkpoint(src, out, config, quant)


def _quant_section(section: Any, exclude: list[str]) -> Any:
    from gearshift.config.schema import QuantizationConfig

    base = section.model_dump() if section is not None else {}
    base.update(method="bitnet_b158", exclude=[*base.get("exclude", []), *exclude],
                ramp={"steps": 0})
    return QuantizationConfig(**base)


def _from_model_dir(src: Path, out: Path, quant: Any) -> Any:
    from gearshift.config.schema import ModelConfig
    from gearshift.tasks.lm import build_causal_lm
    from gearshift.transforms import BitNetTransform
    from gearshift.transforms.bitnet_export import export_packed

    model = build_causal_lm(ModelConfig(path=str(src)), vocab_size=0)
    model = BitNetTransform(quant).apply(model)
    report = export_packed(model, out, activation_bits=quant.activation_bits)
    for path in src.iterdir():  # the tokenizer and anything else that belongs with the model
        if path.is_file() and path.name not in _WRITTEN and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
    return report


def _from_checkpoint(run_dir: Path, out: Path, config: Any, quant: Any) -> Any:
    from gearshift.checkpoint import CheckpointManager
    from gearshift.rundir import RunPaths
    from gearshift.tasks import TASKS
    from gearshift.transforms import BitNetTransform, build_transforms
    from gearshift.transforms.bitnet_export import export_packed

    chain = build_transforms(config)
    if "lora" in chain.names:
        raise ModelError(f"{run_dir} trained LoRA adapters: a packed export needs a full model; "
                         "export the base model directory instead")
    parts = TASKS[config.task](config).build()
    model = chain.apply(parts.model) if chain.names else parts.model
    manager = CheckpointManager(RunPaths(run_dir).checkpoints)
    newest, _ = manager.find_latest_valid()
    if newest is None:
        raise ModelError(f"{run_dir} has neither final/ nor a valid checkpoint to export")
    manager.load(newest, model=model, strict=chain.strict)
    if "bitnet" not in chain.names:
        model = BitNetTransform(quant).apply(model)
    else:
        for transform in chain.transforms:
            if isinstance(transform, BitNetTransform):
                transform.set_lambda(model, 1.0)
    report = export_packed(model, out, activation_bits=quant.activation_bits)
    if parts.tokenizer is not None and hasattr(parts.tokenizer, "save_pretrained"):
        parts.tokenizer.save_pretrained(str(out))
    return report
