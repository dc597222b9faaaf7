"""How safe-gthread wraps a gunicorn callable and contains a fault of its own, and the
per-process state (``Process``). What is wrapped, and in which order the features'
handlers run, is ``_arbiter``'s table; this module is the mechanism, the way wrapt and
OpenTelemetry's instrumentations do it:

* patch where callers look the name up (``gunicorn.sock.close_sockets``, not a copy);
* once: wrapping the same ``(owner, name, key)`` twice does nothing;
* the wrapper is a trampoline that passes every argument through
  (``impl(original, *args, **kwargs)``), so a keyword argument gunicorn adds later
  reaches gunicorn and never becomes a ``TypeError`` in the arbiter;
* it carries ``__wrapped__`` (``functools.wraps``) and is marked as ours;
* :func:`unwrap` removes only our own layer: if ours is still the outermost, the
  original goes back (deleted again when it was inherited from a base class); if
  someone patched over us since, our layer stays in their chain but turns into a plain
  pass-through, so their patch keeps working.

A target that does not exist on this gunicorn, or whose parameters are no longer the
ones the wrapper names (:func:`fits`), is not an error: it is left alone, and the
caller says, once, what it left unpatched.

**No fault of ours stops gunicorn** (design invariant 10). Every handler belongs to a
*feature* (``guard``, ``heal``, ``scheduler``, ``reuse_port``). If it raises an
``Exception`` that gunicorn's own ``original`` did not raise, the feature is off in this
process from then on: one ERROR on ``gunicorn.error`` with the traceback, every handler
of the feature becomes a pass-through, callbacks given to :func:`on_disable` undo what
the feature holds, and the call returns what gunicorn's original would (called now if
the handler had not called it yet). What the original raises (gunicorn's
``HaltServer``, ``SystemExit`` in a forked worker, ``StopIteration``) passes unchanged
and disables nothing, as does a ``BaseException`` of ours (a deliberate
``SystemExit(1)``). Code not behind a wrapper reports the same way with
``with contain(feature):``. The state is per process: a fault in the arbiter leaves its
workers' features on, and the reverse.
"""
import contextlib
import functools
import inspect
import logging
import os
import threading

_lock = threading.RLock()
#: (id(owner), name, key) -> _Layer, in installation order.
_layers = {}


#: feature -> callbacks run once when it is turned off (close what it holds).
_on_disable = {}
#: Test-only: ``<feature>[:<n>]`` makes that feature's n-th contained call (default the
#: first) raise RuntimeError, as a bug of ours would; ``SAFE_GTHREAD_TEST_UNCONTAINED=1``
#: lets it through to gunicorn (the control: what a fault did before containment).
ENV_TEST_FAULT = "SAFE_GTHREAD_TEST_FAULT"
ENV_TEST_UNCONTAINED = "SAFE_GTHREAD_TEST_UNCONTAINED"
_log = logging.getLogger("gunicorn.error")


#: Python 3.6 has no ``os.register_at_fork``: there a changed pid tells a forked child.
#: Elsewhere the fork handler resets the state, and no call of ours asks for the pid
#: (gunicorn's own tests count its ``os.getpid`` calls around ``reexec``).
_PID_CHECK = not hasattr(os, "register_at_fork")


class Process(object):
    """Everything safe-gthread holds in one process, made on first use there and afresh
    in every child forked from it (gunicorn forks workers without exec): nothing of the
    arbiter's lives on in a worker by accident. ``parent`` is the forking process's
    object as it was at the fork: a worker reads what the arbiter prepared for it there
    (its reuse_port slot, its siblings' heartbeat files) and nothing else.

    The attributes are each owned by one module, named beside it."""

    def __init__(self, parent=None):
        self.pid = os.getpid() if _PID_CHECK else None
        self.parent = parent
        # _patch: the features a fault turned off here, the test fault hook.
        self.off = set()
        fault = os.environ.get(ENV_TEST_FAULT, "")
        name, _, nth = fault.partition(":")
        self.fault = (name, int(nth or 1)) if name else None
        self.calls = 0
        # guard: the _heal.Healer of every path this arbiter owns, its inotify
        # _heal.Watcher, and how many times it reloaded (HUP).
        self.healers = []
        self.watcher = None
        self.reloads = 0
        # _boot: the reload count of the last setup of the worker class here.
        self.setup_for = None
        # _schedule: the arbiter's _Scheduler; in a worker, what it last wrote to its
        # heartbeat file ([ready, want, reason, eta]); during a spawn, the heartbeat
        # files of the siblings (the child closes them on gunicorn < 19.9).
        self.scheduler = None
        self.message = None
        self.siblings = None
        # _reuseport: the arbiter's slots, the one a spawn in progress gives its child,
        # and whether the boot line was said.
        self.slots = []
        self.pending_slot = None
        self.announced = False
        # _mold: the arbiter's Molds, while the mold is on.
        self.molds = None


_process = [None]


class Once(object):
    """Log each line once per key: the one say-once of every module."""

    def __init__(self):
        self.keys = set()

    def say(self, log, key, msg, *args, level="warning"):
        if key not in self.keys:
            self.keys.add(key)
            getattr(log, level)(msg, *args)


def here():
    """This process's ``Process``."""
    process = _process[0]
    if process is None:
        process = _process[0] = Process()
    elif _PID_CHECK and process.pid != os.getpid():
        _run_after_fork()
        process = _process[0]
    return process


def feature_disabled(feature):
    """True once a fault turned ``feature`` off in this process."""
    return feature in here().off


def on_disable(feature, callback):
    """Call ``callback()`` when a fault turns ``feature`` off (registered once per
    callback): it closes what the feature holds, so gunicorn goes on as with stock."""
    callbacks = _on_disable.setdefault(feature, [])
    if callback not in callbacks:
        callbacks.append(callback)


def disable(feature, log=None):
    """Turn ``feature`` off in this process; call it in an ``except`` block: the ERROR
    carries that exception's traceback. Only the first fault of a feature is logged."""
    process = here()
    if feature in process.off:
        return
    process.off.add(feature)
    (log or _log).error("safe-gthread: %s failed and is off for this arbiter; gunicorn "
                        "goes on as with the stock worker.", feature, exc_info=True)
    for callback in _on_disable.get(feature, ()):
        try:
            callback()
        except Exception:  # a cleanup that fails leaves only what stock would have
            (log or _log).warning("safe-gthread: cleaning up after %s failed.", feature,
                                  exc_info=True)


def _inject(feature):
    process = here()
    if process.fault is not None and process.fault[0] == feature:
        process.calls += 1
        if process.calls == process.fault[1]:
            raise RuntimeError("safe-gthread test fault in %s (%s)" % (feature, ENV_TEST_FAULT))


@contextlib.contextmanager
def contain(feature, log=None, original=None):
    """``with contain("heal"):`` code of ours outside a wrapper (a tick, a handler):
    an Exception in it turns ``feature`` off (see :func:`disable`) instead of reaching
    gunicorn. BaseExceptions (SystemExit, KeyboardInterrupt) pass, and so does what the
    ``_Original`` given as ``original`` raised: gunicorn's own."""
    try:
        yield
    except Exception as exc:
        if exc is getattr(original, "raised", None) or os.environ.get(ENV_TEST_UNCONTAINED) == "1":
            raise
        disable(feature, log)


_after_fork = []


def _run_after_fork():
    parent = _process[0]
    _process[0] = Process(parent)
    for callback in list(_after_fork):
        try:
            callback(parent)
        except Exception:  # a fork must go on whatever a cleanup does
            pass


if not _PID_CHECK:
    os.register_at_fork(after_in_child=_run_after_fork)


def after_fork_in_child(callback):
    """Call ``callback(parent)`` in every child forked from this process from now on,
    ``parent`` the forking process's ``Process`` (or None): close what the arbiter held
    and a child must not (gunicorn forks without exec, so close-on-exec does not keep
    it out of workers)."""
    if callback not in _after_fork:
        _after_fork.append(callback)


def forked():
    """Python 3.6 has no ``os.register_at_fork``: a worker calls this right after fork."""
    if _PID_CHECK and (_process[0] is None or _process[0].pid != os.getpid()):
        _run_after_fork()


class _Original(object):
    """The ``original`` an impl is given: it notes the exception gunicorn raised (so it
    passes untouched) and the result it returned (to give back after a later fault)."""

    __slots__ = ("function", "called", "result", "raised")

    def __init__(self, function):
        self.function = function
        self.called = False
        self.result = None
        self.raised = None

    def __call__(self, *args, **kwargs):
        self.called = True
        try:
            self.result = self.function(*args, **kwargs)
        except BaseException as exc:
            self.raised = exc
            raise
        return self.result


def _contained(feature, impl, function, args, kwargs):
    original = _Original(function)
    with contain(feature, original=original):
        _inject(feature)
        return impl(original, *args, **kwargs)
    # A fault: what gunicorn's own would have returned.
    return original.result if original.called else function(*args, **kwargs)


def link(feature, impl, function, contained=True):
    """``function`` with ``impl`` in front of it (``impl(function, *args, **kwargs)``),
    contained as ``feature`` unless ``contained`` is False: one link of a chain."""
    if not contained:
        return lambda *args, **kwargs: impl(function, *args, **kwargs)

    def call(*args, **kwargs):
        if feature in here().off:  # turned off earlier in this very call
            return function(*args, **kwargs)
        return _contained(feature, impl, function, args, kwargs)
    return call


class _Layer(object):
    __slots__ = ("owner", "name", "key", "original", "wrapper", "inherited", "active",
                 "feature")

    def __init__(self, owner, name, key, original, inherited, feature):
        self.owner = owner
        self.name = name
        self.key = key
        self.original = original
        self.inherited = inherited
        self.feature = feature
        self.wrapper = None
        self.active = True


def _raw(owner, name):
    """``owner.name`` as stored (no descriptor binding), looked up along the MRO for
    classes; ``(value, inherited)`` or ``(None, False)`` when it does not exist."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name], klass is not owner
        return None, False
    value = vars(owner).get(name)
    return value, False


_NAMED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _fits(impl, function, method=False):
    """Can ``impl`` stand in front of ``function``? Every parameter ``impl`` names after
    ``original`` must be ``function``'s, at the same position: a gunicorn that renamed or
    reordered them is left alone (and named in a WARNING by the caller), rather than
    handed arguments it would misread. What ``impl`` takes as ``*args``/``**kwargs``
    passes through unchecked; a signature that cannot be read is trusted. For a method
    (``method``) the first parameter is the instance, whatever either side calls it."""
    try:
        wanted = list(inspect.signature(impl).parameters.values())[1:]
        present = list(inspect.signature(function).parameters.values())
    except Exception:
        return True
    positional = [p.name for p in present if p.kind in _NAMED]
    by_name = dict((p.name, p) for p in present)
    open_ended = any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                     for p in present)
    for index, parameter in enumerate(p for p in wanted if p.kind in _NAMED):
        if index < len(positional):
            if positional[index] != parameter.name and not (method and index == 0):
                return False
        elif not open_ended:
            return False
    for parameter in wanted:
        if parameter.kind == inspect.Parameter.KEYWORD_ONLY:
            if parameter.name not in by_name and not open_ended:
                return False
    return True


def _unbound(owner, original):
    """(the function stored as ``original``, its descriptor type or None, whether it is
    called as a method): a staticmethod or classmethod is wrapped inside the same kind
    of descriptor, so it binds as before (neither is callable as stored before 3.10)."""
    descriptor = type(original) if isinstance(original, (staticmethod, classmethod)) else None
    function = original.__func__ if descriptor is not None else original
    return function, descriptor, isinstance(owner, type) and descriptor is not staticmethod


def fits(owner, name, impl, key="safe_gthread"):
    """Can ``impl`` stand in front of ``owner.name`` (what it was before our layer
    ``key``)? False when it does not exist or is not callable (see ``_fits``)."""
    function, _, method = _unbound(owner, original(owner, name, key))
    return function is not None and callable(function) and _fits(impl, function, method)


def wrap(owner, name, impl, key="safe_gthread", feature=None):
    """Replace ``owner.name`` with a wrapper calling ``impl(original, *args, **kwargs)``.

    ``owner`` is a class or a module. ``feature``: what a fault in ``impl`` turns off;
    None: not contained (a fault propagates). Returns True when this call installed
    the layer, False when it was already there, ``owner`` has no callable ``name``, or
    its parameters are not the ones ``impl`` names (see ``_fits``).
    """
    with _lock:
        ident = (id(owner), name, key)
        if ident in _layers:
            return False
        original, inherited = _raw(owner, name)
        function, descriptor, method = _unbound(owner, original)
        if function is None or not callable(function) or not _fits(impl, function, method):
            return False
        layer = _Layer(owner, name, key, original, inherited, feature)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not layer.active:
                return function(*args, **kwargs)
            if feature is None:
                return impl(function, *args, **kwargs)
            if feature in here().off:
                return function(*args, **kwargs)
            return _contained(feature, impl, function, args, kwargs)

        wrapper._safe_gthread_layer = layer
        layer.wrapper = wrapper if descriptor is None else descriptor(wrapper)
        setattr(owner, name, layer.wrapper)
        _layers[ident] = layer
        return True


def unwrap(owner, name, key="safe_gthread"):
    """Remove our layer ``key`` from ``owner.name``; False if it was not installed."""
    with _lock:
        layer = _layers.pop((id(owner), name, key), None)
        if layer is None:
            return False
        layer.active = False
        current, _ = _raw(owner, name)
        if current is layer.wrapper:
            if layer.inherited:
                delattr(owner, name)
            else:
                setattr(owner, name, layer.original)
        # else: someone wrapped over us; we stay in their chain as a pass-through.
        return True


def is_wrapped(owner, name, key="safe_gthread"):
    """True while our layer ``key`` is installed on ``owner.name``."""
    return (id(owner), name, key) in _layers


def in_effect(owner, name, key="safe_gthread"):
    """True while a call to ``owner.name`` goes through our layer ``key``: the layer is
    installed and ``owner.name`` is its wrapper or wraps it (``__wrapped__``). False once
    something replaced it outright (a test's mock, a plain assignment by other code)."""
    layer = _layers.get((id(owner), name, key))
    if layer is None or not layer.active or (layer.feature and feature_disabled(layer.feature)):
        return False
    current = _raw(owner, name)[0]
    for _ in range(32):  # a chain of wrappers is short; a cycle must not hang the arbiter
        if current is None:
            return False
        if current is layer.wrapper:
            return True
        current = getattr(getattr(current, "__func__", current), "__wrapped__", None)
    return False


def original(owner, name, key="safe_gthread"):
    """What ``owner.name`` was before our layer ``key`` (or the current value), as stored
    (a staticmethod or classmethod object for those)."""
    layer = _layers.get((id(owner), name, key))
    if layer is not None:
        return layer.original
    return _raw(owner, name)[0]
