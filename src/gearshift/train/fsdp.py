"""``distributed.strategy: fsdp``: parameters, gradients and optimizer state sharded over the
processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), set up by Accelerate.

What a checkpoint and ``final/`` hold is the *consolidated* state: every rank takes part in
gathering the full weights and the full optimizer state (by parameter name) into host memory of
the main process, which writes them in the usual safetensors + JSON layout. A checkpoint is
therefore the same whatever the number of processes that wrote it, and a run resumes on any other
number (2 -> 1, 1 -> 2, FSDP <-> DDP): on resume every rank reads the full state and keeps its own
shard of it (``set_model_state_dict`` / ``set_optimizer_state_dict``).

Accelerate turns FSDP on only on accelerators; on CPU (gloo) the same FSDP2 path is selected on
the Accelerator's state once it exists, so the code that runs is the one that runs on GPUs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
)
from torch.optim import Optimizer

from gearshift.errors import ConfigError, Problem
from gearshift.train.strategy import Strategy

#: What FSDP's activation checkpointing inserts into parameter names (not state-dict names).
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."
#: Gathered to the main process, in host memory (the other ranks get nothing).
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FsdpStrategy(Strategy):
    """Fully sharded data parallel through Accelerate's FSDP2 plugin (one process: unsharded)."""

    name = "fsdp"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        f = config.fsdp
        if f.cpu_offload and not torch.cuda.is_available():
            raise ConfigError([Problem("distributed.fsdp.cpu_offload", "offloads GPU memory to "
                                       "the CPU; this machine has no GPU: set it to false")])
        self.plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=f.reshard_after_forward,
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=f.wrap,
            cpu_offload=f.cpu_offload, activation_checkpointing=f.activation_checkpointing,
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
        self.sharded = False
        self._twin: nn.Module | None = None

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "sharded": self.sharded}

    def accelerator_kwargs(self) -> dict[str, Any]:
        return {"fsdp_plugin": self.plugin}

    def adopt(self, accelerator: Accelerator) -> Accelerator:
        state = accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU:
            # Accelerate enables FSDP on accelerators only; FSDP2 itself runs on CPU with gloo.
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = self.plugin
        self.sharded = state.distributed_type == DistributedType.FSDP
        return accelerator

    def prepare(self, accelerator: Accelerator, model: nn.Module,
                optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        if self.sharded and accelerator.is_main_process:
            # The exported model's structure, without memory: the main process fills it with the
            # gathered weights at the end (save_pretrained / PEFT need a plain module).
            self._twin = copy.deepcopy(model).to("meta")
        return super().prepare(accelerator, model, optimizer)

    def model_state(self, model: nn.Module, weights: nn.Module | Mapping[str, torch.Tensor]
                    ) -> nn.Module | dict[str, torch.Tensor]:
        if not self.sharded:
            return weights
        full = get_model_state_dict(model, options=GATHER)
        if isinstance(weights, nn.Module):
            return full
        # Parameter names may carry the activation-checkpointing wrapper; state-dict names never.
        names = {name.replace(CHECKPOINT_WRAPPER, "") for name in weights}
        return {name: tensor for name, tensor in full.items() if name in names}

    def optimizer_for_save(self, model: nn.Module, optimizer: Optimizer) -> Any:
        # By parameter name, whatever the number of processes: the layout of every FSDP
        # checkpoint is the same.
        options = GATHER if self.sharded else StateDictOptions(full_state_dict=True)
        return _Gathered(get_optimizer_state_dict(model, optimizer, options=options),
                         optimizer.param_groups)

    def model_for_load(self, model: nn.Module) -> nn.Module:
        return _FullModel(model) if self.sharded else model

    def export_model(self, model: nn.Module, is_main: bool) -> nn.Module | None:
        if not self.sharded:
            return model
        full = get_model_state_dict(model, options=GATHER)
        if not is_main or self._twin is None:
            return None
        twin = self._twin.to_empty(device="cpu")
        twin.load_state_dict(full, strict=False)
        return twin


class _Gathered:
    """The full optimizer state, gathered on every rank before the main process writes it."""

    def __init__(self, state: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        self._state = state
        self.param_groups = param_groups

    def state_dict(self) -> dict[str, Any]:
        return self._state


class _FullModel(nn.Module):
    """A sharded model seen as its full tensors: global shapes to check a checkpoint against,
    and full tensors loaded into each rank's shard."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)  # not a submodule: no second registration

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # Shapes only (meta): the checkpoint is checked before anything is gathered or changed.
        return {name: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
                for name, t in self.inner.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = False,
                        assign: bool = False) -> Any:  # type: ignore[override]
        return set_model_state_dict(self.inner, dict(state),
                                    options=StateDictOptions(full_state_dict=True, strict=False))
