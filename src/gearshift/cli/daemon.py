"""``gearshift daemon init|run|start|stop|status|rollback BASE_DIR``: the training daemon."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gearshift.cli.options import add_action_verb
from gearshift.errors import UsageError

NAME = "daemon"

EPILOG = """\
layout of BASE_DIR: daemon.yaml, inbox/, processing/, done/, failed/, current_model (a link to
a snapshot), snapshots/, runs/, status/training_status.json, logs/daemon.log, daemon.pid
exactly once: a file moves to done/ only after its model is the current one, durably; a daemon
killed at any instant resumes the file in processing/ from its run's newest checkpoint
examples:
  gearshift daemon init svc --model runs/sft-20261203-101500/final
  gearshift daemon start svc && cp chats.jsonl svc/inbox/
  gearshift daemon status svc
  gearshift daemon stop svc
  gearshift daemon rollback svc 20261203-101702-chats
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Add ``gearshift daemon`` and its actions."""
    top, dsub = add_action_verb(
        sub, NAME, help="keep fine-tuning the current model on JSONL files dropped into an inbox",
        description="A fine-tuning service: each file dropped into BASE_DIR/inbox is trained "
                    "(one normal run, starting from the current model), snapshotted, made the "
                    "current model and moved to done/; bad files go to failed/ with the reason.")
    top.epilog = EPILOG
    top.formatter_class = argparse.RawDescriptionHelpFormatter
    p = dsub.add_parser("init", help="create the layout, daemon.yaml and the initial snapshot",
                        description="Create BASE_DIR with its folders, daemon.yaml (a normal "
                        "gearshift config plus a daemon: section; gradient checkpointing on) "
                        "and the initial model as the first snapshot.")
    p.add_argument("base", metavar="BASE_DIR")
    p.add_argument("--model", metavar="DIR", help="initial model: a model or LoRA adapter "
                   "directory (default: a small model built from model.build, byte tokenizer)")
    p.add_argument("--config", metavar="YAML", help="use this config as daemon.yaml (default: "
                   "the built-in one, see examples/daemon.yaml)")
    p = dsub.add_parser("run", help="serve in the foreground (Ctrl-C / SIGTERM: graceful stop)",
                        description="Serve in the foreground until Ctrl-C or SIGTERM: the step "
                        "being trained is finished and checkpointed, the file stays in "
                        "processing/ and resumes at the next start. Exit 2 when another daemon "
                        "holds BASE_DIR, naming its pid.")
    p.add_argument("base", metavar="BASE_DIR")
    p.add_argument("--drain", action="store_true",
                   help="exit once the inbox is empty instead of waiting for more files")
    p.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    p = dsub.add_parser("start", help="start in the background; prints the pid once it is up",
                        description="Start `gearshift daemon run BASE_DIR` in the background "
                        "(output to logs/daemon.log) and return once it holds daemon.pid.")
    p.add_argument("base", metavar="BASE_DIR")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the daemon to come up (default 120)")
    p = dsub.add_parser("stop", help="graceful stop: finish the step, checkpoint, exit",
                        description="Ask the daemon to stop (SIGTERM and a stop file): it "
                        "finishes the optimizer step, checkpoints and exits; the file being "
                        "trained stays in processing/ and resumes at the next start. Waits "
                        "until it has exited.")
    p.add_argument("base", metavar="BASE_DIR")
    p.add_argument("--now", action="store_true",
                   help="do not wait for a checkpoint: kill the daemon at once (SIGKILL); "
                        "nothing is lost, the file resumes from its newest checkpoint")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for a graceful stop (default 600)")
    p = dsub.add_parser("status", help="what the daemon is doing (status/training_status.json)",
                        description="Print status/training_status.json for people: state, "
                        "current file and step, loss, ETA, files done / failed / waiting, the "
                        "current model, the profile, peak memory, the last error, snapshots.")
    p.add_argument("base", metavar="BASE_DIR")
    p.add_argument("--json", action="store_true", help="print the status file as it is")
    p = dsub.add_parser("rollback", help="make a snapshot the current model (daemon stopped)",
                        description="Verify SNAPSHOT (sha256 of every file) and make it the "
                        "current model; later files start from it. The daemon must be stopped.")
    p.add_argument("base", metavar="BASE_DIR")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="a name in BASE_DIR/snapshots/ (see "
                   "`gearshift daemon status BASE_DIR`)")
    return top


def run(args: argparse.Namespace) -> int:
    """Run the action given; its exit code."""
    return ACTIONS[args.daemon_command](args)


def init(args: argparse.Namespace) -> int:
    from gearshift.daemon import init_daemon, list_snapshots

    paths = init_daemon(args.base, model=args.model, config=args.config)
    snap = list_snapshots(paths)[-1]
    print(f"daemon directory: {paths.base}")
    print(f"config: {paths.config}")
    print(f"current model: snapshot {snap.name}")
    print(f"start it with: gearshift daemon start {paths.base}, then drop JSONL files into "
          f"{paths.inbox}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from gearshift.daemon import Daemon

    return Daemon(args.base, drain=args.drain, echo=not args.background).run()


def start(args: argparse.Namespace) -> int:
    from gearshift.daemon import DaemonPaths, load_daemon_config
    from gearshift.daemon.lock import holder, read_pid

    paths = DaemonPaths(args.base)
    paths.require()
    load_daemon_config(paths.config)  # a bad config is reported here, not in the log
    running = holder(paths.pid)
    if running is not None:
        raise UsageError(f"a daemon is already running on {paths.base} (pid {running})")
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "gearshift", "daemon", "run", str(paths.base),
             "--background"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise UsageError(f"the daemon exited at start (code {child.returncode}):\n"
                             f"{_tail(paths.log)}")
        if read_pid(paths.pid) == child.pid:  # written once the lock is held
            print(f"daemon started on {paths.base}: pid {child.pid}")
            return 0
        time.sleep(0.1)
    child.kill()
    raise UsageError(f"the daemon did not come up within {args.timeout:g}s; see {paths.log}")


def stop(args: argparse.Namespace) -> int:
    from gearshift.daemon import DaemonPaths, request_stop
    from gearshift.daemon.lock import holder

    paths = DaemonPaths(args.base)
    paths.require()
    pid = holder(paths.pid)
    if pid is None:
        print(f"no daemon is running on {paths.base}")
        return 0
    if args.now:
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
        _wait_released(paths, 30.0)
        _mark_stopped(paths)
        print(f"daemon {pid} killed; the file in processing/ resumes from its newest "
              "checkpoint at the next start")
        return 0
    request_stop(paths.stop_file, pid)
    print(f"asked daemon {pid} to stop (finishing the step, checkpointing)…", flush=True)
    if not _wait_released(paths, args.timeout):
        raise UsageError(f"daemon {pid} has not stopped within {args.timeout:g}s; wait longer "
                         f"or use `gearshift daemon stop {paths.base} --now`")
    print("stopped")
    return 0


def status(args: argparse.Namespace) -> int:
    from gearshift.daemon import DaemonPaths, list_snapshots, read_status
    from gearshift.daemon.lock import holder
    from gearshift.daemon.snapshots import current_snapshot
    from gearshift.daemon.status import describe

    paths = DaemonPaths(args.base)
    paths.require()
    found = read_status(paths.status)
    if args.json:
        if found is None:
            raise UsageError(f"no status yet in {paths.status}: the daemon has never run")
        print(paths.status.read_text(encoding="utf-8"), end="")  # as it is
        return 0
    alive = holder(paths.pid) is not None
    if found is None:
        print(f"the daemon has never run on {paths.base}; start it with `gearshift daemon "
              f"start {paths.base}`")
    else:
        print(describe(found, alive=alive))
    current = current_snapshot(paths)
    names = [s.name + (" (current)" if current is not None and s.name == current.name else "")
             for s in list_snapshots(paths)]
    print(f"snapshots:      {', '.join(names) or 'none'}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    from gearshift.daemon import DaemonPaths
    from gearshift.daemon import rollback as roll_back
    from gearshift.daemon.lock import held_unless_running

    paths = DaemonPaths(args.base)
    paths.require()
    with held_unless_running(paths.pid) as pid:  # no daemon can start during the switch
        if pid is not None:
            raise UsageError(f"the daemon is running (pid {pid}); stop it first with "
                             f"`gearshift daemon stop {paths.base}`")
        snap = roll_back(paths, args.snapshot)
    print(f"current model is now snapshot {snap.name} (verified); files in processing/ "
          "keep the model they started from")
    return 0


def _wait_released(paths: object, timeout: float) -> bool:
    from gearshift.daemon.lock import holder

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holder(paths.pid) is None:  # type: ignore[attr-defined]
            return True
        time.sleep(0.2)
    return False


def _mark_stopped(paths: object) -> None:
    from gearshift.daemon.layout import write_json_atomic
    from gearshift.daemon.status import now_iso, read_status

    found = read_status(paths.status)  # type: ignore[attr-defined]
    if found is not None:
        found.update(state="stopped", updated_at=now_iso())
        write_json_atomic(paths.status, found)  # type: ignore[attr-defined]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


ACTIONS = {"init": init, "run": serve, "start": start, "stop": stop, "status": status,
           "rollback": rollback}
