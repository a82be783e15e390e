"""``gearshift model validate DIR [--json] [--load]``: is a model directory complete and sound?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gearshift.cli.options import add_action_verb

NAME = "model"

EPILOG = """\
kinds:
  full     config.json, model.safetensors (or pytorch_model.bin) and a tokenizer
           (tokenizer.json or tokenizer_config.json)
  sharded  config.json, an index (model.safetensors.index.json) whose weight_map is well
           formed and whose every shard exists, and a tokenizer
  adapter  adapter_config.json and adapter_model.safetensors (a PEFT LoRA adapter) whose
           base_model_name_or_path is a valid local model directory (relative to the adapter
           when relative); the tokenizer is the adapter's own or its base's
exit codes: 0 valid, 2 invalid (every problem is listed)
examples:
  gearshift model validate runs/sft-20261201-120000/final
  gearshift model validate my-model --load --json
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift model`` and its actions to the top-level sub-commands."""
    p, actions = add_action_verb(sub, NAME, help="check a model directory",
                                 description="Check a Hugging Face model directory (full, "
                                             "sharded or LoRA adapter) before a run or a "
                                             "pipeline stage loads it.")
    v = actions.add_parser(
        "validate",
        help="print DIR's kind (full, sharded, adapter); exit 0 when valid, 2 listing every "
             "problem",
        description="Check that DIR is a complete full, sharded or adapter model directory\n"
                    "and print its kind, or every problem found. Exit 0 when valid, 2 when not.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("dir", metavar="DIR", help="a model directory, e.g. RUN_DIR/final")
    v.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (kind, ok, problems, base, "
                        "tensors_checked), whether valid or not")
    v.add_argument("--load", action="store_true",
                   help="also read the weights' headers (no tensor data) and check the tensor "
                        "names and shapes against the architecture in config.json (an "
                        "adapter's: against the modules of its base)")
    return p


def run(args: argparse.Namespace) -> int:
    """Validate ``args.dir``: print ``DIR: valid KIND model directory`` and return 0, or print
    every problem (stderr; with ``--json`` the report on stdout) and return 2."""
    import sys

    from gearshift.models import validate_model_dir

    report = validate_model_dir(Path(args.dir), load=args.load)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        details = []
        if report.base is not None:
            details.append(f"base: {report.base}")
        if report.tensors is not None:
            details.append(f"{report.tensors} tensors match the architecture")
        extra = f" ({'; '.join(details)})" if details else ""
        what = "adapter directory" if report.kind == "adapter" else f"{report.kind} model directory"
        print(f"{report.path}: valid {what}{extra}")
    else:
        print(f"error: {report.message()}", file=sys.stderr)
    return 0 if report.ok else 2
