"""The training daemon: keep fine-tuning as data files arrive, lose nothing, survive anything.

Files dropped into ``BASE_DIR/inbox`` are taken oldest first, trained one at a time as normal
runs starting from ``current_model``, snapshotted (verified), made the current model, and moved
to ``done/`` with their result; bad files go to ``failed/`` with the reason. See
:mod:`gearshift.daemon.service` for the exactly-once rule.

Example:
    >>> from gearshift.daemon import Daemon, init_daemon
    >>> init_daemon("svc")  # doctest: +SKIP
    >>> Daemon("svc", drain=True).run()  # doctest: +SKIP
    0
"""

from gearshift.daemon.layout import DaemonPaths
from gearshift.daemon.lock import request_stop
from gearshift.daemon.service import Daemon
from gearshift.daemon.setup import DEFAULT_CONFIG, init_daemon, load_daemon_config
from gearshift.daemon.snapshots import list_snapshots, rollback, verify_snapshot
from gearshift.daemon.status import read_status

__all__ = ["DEFAULT_CONFIG", "Daemon", "DaemonPaths", "init_daemon", "list_snapshots",
           "load_daemon_config", "read_status", "request_stop", "rollback", "verify_snapshot"]
