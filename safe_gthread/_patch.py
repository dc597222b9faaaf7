"""The one way safe-gthread patches gunicorn: a registry of wrappers.

Every patch of ours (the guard's socket wrappers, the arbiter's scheduler, the healing
path) goes through :func:`wrap`, the way wrapt and OpenTelemetry's instrumentations do it:

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
ones the wrapper names, is not an error: :func:`wrap` returns False and the caller
says, once, what it left unpatched.
"""
import functools
import inspect
import threading

_lock = threading.RLock()
#: (id(owner), name, key) -> _Layer, in installation order.
_layers = {}


class _Layer(object):
    __slots__ = ("owner", "name", "key", "original", "wrapper", "inherited", "active")

    def __init__(self, owner, name, key, original, inherited):
        self.owner = owner
        self.name = name
        self.key = key
        self.original = original
        self.inherited = inherited
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


def wrap(owner, name, impl, key="safe_gthread"):
    """Replace ``owner.name`` with a wrapper calling ``impl(original, *args, **kwargs)``.

    ``owner`` is a class or a module. Returns True when this call installed the layer,
    False when it was already there, ``owner`` has no callable ``name``, or its
    parameters are not the ones ``impl`` names (see ``_fits``).
    """
    with _lock:
        ident = (id(owner), name, key)
        if ident in _layers:
            return False
        original, inherited = _raw(owner, name)
        # A staticmethod or classmethod is wrapped inside the same kind of descriptor,
        # so it binds as before (neither object is callable as stored before 3.10).
        descriptor = type(original) if isinstance(original, (staticmethod, classmethod)) else None
        function = original.__func__ if descriptor is not None else original
        method = isinstance(owner, type) and descriptor is not staticmethod
        if function is None or not callable(function) or not _fits(impl, function, method):
            return False
        layer = _Layer(owner, name, key, original, inherited)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if layer.active:
                return impl(function, *args, **kwargs)
            return function(*args, **kwargs)

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
    if layer is None or not layer.active:
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
