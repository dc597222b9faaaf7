"""The patch registry (``safe_gthread._patch``): every patch of gunicorn goes through it.

In-process, on throwaway classes and modules, so that nothing here touches gunicorn;
the guard's own wrappers are checked at the end for what the registry promises its
callers (every argument passes through).
"""
import functools
import types
from unittest import mock

import pytest

from safe_gthread import _patch, guard

KEY = "tests.test_patch"


def _calls():
    calls = []

    def impl(original, *args, **kwargs):
        calls.append((args, kwargs))
        return ("ours", original(*args, **kwargs))
    return calls, impl


class Base(object):
    def greet(self, name, punctuation="!"):
        return "hello %s%s" % (name, punctuation)

    @staticmethod
    def static(value):
        return value * 2

    @classmethod
    def klass(cls, value):
        return (cls.__name__, value)


class Child(Base):
    pass


@pytest.fixture
def module():
    namespace = types.ModuleType("fake_gunicorn_sock")

    def close_sockets(listeners, unlink=True):
        return ("closed", listeners, unlink)

    namespace.close_sockets = close_sockets
    yield namespace
    _patch.unwrap(namespace, "close_sockets", KEY)


@pytest.fixture
def klass():
    """A fresh subclass per test, with an own method and an inherited one."""
    class Target(Base):
        def run(self, *args, **kwargs):
            return ("run", args, kwargs)
    yield Target
    for name in ("run", "greet", "static", "klass"):
        _patch.unwrap(Target, name, KEY)


# -- install -------------------------------------------------------------------------------

def test_install_once_and_idempotent(module):
    calls, impl = _calls()
    original = module.close_sockets
    assert _patch.wrap(module, "close_sockets", impl, key=KEY) is True
    wrapper = module.close_sockets
    assert wrapper is not original
    assert _patch.wrap(module, "close_sockets", impl, key=KEY) is False
    assert module.close_sockets is wrapper  # not wrapped twice
    assert module.close_sockets(["l"]) == ("ours", ("closed", ["l"], True))
    assert len(calls) == 1
    assert _patch.is_wrapped(module, "close_sockets", KEY)
    assert _patch.original(module, "close_sockets", KEY) is original


def test_wrapper_carries_wrapped_and_the_original_name(module):
    original = module.close_sockets
    _patch.wrap(module, "close_sockets", _calls()[1], key=KEY)
    assert module.close_sockets.__wrapped__ is original
    assert module.close_sockets.__name__ == "close_sockets"
    assert module.close_sockets._safe_gthread_layer.key == KEY


def test_two_keys_stack_and_unwrap_independently(module):
    original = module.close_sockets
    _patch.wrap(module, "close_sockets", lambda o, *a, **k: ("a",) + (o(*a, **k),), key=KEY)
    other = KEY + ".other"
    try:
        assert _patch.wrap(module, "close_sockets",
                           lambda o, *a, **k: ("b",) + (o(*a, **k),), key=other)
        assert module.close_sockets([]) == ("b", ("a", ("closed", [], True)))
        assert _patch.unwrap(module, "close_sockets", KEY) is True
        # "b" is outermost: "a" stays in its chain as a pass-through.
        assert module.close_sockets([]) == ("b", ("closed", [], True))
    finally:
        _patch.unwrap(module, "close_sockets", other)
    assert module.close_sockets([]) == ("closed", [], True)
    assert module.close_sockets.__wrapped__ is original  # the "a" pass-through is still there


# -- arguments pass through ----------------------------------------------------------------

def test_a_keyword_argument_added_upstream_reaches_the_original(klass):
    calls, impl = _calls()
    _patch.wrap(klass, "run", impl, key=KEY)
    # gunicorn 28 adds ``deadline=``: neither the wrapper nor impl knows it.
    assert klass().run(1, deadline=5) == ("ours", ("run", (1,), {"deadline": 5}))
    assert calls[0][1] == {"deadline": 5}


def test_an_impl_that_names_only_what_it_uses_passes_the_rest(module):
    seen = []

    def impl(original, listeners, *args, **kwargs):
        seen.append(listeners)
        return original(listeners, *args, **kwargs)

    def close_sockets(listeners, unlink=True, linger=0):  # a newer signature
        return (listeners, unlink, linger)

    module.close_sockets = close_sockets
    _patch.wrap(module, "close_sockets", impl, key=KEY)
    assert module.close_sockets([], False, linger=3) == ([], False, 3)
    assert seen == [[]]


def test_methods_bind_as_before(klass):
    assert _patch.wrap(klass, "static", lambda original, value: original(value) + 1, key=KEY)
    assert _patch.wrap(klass, "klass", lambda original, cls, value: original(cls, value),
                       key=KEY)
    assert klass.static(2) == 5 and klass().static(2) == 5
    assert klass.klass(1) == ("Target", 1) and klass().klass(1) == ("Target", 1)
    _patch.unwrap(klass, "static", KEY)
    _patch.unwrap(klass, "klass", KEY)
    assert "static" not in vars(klass) and "klass" not in vars(klass)
    assert klass.static(2) == 4


# -- uninstall: only our layer -------------------------------------------------------------

def test_unwrap_restores_the_original_when_ours_is_outermost(module):
    original = module.close_sockets
    _patch.wrap(module, "close_sockets", _calls()[1], key=KEY)
    assert _patch.unwrap(module, "close_sockets", KEY) is True
    assert module.close_sockets is original
    assert not _patch.is_wrapped(module, "close_sockets", KEY)
    assert _patch.unwrap(module, "close_sockets", KEY) is False


def test_unwrap_keeps_someone_who_patched_after_us(module):
    calls, impl = _calls()
    _patch.wrap(module, "close_sockets", impl, key=KEY)
    ours = module.close_sockets
    theirs_seen = []

    def theirs(listeners, unlink=True):  # e.g. an APM agent, patched after us
        theirs_seen.append(listeners)
        return ours(listeners, unlink)

    module.close_sockets = theirs
    assert _patch.unwrap(module, "close_sockets", KEY) is True
    assert module.close_sockets is theirs  # their patch stays
    assert module.close_sockets(["x"]) == ("closed", ["x"], True)  # we pass through
    assert theirs_seen == [["x"]] and calls == []


def test_an_inherited_target_leaves_no_own_attribute(klass):
    assert "greet" not in vars(klass)
    calls, impl = _calls()
    assert _patch.wrap(klass, "greet", impl, key=KEY) is True
    assert "greet" in vars(klass)
    assert klass().greet("you") == ("ours", "hello you!")
    assert Base().greet("base") == "hello base!"  # the base class is not touched
    assert _patch.unwrap(klass, "greet", KEY) is True
    assert "greet" not in vars(klass)
    assert klass.greet is Base.greet
    assert klass().greet("you", punctuation="?") == "hello you?"


def test_an_inherited_target_patched_on_the_base_later_is_kept(klass):
    _patch.wrap(klass, "greet", _calls()[1], key=KEY)
    saved = Base.greet
    Base.greet = lambda self, name, punctuation="!": "patched base"
    try:
        _patch.unwrap(klass, "greet", KEY)
        assert klass().greet("x") == "patched base"
    finally:
        Base.greet = saved


def test_a_missing_target_returns_false(module, klass):
    assert _patch.wrap(module, "absent", _calls()[1], key=KEY) is False
    assert _patch.wrap(klass, "absent", _calls()[1], key=KEY) is False
    assert not hasattr(module, "absent") and not hasattr(klass, "absent")
    assert not _patch.is_wrapped(module, "absent", KEY)
    assert _patch.unwrap(module, "absent", KEY) is False


def test_a_target_that_is_not_callable_returns_false(module):
    module.SETTING = 3
    assert _patch.wrap(module, "SETTING", _calls()[1], key=KEY) is False
    assert module.SETTING == 3


def test_reinstall_after_uninstall(module):
    calls, impl = _calls()
    original = module.close_sockets
    for _ in range(3):
        assert _patch.wrap(module, "close_sockets", impl, key=KEY) is True
        assert module.close_sockets([])[0] == "ours"
        assert _patch.unwrap(module, "close_sockets", KEY) is True
        assert module.close_sockets is original
    assert len(calls) == 3


# -- the guard's wrappers pass through what they do not use --------------------------------

class _Recorder(object):
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def test_guard_close_sockets_passes_new_arguments_through():
    original = _Recorder()
    guard._close_sockets(original, [], False, "positional", linger=2)
    assert original.calls == [(([], False, "positional"), {"linger": 2})]


def test_guard_reexec_passes_new_arguments_through():
    original = _Recorder()
    arbiter = types.SimpleNamespace(cfg=types.SimpleNamespace(env_orig={}), LISTENERS=[])
    guard._reexec(original, arbiter, "why", graceful=True)
    assert original.calls == [((arbiter, "why"), {"graceful": True})]


def test_guard_bind_passes_new_arguments_through():
    original = _Recorder()
    listener = types.SimpleNamespace(cfg_addr="/nowhere/x.sock")
    sock = types.SimpleNamespace(getsockname=lambda: "/nowhere/x.sock")
    guard._bind(original, listener, sock, backlog=7)
    assert original.calls == [((listener, sock), {"backlog": 7})]


# -- a target whose parameters changed is left alone ---------------------------------------

def test_renamed_parameters_are_not_wrapped(module):
    def close_sockets(socks, unlink=True):  # ``listeners`` renamed upstream
        return socks

    module.close_sockets = close_sockets
    assert _patch.wrap(module, "close_sockets", guard._close_sockets, key=KEY) is False
    assert module.close_sockets is close_sockets
    assert not _patch.is_wrapped(module, "close_sockets", KEY)


def test_a_parameter_added_upstream_is_still_wrapped(module):
    seen = []

    def close_sockets(listeners, unlink=True, linger=0):
        seen.append((listeners, unlink, linger))

    module.close_sockets = close_sockets
    assert _patch.wrap(module, "close_sockets", guard._close_sockets, key=KEY) is True
    module.close_sockets([], linger=4)
    assert seen == [([], False, 4)]  # unlink=False: the guard unlinks what it owns itself


def test_a_wrapper_that_takes_anything_is_wrapped(module):
    def close_sockets(*args, **kwargs):  # someone's wrapper without functools.wraps
        return args

    module.close_sockets = close_sockets
    assert _patch.wrap(module, "close_sockets", guard._close_sockets, key=KEY) is True


# -- in effect: is a call still going through our layer? ------------------------------------

def test_in_effect_follows_what_callers_get(module):
    _, impl = _calls()
    assert not _patch.in_effect(module, "close_sockets", KEY)  # not installed
    _patch.wrap(module, "close_sockets", impl, key=KEY)
    ours = module.close_sockets
    assert _patch.in_effect(module, "close_sockets", KEY)

    @functools.wraps(ours)
    def theirs(*args, **kwargs):  # someone wrapped over us: calls still reach our layer
        return ours(*args, **kwargs)
    module.close_sockets = theirs
    assert _patch.in_effect(module, "close_sockets", KEY)

    # Replaced outright (gunicorn's own tests: mock.patch("gunicorn.sock.create_sockets")):
    # registered still, but no call reaches it.
    with mock.patch.object(module, "close_sockets"):
        assert _patch.is_wrapped(module, "close_sockets", KEY)
        assert not _patch.in_effect(module, "close_sockets", KEY)
    assert _patch.in_effect(module, "close_sockets", KEY)

    module.close_sockets = ours
    _patch.unwrap(module, "close_sockets", KEY)
    assert not _patch.in_effect(module, "close_sockets", KEY)


def test_in_effect_for_a_staticmethod(klass):
    _, impl = _calls()
    _patch.wrap(klass, "static", impl, key=KEY)
    assert _patch.in_effect(klass, "static", KEY)
