"""Random number generator state as plain JSON, so a resumed run draws the same numbers.

Covers Python's ``random``, NumPy's global generator, torch's CPU generator and, when CUDA is
available, every CUDA device's generator. Torch states are raw bytes and travel as base64.
"""

from __future__ import annotations

import base64
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from gearshift.errors import CheckpointError

RNG_FORMAT = "gearshift-rng"
RNG_VERSION = 1


def _bytes_to_b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_bytes(text: str) -> torch.Tensor:
    # bytearray gives torch a writable buffer, which frombuffer requires to avoid a warning.
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """Return the state of every global random generator as a JSON-safe dict.

    Returns:
        ``{"format": "gearshift-rng", "version": 1, "python": ..., "numpy": ..., "torch": ...}``;
        ``json.dumps(state, allow_nan=False)`` always succeeds.

    Example:
        >>> state = capture_rng_state()
        >>> a = random.random()
        >>> restore_rng_state(state)
        >>> random.random() == a
        True
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    torch_state: dict[str, Any] = {"cpu": _bytes_to_b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        torch_state["cuda"] = [_bytes_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return {
        "format": RNG_FORMAT,
        "version": RNG_VERSION,
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_name,
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch_state,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put every global random generator back to a state from :func:`capture_rng_state`.

    CUDA generators are restored when the state has them and CUDA is available; otherwise (for
    example a GPU run resumed on CPU) a warning says they were not restored.

    Args:
        state: The dict returned by :func:`capture_rng_state`, possibly after a JSON round trip.

    Raises:
        CheckpointError: If ``state`` is not a supported RNG state or is malformed.
    """
    if not isinstance(state, Mapping) or state.get("format") != RNG_FORMAT:
        raise CheckpointError("RNG state is not a gearshift RNG state (missing format tag)")
    if state.get("version") != RNG_VERSION:
        raise CheckpointError(
            f"RNG state version {state.get('version')!r} is not supported "
            f"(this gearshift reads version {RNG_VERSION})"
        )
    try:
        py = state["python"]
        npy = state["numpy"]
        tch = state["torch"]
        py_state = (int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"])
        np_state = (
            str(npy["bit_generator"]),
            np.asarray(npy["keys"], dtype=np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
        cpu_state = _b64_to_bytes(tch["cpu"])
        cuda_states = [_b64_to_bytes(s) for s in tch.get("cuda", [])]
        # Set everything only after everything parsed, so a bad state changes nothing.
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state is malformed ({exc!r})") from exc
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            "checkpoint holds CUDA RNG state but CUDA is not available; CUDA RNG not restored",
            stacklevel=2,
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        warnings.warn(
            f"checkpoint holds CUDA RNG state for {len(cuda_states)} device(s) but {count} are "
            f"visible; restoring the first {min(count, len(cuda_states))}",
            stacklevel=2,
        )
    for device, device_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(device_state, device)
