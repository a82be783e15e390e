"""Safe, verified, atomic checkpoints: safetensors + JSON only, never pickle.

One checkpoint is ``<run_dir>/checkpoints/step-00000200/`` holding ``model.safetensors``,
``optimizer.safetensors`` + ``optimizer.json``, ``trainer_state.json``, any extra ``<name>.json``
and ``manifest.json`` (sha256 and size of every other file). ``latest`` is a relative symlink to
the newest save. ``CheckpointManager.save(..., asynchronous=True)`` returns once the state is
copied to host memory, with a :class:`PendingSave` handle; a background thread writes it.
"""

from gearshift.checkpoint.convert import ConversionResult, convert_checkpoint, load_converted
from gearshift.checkpoint.inspection import (
    CheckpointReport,
    TensorFileInfo,
    TensorInfo,
    format_report,
    inspect_checkpoint,
)
from gearshift.checkpoint.layout import step_dir_name
from gearshift.checkpoint.loading import LoadedCheckpoint, read_trainer_state
from gearshift.checkpoint.manager import CheckpointManager
from gearshift.checkpoint.manifest import verify_checkpoint
from gearshift.checkpoint.model_state import load_model_tensors
from gearshift.checkpoint.optimizer_state import load_optimizer_state, save_optimizer_state
from gearshift.checkpoint.rng import capture_rng_state, restore_rng_state
from gearshift.checkpoint.writer import PendingSave

__all__ = [
    "CheckpointManager",
    "CheckpointReport",
    "ConversionResult",
    "LoadedCheckpoint",
    "PendingSave",
    "TensorFileInfo",
    "TensorInfo",
    "capture_rng_state",
    "convert_checkpoint",
    "format_report",
    "inspect_checkpoint",
    "load_converted",
    "load_model_tensors",
    "load_optimizer_state",
    "read_trainer_state",
    "restore_rng_state",
    "save_optimizer_state",
    "step_dir_name",
    "verify_checkpoint",
]
