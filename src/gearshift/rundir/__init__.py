"""Run directories: the names of the files in them, and typed readers for those files.

The trainer writes a run directory through this package; everything that reads one (the CLI,
report, compare, the pipeline, the daemon) reads it only through this package and never
imports ``gearshift.train``.

Example:
    >>> from gearshift import rundir
    >>> run = "runs/tiny-20260101-120000"  # doctest: +SKIP
    >>> config = rundir.read_run_config(run)  # doctest: +SKIP
    >>> losses = rundir.metric_series(rundir.read_metrics(run), "loss")  # doctest: +SKIP
    >>> newest = rundir.latest_checkpoint(run)  # doctest: +SKIP
"""

from gearshift.rundir.jsonl import append_record, drop_torn_tail, truncate_after
from gearshift.rundir.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVENTS_FILE,
    FINAL_DIR,
    METRICS_FILE,
    OVERRIDES_FILE,
    REPORT_DIR,
    SAMPLES_FILE,
    TENSORBOARD_DIR,
    RunPaths,
    create_run_dir,
    find_auto_resume,
)
from gearshift.rundir.readers import (
    CheckpointEntry,
    EventRecord,
    MetricRecord,
    final_model_dir,
    latest_checkpoint,
    list_checkpoints,
    metric_series,
    read_events,
    read_metrics,
    read_overrides,
    read_run_config,
    read_run_config_dict,
)
from gearshift.rundir.status import RunStatus, run_status
from gearshift.rundir.writers import write_run_config

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "EVENTS_FILE",
    "FINAL_DIR",
    "METRICS_FILE",
    "OVERRIDES_FILE",
    "REPORT_DIR",
    "SAMPLES_FILE",
    "TENSORBOARD_DIR",
    "CheckpointEntry",
    "EventRecord",
    "MetricRecord",
    "RunPaths",
    "RunStatus",
    "append_record",
    "create_run_dir",
    "drop_torn_tail",
    "final_model_dir",
    "find_auto_resume",
    "latest_checkpoint",
    "list_checkpoints",
    "metric_series",
    "read_events",
    "read_metrics",
    "read_overrides",
    "read_run_config",
    "read_run_config_dict",
    "run_status",
    "truncate_after",
    "write_run_config",
]
