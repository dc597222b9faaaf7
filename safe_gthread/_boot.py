"""What the arbiter does when gunicorn loads ``safe_gthread.Worker``: check our settings,
install the guard, the scheduler and the reuse_port slots, say what is active. Once per
configuration load in this process.

gunicorn calls the worker class's ``setup()`` on every ``cfg.worker_class`` access: at
boot, on each HUP, and from gunicorn >= 25's control socket thread (``show workers``).
Repeating it logged the settings line once per access and took the installers' locks
from that thread. :func:`setup_once` does the work on the first call after a start or a
HUP (``guard`` counts reloads) and returns at once, without a lock, afterwards.
"""
import threading

from . import _compat, _mold, _patch, _reuseport, _schedule, _settings, guard
from ._version import __version__

_lock = threading.Lock()
_announced = []


def setup_once(log):
    """``safe_gthread.Worker.setup``'s work; True when this call did it. A bad setting:
    one line and exit 1 (``_settings.fail``)."""
    process = _patch.here()
    if process.setup_for == process.reloads:
        return False
    with _lock:
        if process.setup_for == process.reloads:
            return False
        try:
            settings = _settings.current()
        except _settings.SettingsError as exc:
            _settings.fail(str(exc), log)
        guard.install(log)
        if settings.mold:
            _mold.install(log, first=guard.reloads() == 0)
        _schedule.install()
        _reuseport.install()
        if _compat.GTHREAD_GENERATION is None:
            _compat.warn_unrecognised("safe_gthread.Worker's retirement",
                                      ["gthread.ThreadWorker's stop path"], log)
        if not _announced:
            _announced.append(True)
            log.info("safe-gthread %s on gunicorn %s (Python %s): %s.", __version__,
                     _compat.GUNICORN_VERSION, _compat.PYTHON_VERSION,
                     "; ".join(_compat.protections()))
        log.info("safe-gthread settings: %s; successors boot ahead of retirements: %s.",
                 settings.describe(), "yes" if _schedule.installed() else "no")
        process.setup_for = process.reloads
        return True
