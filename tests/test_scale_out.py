"""Scale-out pieces that run in one process: the global data position, the distributed config
section, and checkpoints that move between strategies."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import gearshift as gs
from gearshift.config import load_config
from gearshift.errors import ConfigError
from gearshift.train.stream import BatchStream


def consume(streams: list[BatchStream], windows: int) -> list[int]:
    """Sample ids fed by all ranks over ``windows`` steps, rank order within each batch."""
    out = []
    for _ in range(windows):
        per_rank = [s.next_window()[0] for s in streams]
        for micro in zip(*per_rank, strict=True):
            out += [int(i) for batch in micro for i in batch]
    return out


def streams(n: int, world: int, batch: int, accumulate: int = 1) -> list[BatchStream]:
    data = list(range(n))
    return [BatchStream(data, batch_size=batch, accumulate=accumulate, seed=3, rank=r,
                        world_size=world) for r in range(world)]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4), (3, 2)])
def test_position_is_global_across_process_counts(before: int, after: int) -> None:
    n = 100
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    first = streams(n, before, batch=4, accumulate=2)
    seen = consume(first, 3)
    assert first[0].position.sample == 3 * 2 * 4 * before
    state = first[0].position.state_dict()
    second = streams(n, after, batch=4, accumulate=2)
    for s in second:
        s.position.load_state_dict(state)
    seen += consume(second, 2)
    assert seen == order[: len(seen)]  # no gap, no repeat
    # The epoch still ends after every sample, then the next one starts from sample 0.
    while second[0].position.epoch == 0:
        seen += consume(second, 1)
    assert sorted(seen) == list(range(n))
    assert second[0].position.sample == 0


def test_a_position_saved_before_sample_offsets_counts_global_batches() -> None:
    stream = streams(100, 1, batch=8)[0]
    stream.position.load_state_dict({"epoch": 0, "micro_batch": 3}, global_batch=16)
    assert stream.position.sample == 48
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    assert consume([stream], 1) == order[48:56]


def test_distributed_section_is_validated() -> None:
    cfg = load_config({"distributed": {"strategy": "fsdp",
                                       "fsdp": {"wrap": ["LlamaDecoderLayer"],
                                                "reshard_after_forward": False}}})
    assert cfg.distributed.fsdp.wrap == ["LlamaDecoderLayer"]
    assert load_config(None).distributed.strategy == "ddp"
    with pytest.raises(ConfigError) as err:
        load_config({"distributed": {"strategy": "zero", "fsdp": {"shard": True}}})
    text = str(err.value)
    assert "distributed.strategy" in text and "'ddp'" in text and "'fsdp'" in text
    assert "distributed.fsdp.shard" in text


def test_fsdp_cpu_offload_without_a_gpu_is_a_clear_error(make_config, cli, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: CPU offload is allowed")
    import yaml

    cfg = make_config(distributed={"strategy": "fsdp", "fsdp": {"cpu_offload": True}})
    path = tmp_path / "offload.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, _, err = cli("train", str(path))
    assert code == 2
    assert "distributed.fsdp.cpu_offload" in err and "set it to false" in err
    assert "Traceback" not in err


def test_a_checkpoint_moves_between_strategies_bit_exactly(make_config, tmp_path) -> None:
    """FSDP checkpoints (optimizer state by parameter name) resume under DDP and back; with one
    process both train the same model, so the weights are bit-identical to a straight run."""
    base = {"training": {"max_steps": 4, "eval_every": None},
            "checkpoint": {"every": 2, "async": False}, "logging": {"progress_bar": False,
                                                                   "tensorboard": False}}
    straight = gs.train(make_config(**base, output_dir=str(tmp_path / "a")))

    class StopAt2(gs.Callback):
        def on_step_end(self, trainer: gs.Trainer, metrics: dict) -> None:
            trainer.should_stop = trainer.step == 2

    first = gs.train(make_config(**base, output_dir=str(tmp_path / "b"),
                                 distributed={"strategy": "fsdp"}), callbacks=[StopAt2()])
    assert first.step == 2
    step2 = first.run_dir / "checkpoints" / "step-00000002"
    import json

    layout = json.loads((step2 / "optimizer.json").read_text())
    assert layout["param_groups"][0]["params"][0] == "model.embed_tokens.weight"  # by name
    resumed = gs.train(make_config(**base, output_dir=str(tmp_path / "b")),
                       resume=first.run_dir)  # strategy ddp now
    assert resumed.step == 4
    a = load_file(str(straight.run_dir / "final" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
