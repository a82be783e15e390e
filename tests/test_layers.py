"""Nothing imports upward: each layer of the design's table imports only the layers above it.

Every ``import`` in every module is read (those inside functions too), so a lazy import does not
hide a dependency on a lower layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gearshift

#: The layers, top (imported by everything) to bottom (imports anything above it).
LAYERS = ["errors", "schedules", "signals", "phases", "config", "checkpoint", "rundir", "models",
          "transforms", "data", "train", "tasks", "run", "pipeline", "daemon", "report",
          "integrations", "cli"]
#: Packages that belong to a layer of another name (the LoRA library is the transforms' layer).
PART_OF = {"lora": "transforms"}
ROOT = Path(gearshift.__file__).resolve().parent


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "gearshift" or len(parts) < 2:
        return None
    name = PART_OF.get(parts[1], parts[1])
    return LAYERS.index(name) if name in LAYERS else None


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return out


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found.append((".".join(parts).removesuffix(".__init__"), path))
    return found


def test_every_package_is_a_known_layer() -> None:
    packages = {name.split(".")[1] for name, _ in modules() if name.count(".") >= 1}
    assert packages - {"__main__", "version"} <= set(LAYERS) | set(PART_OF)


def test_nothing_imports_upward() -> None:
    upward = []
    for name, path in modules():
        own = layer_of(name)
        if own is None:
            continue  # the package itself and __main__ gather everything on purpose
        for target in imports(path):
            other = layer_of(target)
            if other is not None and other > own:
                upward.append(f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[other]})")
    assert upward == []


def test_config_holds_no_glue_between_the_layers_it_validates() -> None:
    config = [(n, p) for n, p in modules() if n.startswith("gearshift.config")]
    assert config
    for name, path in config:
        found = [t for t in imports(path) if t.startswith(("gearshift.phases", "gearshift.lora"))]
        assert found == [], name


def test_train_knows_tasks_and_data_only_through_interfaces() -> None:
    for name, path in modules():
        if name.startswith("gearshift.train"):
            found = [t for t in imports(path) if t.startswith(("gearshift.tasks", "gearshift.data"))]
            assert found == [], name
