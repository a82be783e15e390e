"""gearshift.signals: loss resolution, gradient-sign stability, cross-rank reduction."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from gearshift.errors import CheckpointError
from gearshift.signals import GradientSignTracker, LossNotFoundWarning, reduce_signal, resolve_loss
from gearshift.signals import loss as loss_module


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
    loss_module._warned.clear()
    yield
    loss_module._warned.clear()


# ------------------------------------------------------------------ resolve_loss


def test_resolve_loss_tensor_and_mapping_keys():
    t = torch.tensor(1.5)
    assert resolve_loss(t) is t
    assert resolve_loss({"logits": torch.zeros(2), "loss": t}) is t
    train, total = torch.tensor(2.0), torch.tensor(3.0)
    assert resolve_loss({"total_loss": total, "train_loss": train}) is train
    assert resolve_loss({"total_loss": total, "acc": 1.0}) is total
    # None under a loss key counts as absent.
    assert resolve_loss({"loss": None, "train_loss": train}) is train
    # An explicit key wins over the defaults.
    nll = torch.tensor(4.0)
    assert resolve_loss({"loss": t, "nll": nll}, key="nll") is nll


def test_resolve_loss_model_output_and_single_scalar():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    t = torch.tensor(0.25)
    assert resolve_loss(CausalLMOutputWithPast(loss=t, logits=torch.zeros(1, 2, 3))) is t
    only = torch.tensor(0.5)
    assert resolve_loss({"nll": only, "logits": torch.zeros(2, 3), "n": torch.tensor(3)}) is only


def test_resolve_loss_warns_once_per_kind_of_output(recwarn):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(logits=torch.zeros(1, 2, 3))  # no labels, no loss
    for _ in range(5):
        assert resolve_loss(out) is None
    ours = [w for w in recwarn if issubclass(w.category, LossNotFoundWarning)]
    assert len(ours) == 1
    assert "logits" in str(ours[0].message) and "loss" in str(ours[0].message)

    two = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}  # ambiguous: two scalars
    for _ in range(3):
        assert resolve_loss(two) is None
    assert resolve_loss({"loss": torch.tensor(1.0)}, key="missing") is None
    assert resolve_loss((torch.tensor(1.0),)) is None
    assert resolve_loss((torch.tensor(2.0),)) is None
    messages = [str(w.message) for w in recwarn if issubclass(w.category, LossNotFoundWarning)]
    assert len(messages) == 4
    assert "['a', 'b']" in messages[1]
    assert "'missing'" in messages[2]
    assert "tuple" in messages[3]


# ------------------------------------------------------------------ tracker


def _params(*sizes: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(n)) for n in sizes]


def _set(params, *grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else torch.tensor(g, dtype=torch.float32)


def test_tracker_hand_computed_fractions():
    small, big = _params(2, 6)
    tracker = GradientSignTracker([small, big])
    _set([small, big], [1, 1], [1, -1, 1, -1, 0, 0])
    assert tracker.update() is None  # nothing to compare with yet
    # small: 0/2 agree, big: 6/6 agree (0 == 0 included) -> 6/8 by element, not (0 + 1) / 2.
    _set([small, big], [-1, -2], [2, -3, 4, -5, 0, 0])
    assert tracker.update() == pytest.approx(6 / 8)
    # small has no gradient: skipped, keeps its signs; big: +,-,+ agree; 0 vs +1 disagrees.
    _set([small, big], None, [1, -1, 1, 1, 1, 0])
    assert tracker.update() == pytest.approx(4 / 6)
    # small compared against its signs of two steps ago ([-1, -1]).
    _set([small, big], [-1, 1], None)
    assert tracker.update() == pytest.approx(1 / 2)
    _set([small, big], None, None)
    assert tracker.update() is None
    assert tracker.num_updates == 5 and tracker.num_measured == 3


def test_tracker_parameter_first_seen_later_is_not_compared():
    a, b = _params(3, 1)
    tracker = GradientSignTracker([("a", a), ("b", b)])
    _set([a, b], [1, 1, 1], None)
    assert tracker.update() is None
    _set([a, b], [1, 1, -1], [5])  # b has no previous sign: only a's 3 elements count
    assert tracker.update() == pytest.approx(2 / 3)
    _set([a, b], [1, 1, -1], [5])
    assert tracker.update() == 1.0
    assert tracker.keys == ["a", "b"]


class _HostReads(TorchFunctionMode):
    """Counts every call that reads a tensor's value on the host."""

    NAMES = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_tracker_reads_the_device_once_per_update():
    params = _params(5, 7, 11, 13)
    tracker = GradientSignTracker(params)
    torch.manual_seed(0)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with _HostReads() as mode:
            tracker.update()
        assert mode.calls == ([] if step == 0 else ["item"])


def test_tracker_memory_is_one_byte_per_element_and_lazy():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    frozen = torch.nn.Parameter(torch.zeros(100), requires_grad=False)
    tracker = GradientSignTracker([*model.parameters(), frozen])
    assert tracker.memory_bytes == 0
    model(torch.randn(3, 8)).sum().backward()
    tracker.update()
    signs = [s for s in tracker._signs if s is not None]
    assert len(signs) == 4 and all(s.dtype == torch.int8 for s in signs)
    trainable = sum(p.numel() for p in model.parameters())
    assert tracker.memory_bytes == trainable == sum(s.numel() for s in signs)
    assert tracker.bytes_per_element <= 1.0


def test_tracker_with_a_real_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = GradientSignTracker(model.named_parameters())
    values = []
    for _ in range(4):
        x = torch.randn(16, 6)
        torch.nn.functional.mse_loss(model(x), x[:, :3]).backward()
        values.append(tracker.update())
        opt.step()
        opt.zero_grad()  # set_to_none: the next update still has gradients
    assert values[0] is None and all(0.0 <= v <= 1.0 for v in values[1:])
    assert tracker.keys == ["weight", "bias"]


def _random_steps(params, tracker, seeds):
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for i, p in enumerate(params):
            p.grad = None if (seed + i) % 3 == 0 else torch.randn(p.shape, generator=g)
        out.append(tracker.update())
    return out


def test_tracker_state_round_trip_through_safetensors_and_json(tmp_path: Path):
    params = _params(4, 9, 2)
    straight = GradientSignTracker(params)
    expected = _random_steps(params, straight, range(10))

    first = GradientSignTracker(params)
    assert _random_steps(params, first, range(5)) == expected[:5]
    save_file(first.tensor_state(), tmp_path / "signs.safetensors")
    (tmp_path / "signs.json").write_text(json.dumps(first.json_state()))

    resumed = GradientSignTracker(params)
    resumed.load_state(
        json.loads((tmp_path / "signs.json").read_text()), load_file(tmp_path / "signs.safetensors")
    )
    assert resumed.json_state() == first.json_state()
    assert _random_steps(params, resumed, range(5, 10)) == expected[5:]
    assert resumed.num_updates == 10

    # The convenience pair survives torch.save / torch.load(weights_only=True) too.
    torch.save(first.state_dict(), tmp_path / "state.pt")
    again = GradientSignTracker(params)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert _random_steps(params, again, range(5, 10)) == expected[5:]


def test_tracker_state_mismatch_is_a_clear_error():
    a = GradientSignTracker(_params(3))
    a._signs[0] = torch.ones(3, dtype=torch.int8)
    with pytest.raises(CheckpointError, match="other parameters"):
        GradientSignTracker(_params(3, 4)).load_state(a.json_state(), a.tensor_state())
    with pytest.raises(CheckpointError, match="int8"):
        GradientSignTracker(_params(3)).load_state(a.json_state(), {"0": torch.ones(3)})
    with pytest.raises(CheckpointError, match="lacks"):
        GradientSignTracker(_params(3)).load_state(a.json_state(), {})
    with pytest.raises(CheckpointError, match="version"):
        GradientSignTracker(_params(3)).load_state({**a.json_state(), "version": 99}, {})


class _ReferenceTracker:
    """The definition, one element at a time in spirit: no packing, no tricks."""

    def __init__(self, params):
        self.params = params
        self.signs: dict[int, torch.Tensor] = {}

    def update(self):
        agree = compared = 0
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
            new = torch.sign(grad.double()).to(torch.int8).cpu()
            old = self.signs.get(i)
            if old is not None and old.shape == new.shape:
                agree += int((new == old).sum())
                compared += new.numel()
            self.signs[i] = new
        return None if compared == 0 else agree / compared


def _mixed_params():
    """Scalars, LoRA-like matrices, mixed dtypes, an empty tensor and a large matrix."""
    shapes = [(), (1,), (8, 4), (4, 8), (3, 5, 2), (0,), (17,), (6, 6), (40, 30), (2, 3)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    params.append(torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)))
    params.append(torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16)))
    params.append(torch.nn.Parameter(torch.zeros(300, 250)))  # large by the default threshold
    return params


def _random_grads(params, g: torch.Generator, p_missing: float) -> None:
    everything = torch.rand((), generator=g) < 0.3  # some steps give every parameter a grad
    for p in params:
        if not everything and torch.rand((), generator=g) < p_missing:
            p.grad = None
            continue
        # Few distinct values, many exact zeros: agreements and 0 == 0 ties are common.
        grad = torch.randint(-1, 2, p.shape, generator=g) * torch.rand(p.shape, generator=g)
        p.grad = grad.to(p.dtype)


def _same_state(tracker, reference):
    has = {tracker.keys[i] for i in reference.signs}
    assert set(tracker.json_state()["has_signs"]) == has
    state = tracker.tensor_state()
    for i, expected in reference.signs.items():
        assert torch.equal(state[tracker.keys[i]], expected.contiguous())


def _storage_bytes(tracker) -> int:
    storages = {s.untyped_storage().data_ptr(): s.untyped_storage().nbytes()
                for s in tracker._signs if s is not None}
    return sum(storages.values())


@pytest.mark.parametrize("thresholds", [None, (16, 40), (64, 64)])
def test_tracker_packed_updates_match_the_reference(monkeypatch, thresholds):
    if thresholds is not None:  # small buffers: many packs, many loose tensors
        monkeypatch.setattr(GradientSignTracker, "small_numel", thresholds[0])
        monkeypatch.setattr(GradientSignTracker, "pack_numel", thresholds[1])
    params = _mixed_params()
    tracker = GradientSignTracker(params)
    reference = _ReferenceTracker(params)
    g = torch.Generator().manual_seed(1234)
    measured = 0
    for step in range(120):
        # Early steps: many params first seen later; then the usual sparse-ish LoRA pattern.
        _random_grads(params, g, p_missing=0.7 if step < 10 else 0.25)
        got, want = tracker.update(), reference.update()
        assert got == want, step  # the same integers divided: exactly equal
        measured += want is not None
        _same_state(tracker, reference)
        # The persistent state is the sign buffers alone: no stale flat buffer kept alive.
        assert _storage_bytes(tracker) == tracker.memory_bytes
        assert tracker.memory_bytes == sum(s.numel() for s in reference.signs.values())
    assert tracker.num_measured == measured
    assert tracker._packs  # the fast path was in use
    if thresholds is None:
        assert len(tracker._loose) == 1  # only the large matrix is handled on its own


def test_tracker_packs_survive_replaced_sparse_and_reshaped_gradients():
    params = _params(3, 4, 5, 6)
    emb = torch.nn.Embedding(5, 2, sparse=True)
    params.append(emb.weight)
    tracker = GradientSignTracker(params)
    reference = _ReferenceTracker(params)
    g = torch.Generator().manual_seed(7)

    def step():
        for p in params[:4]:
            p.grad = torch.randn(p.shape, generator=g)
        emb.weight.grad = None
        emb(torch.randint(0, 5, (3,), generator=g)).sum().backward()
        assert tracker.update() == reference.update()
        _same_state(tracker, reference)

    for _ in range(4):
        step()
    # A sparse gradient for a packed parameter: that step goes tensor by tensor, then repacks
    # (params[3], without a gradient, keeps its signs and moves to the new buffer).
    params[1].grad = torch.randn(4, generator=g).to_sparse()
    params[3].grad = None
    for p in (params[0], params[2]):
        p.grad = torch.randn(p.shape, generator=g)
    assert tracker.update() == reference.update()
    _same_state(tracker, reference)
    assert _storage_bytes(tracker) == tracker.memory_bytes
    for _ in range(3):
        step()
    # A parameter reshaped in place: not compared (other shape), then tracked with its new shape.
    params[2].data = torch.zeros(5, 1)
    reference.params[2] = params[2]
    for _ in range(3):
        step()
    assert _storage_bytes(tracker) == tracker.memory_bytes
    # Signs replaced from outside (as a test or a debugger might) are the ones compared with.
    tracker._signs[0] = reference.signs[0] = torch.tensor([1, 0, -1], dtype=torch.int8)
    for _ in range(2):
        step()


def test_tracker_gathers_small_tensors_in_a_few_operations():
    params = _params(*([10] * 200))
    tracker = GradientSignTracker(params)

    class _Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.signs = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.signs += getattr(func, "__name__", "") in ("sign", "sign_")
            return func(*args, **(kwargs or {}))

    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with _Count() as mode:
            tracker.update()
        # The first update stores the signs one tensor at a time; then one sign() per buffer.
        assert mode.signs == (200 if step == 0 else 1)


def test_tracker_state_round_trip_mid_sequence_with_packed_signs(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(GradientSignTracker, "small_numel", 50)
    monkeypatch.setattr(GradientSignTracker, "pack_numel", 120)
    params = _mixed_params()
    seeds = torch.Generator().manual_seed(99)
    schedule = []
    for _ in range(40):
        _random_grads(params, seeds, p_missing=0.3)
        schedule.append([None if p.grad is None else p.grad.clone() for p in params])

    def run(tracker, steps):
        out = []
        for grads in steps:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            out.append(tracker.update())
        return out

    reference = _ReferenceTracker(params)
    expected = run(reference, schedule)
    first = GradientSignTracker(params)
    assert run(first, schedule[:17]) == expected[:17]
    save_file(first.tensor_state(), tmp_path / "signs.safetensors")
    (tmp_path / "signs.json").write_text(json.dumps(first.json_state()))
    # The saved signs are the per-parameter tensors of before, not the flat buffers.
    saved = load_file(tmp_path / "signs.safetensors")
    assert sorted(saved) == sorted(first.json_state()["has_signs"])
    assert all(saved[k].numel() == n for k, n in first.json_state()["numel"].items())

    # Into a fresh tracker, and over a tracker that already had packed signs of its own.
    fresh = GradientSignTracker(params)
    used = GradientSignTracker(params)
    run(used, schedule[30:])
    for resumed in (fresh, used):
        resumed.load_state(
            json.loads((tmp_path / "signs.json").read_text()),
            load_file(tmp_path / "signs.safetensors"),
        )
        assert resumed.json_state() == first.json_state()
        assert run(resumed, schedule[17:]) == expected[17:]
        assert resumed.num_updates == 40
    assert run(first, schedule[17:]) == expected[17:]  # saving disturbed nothing


def test_tracker_rejects_signs_outside_minus_one_to_one():
    a = GradientSignTracker(_params(3))
    a._signs[0] = torch.ones(3, dtype=torch.int8)
    with pytest.raises(CheckpointError, match="values other than"):
        GradientSignTracker(_params(3)).load_state(
            a.json_state(), {"0": torch.tensor([1, 5, 0], dtype=torch.int8)}
        )


# ------------------------------------------------------------------ reduce_signal


def test_reduce_signal_single_process_is_identity():
    assert reduce_signal(0.75) == 0.75
    assert reduce_signal(None) is None
    assert reduce_signal(torch.tensor(2.0)) == 2.0


def _rank_worker(rank: int, path: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        got = [
            reduce_signal([0.5, 1.5][rank]),
            reduce_signal([None, 3.0][rank]),  # a rank without a value is left out of the mean
            reduce_signal(None),
            reduce_signal([float("nan"), 1.0][rank]),  # a NaN stays visible everywhere
        ]
        results.put((rank, got))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo ranks")
def test_reduce_signal_averages_across_two_gloo_ranks(tmp_path: Path):
    # Forked, not spawned: a spawned rank would re-import gearshift (seconds per process).
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    ranks = [
        ctx.Process(target=_rank_worker, args=(r, str(tmp_path / "rendezvous"), results))
        for r in range(2)
    ]
    for proc in ranks:
        proc.start()
    got = dict(results.get(timeout=60) for _ in ranks)
    for proc in ranks:
        proc.join(timeout=30)
    assert [proc.exitcode for proc in ranks] == [0, 0]
    for rank in (0, 1):
        assert got[rank][:3] == [1.0, 3.0, None] and math.isnan(got[rank][3])
