"""The arbiter extension: every gunicorn callable safe-gthread touches, each wrapped once,
and the features' handlers for it, in the order they run.

A feature is a set of handlers, ``handler(original, *args, **kwargs)``, each standing in
front of the next one in its row and finally of gunicorn's own callable:

* ``guard``: binding and closing unix sockets, USR2's hand-over (``guard``);
* ``heal``: the arbiter's check of its socket paths, in its loop and its wait (``guard``,
  ``_heal``);
* ``scheduler``: successors booted before retirements, deploys (``_schedule``,
  ``_deploy``);
* ``reuse_port``: one listener per worker slot, kept by the arbiter (``_reuseport``);
* ``mold``: workers forked from a warm per-generation template (``_mold``; opt-in).

Each handler call is contained (``_patch.contain``): an exception of ours turns that
feature off in this process, with one ERROR and its traceback, and the call goes on as
gunicorn's own would; the other features keep working. ``install`` turns features on
(idempotent) and ``uninstall`` off; a row is wrapped while one of its features is on.
``scheduler``, ``reuse_port`` and ``mold`` are all or nothing: without every one of their targets
they would do harm, so a gunicorn missing one keeps its own behaviour, named in one
WARNING. ``guard`` and ``heal`` leave only what they do not recognise.
"""
import threading

from gunicorn import arbiter as gunicorn_arbiter
from gunicorn import sock as gunicorn_sock

from . import _compat, _mold, _patch, _reuseport, _schedule, guard

#: Features whose targets must all be there, and how the WARNING names them.
ALL_OR_NOTHING = {"scheduler": "safe_gthread's retirement scheduler",
                  "reuse_port": "the reuse_port listener slots", "mold": "the mold"}
#: The handler of gunicorn 19.6.0's ``UnixSocket.close`` runs uncontained: a pass-through
#: to gunicorn's own would unlink the socket in every restarting worker (the bug itself).
UNCONTAINED = "uncontained"

_lock = threading.RLock()
_enabled = set()

# What a fault's turning a feature off must close, and what a forked child must not keep.
_patch.on_disable("heal", guard._release_all)
_patch.on_disable("reuse_port", _reuseport._close_slots)
_patch.on_disable("scheduler", _schedule.forget)
_patch.on_disable("mold", _mold._on_disable)
_patch.after_fork_in_child(_mold._after_fork)
_patch.after_fork_in_child(guard._after_fork)
_patch.after_fork_in_child(_reuseport._after_fork)


def table():
    """``[(owner, name, [(feature, handler[, UNCONTAINED]), ...])]`` on this gunicorn;
    in each row the first handler is the outermost (it runs first)."""
    Arbiter, UnixSocket = gunicorn_arbiter.Arbiter, gunicorn_sock.UnixSocket
    rows = [(UnixSocket, "__init__", [("guard", guard._init)]),
            (UnixSocket, "bind", [("guard", guard._bind)])]
    if _compat.UNIX_CLOSE_UNLINKS:
        rows.append((UnixSocket, "close", [("guard", guard._close, UNCONTAINED)]))
    if _compat.HAS_CLOSE_SOCKETS or not _compat.UNIX_CLOSE_UNLINKS:  # neither: warned
        rows.append((gunicorn_sock, "close_sockets", [("guard", guard._close_sockets)]))
    if _compat.REUSE_PORT_BINDS_IN_WORKERS:
        # Listed whether or not it takes fds: a gunicorn whose create_sockets does not
        # is named in reuse_port's WARNING (``install``).
        rows.append((gunicorn_sock, "create_sockets",
                     [("reuse_port", _reuseport._create_sockets)]))
    rows += [
        (Arbiter, "reexec", [("guard", guard._reexec)]),
        # A HUP: the scheduler keeps the running configuration when the new one fails to
        # load; inside it, the guard forgets the old configure() settings.
        (Arbiter, "reload", [("scheduler", _schedule._reload), ("guard", guard._reload)]),
        # Every turn of the loop: close the slots a TTOU or a new bind left; retire and
        # deploy; start or check the generation's mold; check the socket paths last,
        # right before gunicorn's own.
        (Arbiter, "manage_workers", [("reuse_port", _reuseport._manage_workers),
                                     ("scheduler", _schedule._manage_workers),
                                     ("mold", _mold._manage_workers),
                                     ("heal", guard._manage_workers)]),
        # The slot is chosen with the scheduler's hints, then the scheduler forks with the
        # real WORKERS, through the mold when it is on (innermost: it swaps the fork).
        (Arbiter, "spawn_worker", [("reuse_port", _reuseport._spawn_worker),
                                   ("scheduler", _schedule._spawn_worker),
                                   ("mold", _mold._spawn_worker)]),
        # gunicorn < 26 must see only its own children (the arbiter is a subreaper).
        (Arbiter, "reap_workers", [("mold", _mold._reap_workers)]),
        (Arbiter, "handle_usr1", [("mold", _mold._handle_usr1)]),
        (Arbiter, "stop", [("mold", _mold._stop), ("heal", guard._stop)]),
    ]
    if _compat.ARBITER_WAIT == "wait_for_signals":
        rows.append((Arbiter, "wait_for_signals", [("heal", guard._wait_for_signals)]))
    else:  # "sleep"; neither: named in the WARNING
        rows.append((Arbiter, "sleep", [("heal", guard._sleep)]))
    return rows


def _shown(owner, name):
    return "%s.%s" % (getattr(owner, "__name__", owner), name)


def _fits(owner, name, handler):
    if owner is gunicorn_sock and name == "create_sockets" and not _compat.CREATE_SOCKETS_TAKES_FDS:
        return False  # the slots hand each worker its listeners through ``fds``
    return _patch.fits(owner, name, handler)


def _dispatcher(handlers):
    """The one wrapper of a row: the chain of its handlers whose feature is on."""
    def dispatch(original, *args, **kwargs):
        call = original
        for feature, handler, *flags in reversed(handlers):
            if feature not in _enabled:
                continue
            if UNCONTAINED in flags:  # runs even after a fault in its feature
                call = _patch.link(feature, handler, call, contained=False)
            elif not _patch.feature_disabled(feature):
                call = _patch.link(feature, handler, call)
        return call(*args, **kwargs)
    return dispatch


def install(features, log=None):
    """Turn ``features`` on in this process (idempotent): wrap every row one of them is
    in, once. Returns the features this call turned on."""
    turned_on, unrecognised = [], {}
    with _lock:
        rows = table()
        for feature in features:
            if feature in _enabled:
                continue
            missing = [_shown(owner, name) for owner, name, handlers in rows
                       for entry in handlers
                       if entry[0] == feature and not _fits(owner, name, entry[1])]
            what = ALL_OR_NOTHING.get(feature, "the socket guard")
            if missing:
                unrecognised.setdefault(what, []).extend(missing)
            if missing and feature in ALL_OR_NOTHING:
                continue
            _enabled.add(feature)
            turned_on.append(feature)
        for owner, name, handlers in rows:
            fit = [entry for entry in handlers if _fits(owner, name, entry[1])]
            if any(entry[0] in _enabled for entry in fit):
                _patch.wrap(owner, name, _dispatcher(fit))
    for what, missing in unrecognised.items():
        _compat.warn_unrecognised(what, missing, log)
    return turned_on


def uninstall(features):
    """Turn ``features`` off; unwrap the rows no feature is on for. True if one was on."""
    with _lock:
        was_on = bool(_enabled.intersection(features))
        _enabled.difference_update(features)
        for owner, name, handlers in table():
            if not any(entry[0] in _enabled for entry in handlers):
                _patch.unwrap(owner, name)
        return was_on


def enabled(feature):
    """True while ``feature`` is installed and no fault turned it off in this process."""
    return feature in _enabled and not _patch.feature_disabled(feature)


def wrapped(*features):
    """``(owner, name)`` of every callable wrapped for one of ``features`` in effect."""
    return [(owner, name) for owner, name, handlers in table()
            if _patch.is_wrapped(owner, name) and any(
                entry[0] in features and entry[0] in _enabled and _fits(owner, name, entry[1])
                for entry in handlers)]


def in_effect(owner, name, feature):
    """True while a call to ``owner.name`` runs ``feature``'s handler: on, and our
    wrapper still in front (not replaced by a test's mock or other code)."""
    return enabled(feature) and _patch.in_effect(owner, name)
