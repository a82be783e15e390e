"""One rank of the sharded gradient-sign test (run by torchrun from the test).

The same tiny Llama twice: one sharded with FSDP2 over the ranks, one whole on every rank, fed the
same batches. Writes, per step, the stability the sharded tracker gives after the weighted
cross-rank reduction and the unsharded tracker's value; then the gathered signs of both, and the
value after the sharded signs went through a save / load round trip.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from gearshift.signals import GradientSignTracker, reduce_signal


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # Sizes that do not divide by two ranks evenly: the shards differ in size.
    return LlamaForCausalLM(LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=61,
                                        max_position_embeddings=32))


def main() -> None:
    dist.init_process_group("gloo")
    sharded, whole = model(), model()
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    trackers = {"sharded": GradientSignTracker(list(sharded.named_parameters())),
                "whole": GradientSignTracker(list(whole.named_parameters()))}
    opts = {"sharded": torch.optim.SGD(sharded.parameters(), lr=0.5),
            "whole": torch.optim.SGD(whole.parameters(), lr=0.5)}
    values: dict[str, list] = {"sharded": [], "whole": [], "local": []}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 61, (2, 12), generator=gen)  # the same batch on every rank
        for name, m in (("sharded", sharded), ("whole", whole)):
            m(input_ids=ids, labels=ids).loss.backward()
            value = trackers[name].update()
            if name == "sharded":
                values["local"].append(value)
                value = reduce_signal(value, weight=float(trackers[name].last_compared))
            values[name].append(value)
            opts[name].step()
            opts[name].zero_grad()
    signs = trackers["sharded"].tensor_state()  # gathered whole: every rank calls it
    same_signs = all(torch.equal(signs[k], v) for k, v in trackers["whole"].tensor_state().items())
    fresh = GradientSignTracker(list(sharded.named_parameters()))
    fresh.load_state(trackers["sharded"].json_state(), signs)
    ids = torch.randint(0, 61, (2, 12), generator=gen)
    for name, m, tracker in (("sharded", sharded, fresh), ("whole", whole, trackers["whole"])):
        m(input_ids=ids, labels=ids).loss.backward()
        value = tracker.update()
        if name == "sharded":
            value = reduce_signal(value, weight=float(tracker.last_compared))
        values[f"{name}_after_load"] = value
    values["same_signs"] = same_signs
    values["local_numel"] = sum(p.to_local().numel() for p in sharded.parameters())
    out = Path(sys.argv[1]) / f"rank{dist.get_rank()}.json"
    out.write_text(json.dumps(values))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
