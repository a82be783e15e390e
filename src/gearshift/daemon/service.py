"""The daemon's loop: take the oldest settled inbox file, train the current model on it, keep a
verified snapshot, switch ``current_model`` to it, then move the file to ``done/``.

The order is the exactly-once rule: no file reaches ``done/`` before its model is durably the
current one, and no file is trained twice. Every step after the take is recorded in the file's
job (:mod:`gearshift.daemon.jobs`), so a daemon killed at any instant and started again
continues where it was: a run is resumed from its newest checkpoint, a finished one is not
trained again, a snapshot written before the kill is checked and reused.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from gearshift import rundir
from gearshift.config import load_config
from gearshift.daemon import snapshots
from gearshift.daemon.datafile import check_file, error_record
from gearshift.daemon.hooks import DaemonHooks, PeakMemory
from gearshift.daemon.inbox import Inbox, Wakeup, is_ignored
from gearshift.daemon.jobs import JOB_FILE, Job, all_jobs, final_name, find_open_job, new_name
from gearshift.daemon.layout import (
    ERROR_SUFFIX,
    RESULT_SUFFIX,
    DaemonPaths,
    durable_rename,
    write_json_atomic,
)
from gearshift.daemon.lock import PidLock
from gearshift.daemon.setup import load_daemon_config
from gearshift.daemon.status import StatusFile, now_iso
from gearshift.errors import DataError, GearshiftError, ModelError
from gearshift.models import validate_model_dir
from gearshift.train import TrainingInterrupted
from gearshift.train.interrupt import TrainingDiverged

LOG = logging.getLogger("gearshift.daemon")


class Daemon:
    """One daemon on one base directory.

    Args:
        base: The base directory set up by ``gearshift daemon init``.
        drain: Exit once the inbox is empty (instead of waiting for more files).
        echo: Also log to stderr (foreground).

    Example:
        >>> Daemon("svc", drain=True).run()  # doctest: +SKIP
        0
    """

    def __init__(self, base: str | Path, *, drain: bool = False, echo: bool = True) -> None:
        self.paths = DaemonPaths(base)
        self.drain = drain
        self.echo = echo
        self.stop_requested = threading.Event()
        self.memory = PeakMemory()

    # ------------------------------------------------------------------ life

    def run(self) -> int:
        """Serve until stopped (or, with ``drain``, until the inbox is empty); the exit code.

        Raises:
            GearshiftError: A bad ``daemon.yaml``, a damaged current model, a second daemon.
        """
        p = self.paths
        p.require()
        self.cfg = load_daemon_config(p.config)
        self.settings = self.cfg.daemon
        with PidLock(p.pid):
            self._open_log()
            try:
                self._serve_locked()
            finally:
                self._close_log()
        return 0

    def _serve_locked(self) -> None:
        p = self.paths
        current = self._check_current_model()
        self.status = StatusFile(p.status, self.settings.status_every_seconds)
        self.status.update(state="idle", pid=os.getpid(), started_at=now_iso(),
                           current_file=None, last_error=None, write=False)
        self.inbox = Inbox(p.inbox, self.settings.settle_seconds)
        self._model_facts(current)
        self._counts()
        self.status.write()
        self.status.start()
        p.stop_file.unlink(missing_ok=True)
        self.wakeup = Wakeup(p.inbox, self.settings.watch, LOG.warning)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        LOG.info("daemon up (pid %d) on %s; inbox watched by %s; current model %s",
                 os.getpid(), p.base, self.wakeup.mode, current.name)
        try:
            self._recover()
            self._serve()
        except TrainingInterrupted:
            LOG.info("stopped while training; the file stays in processing/ and resumes from "
                     "its checkpoint at the next start")
        except KeyboardInterrupt:
            LOG.info("aborted (a second Ctrl-C); the file resumes from its newest checkpoint")
            raise
        except GearshiftError as exc:
            self.status.update(state="error", last_error=str(exc))
            LOG.error("%s", exc)
            raise
        except BaseException as exc:
            self.status.update(state="error", last_error=f"{type(exc).__name__}: {exc}")
            LOG.exception("daemon failed; nothing is lost: the file being trained stays in "
                          "processing/ and resumes at the next start")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.wakeup.close()
            self.status.close()
            if self.status.fields["state"] != "error":
                self.status.update(state="stopped", current_file=None)
            p.stop_file.unlink(missing_ok=True)
            LOG.info("daemon down")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        LOG.info("%s received: stopping after the current step", signal.Signals(signum).name)
        self.stop_requested.set()
        self.wakeup.event.set()

    def _stopping(self) -> bool:
        if self.paths.stop_file.exists():
            self.stop_requested.set()
        return self.stop_requested.is_set()

    def _serve(self) -> None:
        while not self._stopping():
            ready = self.inbox.ready()
            self._counts()
            if ready:
                self._process(*self._take(ready[0]))
                continue
            self.status.update(state="idle", current_file=None)
            if self.drain and not self.inbox.candidates():
                LOG.info("inbox empty: exiting (--drain)")
                return
            settle = self.inbox.next_settle_in()
            self.wakeup.wait(min(self.settings.poll_seconds,
                                 settle if settle is not None else float("inf")))
        self.status.update(state="stopping")

    # ------------------------------------------------------------------ one file

    def _recover(self) -> None:
        """Finish what a previous daemon left: files in ``processing/``, and jobs whose file
        already reached ``done/``."""
        p = self.paths
        in_processing = {f.name for f in p.processing.iterdir() if not is_ignored(f.name)}
        for job in all_jobs(p):
            if job.stage == "switched" and job.file not in in_processing and \
                    (p.done / job.final_name).exists():
                job.advance(p, "done")
        for file in sorted(p.processing.iterdir()):
            if is_ignored(file.name) or not file.is_file():
                continue
            job = find_open_job(p, file)
            if job is None:
                job = self._new_job(file)
                LOG.info("found %s in processing/ with no job: starting it", file.name)
            else:
                LOG.info("recovering %s (stage %s, run %s)", file.name, job.stage, job.name)
            self._process(file, job)
            if self._stopping():
                return

    def _take(self, src: Path) -> tuple[Path, Job]:
        dst = self.paths.processing / src.name
        durable_rename(src, dst)
        job = self._new_job(dst)
        LOG.info("took %s (run %s)", src.name, job.name)
        return dst, job

    def _new_job(self, file: Path) -> Job:
        from gearshift.checkpoint.manifest import sha256_file
        from gearshift.data.profiles import today

        p = self.paths
        name = new_name(p, file)
        start = snapshots.current_snapshot(p)
        if start is None:
            raise ModelError(f"{p.current_model} is missing; make a snapshot current with "
                             f"`gearshift daemon rollback {p.base} SNAPSHOT`")
        profile = self.cfg.profile
        overrides = {
            "name": name, "output_dir": str(p.runs.resolve()), "resume": None,
            "model.path": str(start.resolve()),
            "data.paths": [str(file.resolve())],
            "profile.date": profile.date or today().isoformat(),  # fixed when taken
            "profile.variables": {"model_name": self.display_name, **profile.variables},
        }
        config = load_config(p.config, overrides).model_dump(mode="json")
        job = Job(file=file.name, name=name, final_name=final_name(p, file, name),
                  sha256=sha256_file(file), taken_at=now_iso(), start_model=start.name,
                  config=config)
        job.save(p)
        return job

    def _process(self, file: Path, job: Job) -> None:
        self.memory.reset()
        self.status.update(state="training", current_file=file.name, current_step=0,
                           total_steps=None, loss=None, learning_rate=None, eta_seconds=None,
                           peak_memory_mb=None, system_prompt=self._system_prompt(job),
                           write=True)
        try:
            if job.stage == "training":
                check_file(file, load_config(job.config), self.settings.min_examples)
                self._train(job)
            if job.stage == "trained":
                self._publish(job)
        except (DataError, TrainingDiverged, ModelError) as exc:
            if isinstance(exc, ModelError) and job.stage == "training":
                raise  # the current model cannot be loaded: not the file's fault
            job.advance(self.paths, "failed", error=error_record(
                file, job.final_name, exc, job.run_dir(self.paths)))
        if job.stage == "switched":
            self._finish(file, job)
        elif job.stage == "failed":
            self._reject(file, job)

    def _train(self, job: Job) -> None:
        from gearshift.run import train

        run_dir = job.run_dir(self.paths)
        valid = _newest_valid_checkpoint(run_dir)
        resume = run_dir if valid is not None else None
        if resume is None:
            # Killed before its first checkpoint (or every one is damaged): start it afresh.
            for entry in run_dir.iterdir():
                if entry.name != JOB_FILE:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            LOG.info("resuming run %s from %s", job.name, valid)
        hooks = DaemonHooks(self.status, self.memory, self._stopping,
                            self.settings.max_memory_mb, LOG.warning)
        try:
            result = train(load_config(job.config), resume=resume, run_dir=run_dir,
                           callbacks=[hooks])
        finally:
            peak = max(job.result.get("peak_memory_mb") or 0.0, self.memory.peak)
            job.result["peak_memory_mb"] = peak
        facts = rundir.run_status(run_dir)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        job.advance(self.paths, "trained", steps=result.step, metrics=metrics,
                    time_seconds=round(facts.active_seconds, 3), resumes=facts.resumes)
        LOG.info("trained %s: %d steps, loss %s", job.file, result.step,
                 metrics.get("eval/loss", "n/a"))
        self._pause("train_end", job)

    def _publish(self, job: Job) -> None:
        """Snapshot the run's ``final/`` (verified) and make it the current model."""
        p = self.paths
        final = rundir.final_model_dir(job.run_dir(p))
        if final is None:
            raise ModelError(f"run {job.run_dir(p)} ended without a final/ model directory")
        snap = snapshots.write_snapshot(
            final, p.snapshots, job.name,
            info={"file": job.final_name, "run": job.name, "model_name": self.display_name},
            after_file=lambda: self._pause("snapshot_file", job))
        self._pause("switch", job)
        snapshots.switch_current(p, snap)
        job.advance(p, "switched", snapshot=snap.name)
        removed = snapshots.prune(p, self.settings.keep_snapshots)
        if removed:
            LOG.info("removed old snapshots: %s", ", ".join(s.name for s in removed))
        self._model_facts(snap)
        LOG.info("current model is now snapshot %s", snap.name)

    def _finish(self, file: Path, job: Job) -> None:
        p = self.paths
        self._pause("done", job)
        r = job.result
        result = {"file": job.final_name, "received_as": job.file, "run": str(job.run_dir(p)),
                  "snapshot": r.get("snapshot"), "steps": r.get("steps"),
                  "metrics": r.get("metrics", {}), "time_seconds": r.get("time_seconds"),
                  "resumes": r.get("resumes"), "peak_memory_mb": r.get("peak_memory_mb"),
                  "taken_at": job.taken_at, "finished_at": now_iso(),
                  "start_model": job.start_model, "sha256": job.sha256}
        write_json_atomic(p.done / (job.final_name + RESULT_SUFFIX), result)
        durable_rename(file, p.done / job.final_name)
        job.advance(p, "done")
        self._counts()
        self.status.update(state="idle", current_file=None, write=True)
        LOG.info("done: %s", job.final_name)

    def _reject(self, file: Path, job: Job) -> None:
        p = self.paths
        error = dict(job.result.get("error") or {})
        write_json_atomic(p.failed / (job.final_name + ERROR_SUFFIX), error)
        durable_rename(file, p.failed / job.final_name)
        job.advance(p, "done")  # the file has left processing/
        self._counts()
        self.status.update(state="idle", current_file=None, last_error=error.get("reason"),
                           write=True)
        LOG.warning("failed: %s: %s", job.final_name, error.get("reason"))

    def _pause(self, stage: str, job: Job) -> None:
        delay = self.settings.stage_delay_s.get(stage, 0.0)
        if delay:
            LOG.info("stage %s of %s: pausing %gs (daemon.stage_delay_s)", stage, job.file,
                     delay)
            time.sleep(delay)

    # ------------------------------------------------------------------ facts for the status

    def _check_current_model(self) -> Path:
        p = self.paths
        current = snapshots.current_snapshot(p)
        if current is None or not current.is_dir():
            raise ModelError(f"{p.current_model} does not point at a snapshot; make one "
                             f"current with `gearshift daemon rollback {p.base} SNAPSHOT` "
                             f"(see `gearshift daemon status {p.base}`)")
        problems = snapshots.verify_snapshot(current)
        report = validate_model_dir(current)
        problems += report.problems
        if problems:
            raise ModelError(f"the current model {current} is damaged: {'; '.join(problems)}; "
                             f"roll back with `gearshift daemon rollback {p.base} SNAPSHOT`")
        manifest = snapshots.read_manifest(snapshots.list_snapshots(p)[0]) or {}
        self.display_name = (self.settings.model_name or manifest.get("model_name")
                             or current.name)
        return current

    def _model_facts(self, snap: Path) -> None:
        report = validate_model_dir(snap)
        self.status.update(model_dir=str(snap.resolve()), model_kind=report.kind,
                           model_display_name=self.display_name, profile=self.cfg.profile.name)

    def _system_prompt(self, job: Job | None) -> str:
        from gearshift.data.profiles import load_profile, today

        p = self.cfg.profile
        date = (job.config.get("profile", {}).get("date") if job else None) or p.date or \
            today().isoformat()
        return load_profile(p.name).render(date=date, variables={
            "model_name": self.display_name, **p.variables})

    def _counts(self) -> None:
        p = self.paths
        self.status.update(
            files_done=sum(1 for _ in p.done.glob(f"*{RESULT_SUFFIX}")),
            files_failed=sum(1 for _ in p.failed.glob(f"*{ERROR_SUFFIX}")),
            queue_length=len(self.inbox.candidates()))

    # ------------------------------------------------------------------ the log

    def _open_log(self) -> None:
        self.paths.log.parent.mkdir(parents=True, exist_ok=True)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        self._handlers: list[logging.Handler] = [logging.FileHandler(self.paths.log,
                                                                     encoding="utf-8")]
        if self.echo:
            self._handlers.append(logging.StreamHandler(sys.stderr))
        for h in self._handlers:
            h.setFormatter(fmt)
            LOG.addHandler(h)

    def _close_log(self) -> None:
        for h in self._handlers:
            LOG.removeHandler(h)
            h.close()


def _newest_valid_checkpoint(run_dir: Path) -> Path | None:
    from gearshift.checkpoint import verify_checkpoint

    for entry in reversed(rundir.list_checkpoints(run_dir)):
        if not verify_checkpoint(entry.path):
            return entry.path
    return None
