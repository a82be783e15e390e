"""Pipeline files: stages, what each one starts from, and validating all of them together.

A pipeline file names its stages in order. Each stage is a normal gearshift config (inline, or
the path of a YAML file) run as a normal run directory; ``from:`` makes the stage start from an
earlier stage's ``final/`` (or a model directory path) by setting its ``model.path``::

    name: default
    stages:
      - {name: pretrain, config: {task: lm, training: {max_steps: 300}}}
      - {name: sft, config: examples/sft_chat.yaml, from: pretrain}
      - {name: qat, config: examples/bitnet_qat.yaml, from: sft}

Every problem of every stage is collected before anything runs, each prefixed with its stage.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import gearshift.tasks  # noqa: F401  (registers the tasks: task names and their sections)
import gearshift.transforms  # noqa: F401  (registers the checks that span sections)
from gearshift.config import Config, Layer, build_layers, parse_set_overrides, read_config_file
from gearshift.config import resolve as resolve_layers
from gearshift.errors import ConfigError, Problem, did_you_mean

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: How a stage receives the model it starts from.
HANDOFF_KINDS = ("full", "adapter")


class StageSpec(BaseModel):
    """One stage as written in a pipeline file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., description="the stage's name (letters, digits, _ . -), unique")
    config: dict[str, Any] | str = Field(
        ..., description="a gearshift config: inline, or the path of a YAML file (relative to "
        "the pipeline file, else to the working directory)")
    from_: str | None = Field(
        None, alias="from", description="an earlier stage's name (its final/ model) or a model "
        "directory path; sets the stage's model.path. null = the config's own model")
    handoff: Literal["full", "adapter"] = Field(
        "full", description="full = a full model (an adapter from the earlier stage is merged "
        "into its base first); adapter = the earlier stage's LoRA adapter, trained further")


class PipelineSpec(BaseModel):
    """A pipeline file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("pipeline", min_length=1, description="prefix of the pipeline directory")
    output_dir: str = Field("pipelines", description="parent of pipeline directories")
    stages: list[StageSpec] = Field(..., min_length=1, description="the stages, in order")


@dataclass
class Stage:
    """A stage resolved for a pipeline directory.

    Attributes:
        index: Position in the pipeline (0-based).
        name: The stage's name.
        config: The stage's validated config (``model.path`` already set from ``from:``).
        source: Where ``from:`` points: ``stage`` (an earlier stage), ``path`` or None.
        from_: The earlier stage's name or the model directory path (None: no ``from:``).
        handoff: ``full`` or ``adapter``.
    """

    index: int
    name: str
    config: Config
    source: Literal["stage", "path"] | None
    from_: str | None
    handoff: str
    audit: dict[str, Any] = field(default_factory=dict)

    @property
    def dir_name(self) -> str:
        """``<i>-<name>``: the stage's folder under ``stages/`` and ``handoff/``."""
        return f"{self.index}-{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """The stage as written into the resolved ``pipeline.yaml``."""
        return {"name": self.name, "from": self.from_, "handoff": self.handoff,
                "config": self.config.model_dump(mode="json")}


@dataclass
class ResolvedPipeline:
    """Every stage of a pipeline, validated, for one pipeline directory."""

    name: str
    output_dir: str
    stages: list[Stage]
    source: str

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "output_dir": self.output_dir, "source": self.source,
                "stages": [s.to_dict() for s in self.stages]}


def read_pipeline_file(source: str | Path | Mapping[str, Any] | None,
                       ) -> tuple[dict[str, Any], Path | None, str]:
    """The raw pipeline (a file, a dict, or None for the embedded default), the folder its
    relative stage config paths start from, and a label of where it came from."""
    if source is None:
        from gearshift.pipeline.default import default_pipeline

        return default_pipeline(), None, "the embedded default pipeline"
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), None, "dict"
    path = Path(source)
    return read_config_file(path), path.parent, str(path)


def parse_stage_sets(sets: Sequence[str], names: Sequence[str]) -> tuple[dict[str, list[str]],
                                                                         list[Problem]]:
    """Split ``--set STAGE.key.path=value`` by stage: ``{stage: ["key.path=value"]}``."""
    by_stage: dict[str, list[str]] = {}
    problems = []
    for item in sets:
        stage, dot, rest = item.partition(".")
        if not dot or "=" not in rest or "=" in stage:
            problems.append(Problem("--set", f"expected STAGE.KEY.PATH=VALUE (e.g. "
                                    f"{names[0] if names else 'sft'}.training.max_steps=100), "
                                    f"got {item!r}"))
        elif stage not in names:
            problems.append(Problem("--set", f"{item!r}: no stage named {stage!r}"
                                    f"{did_you_mean(stage, names)}; stages: {', '.join(names)}"))
        else:
            by_stage.setdefault(stage, []).append(rest)
    return by_stage, problems


def resolve_pipeline(source: str | Path | Mapping[str, Any] | None, pipeline_dir: Path,
                     sets: Sequence[str] = ()) -> ResolvedPipeline:
    """Validate a pipeline and every stage config for ``pipeline_dir`` (not created here).

    Args:
        source: A pipeline YAML path, a dict, or None for the embedded default.
        pipeline_dir: The directory the pipeline will run in (hand-off paths point into it).
        sets: ``STAGE.key.path=value`` overrides.

    Raises:
        ConfigError: Listing every problem of the file and of every stage, each prefixed with
            ``stage NAME``.
    """
    raw, base_dir, label = read_pipeline_file(source)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_pipeline_problem(err, raw) for err in exc.errors()], label) from None
    problems: list[Problem] = []
    names = [s.name for s in spec.stages]
    sets_by_stage, set_problems = parse_stage_sets(sets, names)
    problems.extend(set_problems)
    pipeline_dir = pipeline_dir.resolve()
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    for index, s in enumerate(spec.stages):
        where = f"stage {s.name}"
        if not STAGE_NAME.match(s.name):
            problems.append(Problem(where, "a stage name is letters, digits, '_', '.' and '-' "
                                    "(it names the stage's folder)"))
        if s.name in seen:
            problems.append(Problem(where, f"two stages are named {s.name!r} (stages "
                                    f"{seen[s.name]} and {index}); give each a unique name"))
        source_kind, model_path = _from(s, index, seen, spec, pipeline_dir, base_dir, problems)
        seen.setdefault(s.name, index)
        layers: list[Layer] = []
        try:
            config_source = s.config if isinstance(s.config, dict) else \
                _config_path(s.config, base_dir)
            layers = build_layers(config_source)
        except ConfigError as exc:
            problems.extend(_prefixed(where, exc))
            continue
        if model_path is not None:
            layers.append(Layer(f"pipeline from: {s.from_}", {"model": {"path": model_path}}))
        if sets_by_stage.get(s.name):
            try:
                layers.append(parse_set_overrides(sets_by_stage[s.name]))
            except ConfigError as exc:
                problems.extend(_prefixed(where, exc))
                continue
        try:
            resolved = resolve_layers(layers)
        except ConfigError as exc:
            problems.extend(_prefixed(where, exc))
            continue
        stages.append(Stage(index, s.name, resolved.config, source_kind, s.from_, s.handoff,
                            resolved.audit))
    if not problems:
        problems.extend(_handoff_problems(stages, pipeline_dir))
    if problems:
        raise ConfigError(problems, label)
    return ResolvedPipeline(spec.name, spec.output_dir, stages, label)


def exports_adapter(stage: Stage, stages: Sequence[Stage]) -> bool:
    """Whether the stage's ``final/`` will be a LoRA adapter (it trains LoRA, or continues the
    adapter it is handed)."""
    if stage.config.lora.enabled:
        return True
    return stage.source == "stage" and stage.handoff == "adapter"


def handoff_path(stage: Stage, producer: Stage, stages: Sequence[Stage],
                 pipeline_dir: Path) -> Path:
    """Where ``stage`` finds the model it starts from: the producer's ``final/``, or the merged
    copy ``handoff/<i>-<name>/`` when the producer exports an adapter and ``stage`` needs a
    full model."""
    if stage.handoff == "full" and exports_adapter(producer, stages):
        return pipeline_dir / "handoff" / stage.dir_name
    return pipeline_dir / "stages" / producer.dir_name / "final"


def _from(s: StageSpec, index: int, seen: Mapping[str, int], spec: PipelineSpec,
          pipeline_dir: Path, base_dir: Path | None, problems: list[Problem],
          ) -> tuple[Literal["stage", "path"] | None, str | None]:
    where = f"stage {s.name}"
    if s.from_ is None:
        if s.handoff == "adapter":
            problems.append(Problem(where, "handoff: adapter needs from: (an earlier stage that "
                                    "trains LoRA); remove handoff or add from:"))
        return None, None
    names = [t.name for t in spec.stages]
    if s.from_ in seen:
        producer = spec.stages[seen[s.from_]]
        # The hand-off path depends on whether the producer exports an adapter, known once
        # its config is resolved: the producer's final/ now, the real path in _handoff_problems.
        return "stage", str(pipeline_dir / "stages" / f"{seen[s.from_]}-{producer.name}" /
                            "final")
    if s.from_ in names:
        later = names.index(s.from_)
        problems.append(Problem(where, f"from: {s.from_!r} is a later stage (stage {later}, "
                                f"this is stage {index}); a stage starts from an earlier one"))
        return None, None
    path = Path(s.from_).expanduser()
    candidates = [path] if path.is_absolute() else \
        [p for p in ((base_dir / path) if base_dir else None, path) if p is not None]
    found = next((p for p in candidates if p.is_dir()), None)
    if found is None:
        problems.append(Problem(where, f"from: {s.from_!r} is neither an earlier stage "
                                f"({', '.join(names[:index]) or 'none'}) nor a model directory"
                                f"{did_you_mean(s.from_, names[:index])}"))
        return None, None
    from gearshift.models import validate_model_dir

    report = validate_model_dir(found, load=True)  # checked before a single step is spent
    problems.extend(Problem(where, f"from: {s.from_}: {p}") for p in report.problems)
    return "path", str(found.resolve())


def _handoff_problems(stages: list[Stage], pipeline_dir: Path) -> list[Problem]:
    """Set each ``from: stage`` model.path to its hand-off path; a form the producer cannot give
    is a problem."""
    out = []
    by_name = {s.name: s for s in stages}
    for stage in stages:
        if stage.source != "stage":
            if stage.source == "path" and stage.handoff == "adapter":
                out.append(Problem(f"stage {stage.name}", "handoff: adapter is for an earlier "
                                   "stage's adapter; a model directory path is used as it is "
                                   "(remove handoff)"))
            continue
        producer = by_name[stage.from_ or ""]
        if stage.handoff == "adapter" and not exports_adapter(producer, stages):
            out.append(Problem(f"stage {stage.name}", f"handoff: adapter, but stage "
                               f"{producer.name} trains no LoRA adapter (lora.enabled is "
                               "false); use handoff: full"))
            continue
        stage.config.model.path = str(handoff_path(stage, producer, stages, pipeline_dir))
    return out


def _config_path(value: str, base_dir: Path | None) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
        return base_dir / path
    return path


def _prefixed(where: str, exc: ConfigError) -> list[Problem]:
    return [Problem(where, str(p)) for p in exc.problems]


def _pipeline_problem(err: Any, raw: Mapping[str, Any]) -> Problem:
    loc = [str(p) for p in err["loc"]]
    where = ""
    if len(loc) >= 2 and loc[0] == "stages" and loc[1].isdigit():
        i = int(loc[1])
        stages = raw.get("stages")
        name = stages[i].get("name") if isinstance(stages, list) and i < len(stages) and \
            isinstance(stages[i], Mapping) else None
        where = f"stage {name}" if isinstance(name, str) else f"stages[{i}]"
        loc = loc[2:]
        if loc and loc[0] == "config":
            loc = ["config"]  # a union of dict | str: one message is enough
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = ["name", "config", "from", "handoff"] if where else \
            list(PipelineSpec.model_fields)
        message = f"{key}: unknown key{did_you_mean(loc[-1], allowed)}; valid keys here: " \
                  f"{', '.join(allowed)}"
    elif key == "config":
        message = "config: give a config mapping (inline) or the path of a YAML file"
    else:
        message = f"{key}: {err['msg']}" if key else err["msg"]
    return Problem(where, message)
