"""Pipelines: stages run in order, each a normal run handed a validated model by the previous.

Example:
    >>> from gearshift.pipeline import run_pipeline, resume_pipeline
    >>> result = run_pipeline("examples/pipeline.yaml")  # doctest: +SKIP
    >>> result = resume_pipeline(result.pipeline_dir)  # doctest: +SKIP
"""

from gearshift.pipeline.handoff import check_handoff, dir_manifest, manifest_problems
from gearshift.pipeline.layout import PipelineError, PipelinePaths, read_status
from gearshift.pipeline.runner import PipelineResult, load_stages, resume_pipeline, run_pipeline
from gearshift.pipeline.spec import (
           PipelineSpec,
           ResolvedPipeline,
           Stage,
           StageSpec,
           resolve_pipeline,
)

__all__ = ["PipelineError", "PipelinePaths", "PipelineResult", "PipelineSpec",
           "ResolvedPipeline", "Stage", "StageSpec", "check_handoff", "dir_manifest",
           "load_stages", "manifest_problems", "read_status", "resolve_pipeline",
           "resume_pipeline", "run_pipeline"]
