"""Memory: activation (gradient) checkpointing, and the peak memory a run reports."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gearshift import rundir
from gearshift.errors import ConfigError, Problem, RunDirError

#: The metric (per logged step, and the run's peak in the ``end`` event and the result).
PEAK_METRIC = "memory/peak_mb"


def process_peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB."""
    try:
        import resource
    except ImportError:  # Windows: no resource module
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def peak_memory_mb(accelerator: Any) -> float:
    """The peak memory so far, in MiB, the largest over the processes of a distributed run.

    On a CUDA device: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache);
    elsewhere: the process's peak resident set size (everything the process holds).
    """
    device = accelerator.device
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = process_peak_rss_mb()
    if accelerator.num_processes == 1:
        return peak
    return float(accelerator.gather(torch.tensor([peak], device=device)).max())


def run_peak_mb(run_dir: Path, accelerator: Any) -> float:
    """The run's peak: now, or as logged earlier (before a resume: another process)."""
    now = peak_memory_mb(accelerator)
    try:
        records = rundir.read_metrics(run_dir)
    except RunDirError:
        return now  # a damaged metrics file must not fail the end of a run
    return max([now, *(v for _, v in rundir.metric_series(records, PEAK_METRIC))])


def enable_gradient_checkpointing(model: nn.Module) -> str:
    """Recompute activations in backward instead of storing them. Returns what was wrapped.

    Hugging Face models use their own switch. For a plain module the blocks are the longest
    ``nn.ModuleList`` (or the children of a top-level ``nn.Sequential``); each block's forward is
    wrapped in non-reentrant ``torch.utils.checkpoint``, which gives gradients identical to the
    unwrapped model.
    """
    if hasattr(model, "gradient_checkpointing_enable") and getattr(
        model, "supports_gradient_checkpointing", False
    ):
        # transformers 5 renamed the switch; older releases only have the first name.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "config"):
            model.config.use_cache = False
        return "transformers"
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(blocks):
            blocks = list(module)
    if not blocks and isinstance(model, nn.Sequential):
        blocks = list(model.children())
    if not blocks:
        raise ConfigError([Problem(
            "training.gradient_checkpointing",
            f"{type(model).__name__} has no nn.ModuleList or nn.Sequential of blocks to "
            "checkpoint; turn it off or call torch.utils.checkpoint in your forward")])
    for block in blocks:
        if getattr(block, "_gearshift_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):  # type: ignore[no-untyped-def]
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
        block._gearshift_checkpointed = True  # type: ignore[attr-defined]
    return f"{len(blocks)} blocks"


def process_peak_mb(device: torch.device) -> float:
    """The most memory this process has held so far, in MiB (no collective: safe in events).

    On CUDA the allocator's peak for ``device``; elsewhere the peak resident set size of the
    process (what the operating system had to give it), which covers CPU tensors too.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB
