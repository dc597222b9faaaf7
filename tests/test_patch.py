"""The patch registry (``safe_gthread._patch``): every patch of gunicorn goes through it.

In-process, on throwaway classes and modules, so that nothing here touches gunicorn;
the guard's own wrappers are checked at the end for what the registry promises its
callers (every argument passes through).
"""
import functools
import logging
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


# -- fault containment (design invariant 10) ------------------------------------------------

class Halt(BaseException):
    """Like gunicorn's HaltServer: a BaseException the original raises on purpose."""


@pytest.fixture
def contained(monkeypatch, caplog):
    """A clean per-process fault state, and the ERROR records of ``gunicorn.error``."""
    monkeypatch.setattr(_patch, "_process", [None])
    monkeypatch.setattr(_patch, "_on_disable", {})
    monkeypatch.delenv(_patch.ENV_TEST_FAULT, raising=False)
    monkeypatch.delenv(_patch.ENV_TEST_UNCONTAINED, raising=False)
    caplog.set_level(logging.ERROR, logger="gunicorn.error")
    return lambda: [r for r in caplog.records if r.levelno >= logging.ERROR]


def _broken(when):
    calls = []

    def impl(original, *args, **kwargs):
        calls.append(args)
        if when == "after":
            original(*args, **kwargs)
        raise ValueError("a bug of ours")
    return calls, impl


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_fault_turns_the_feature_off_and_gunicorn_goes_on(module, klass, contained, when):
    originals = []
    module.close_sockets = lambda listeners, unlink=True: originals.append(1) or "stock"
    calls, impl = _broken(when)
    assert _patch.wrap(module, "close_sockets", impl, KEY, feature="demo")
    # A second layer of the same feature, elsewhere: off with the first.
    other_calls, other = _calls()
    assert _patch.wrap(klass, "run", other, KEY, feature="demo")
    assert module.close_sockets([]) == "stock"  # gunicorn's own result
    assert originals == [1]  # called once: by the impl, or (before) in its place
    errors = contained()
    assert len(errors) == 1 and "demo failed and is off" in errors[0].getMessage()
    assert isinstance(errors[0].exc_info[1], ValueError)  # with the traceback
    assert _patch.feature_disabled("demo") and not _patch.feature_disabled("other")
    assert module.close_sockets([]) == "stock" and len(calls) == 1  # a pass-through now
    assert klass().run(1) == ("run", (1,), {}) and other_calls == []
    assert not _patch.in_effect(module, "close_sockets", KEY)
    assert len(contained()) == 1
    _patch.unwrap(klass, "run", KEY)


@pytest.mark.parametrize("raised", [StopIteration(), KeyError("gunicorn's"), Halt(),
                                    SystemExit(0), KeyboardInterrupt()])
def test_what_gunicorn_raises_passes_unchanged(module, contained, raised):
    def close_sockets(listeners, unlink=True):
        raise raised
    module.close_sockets = close_sockets
    _, impl = _calls()
    assert _patch.wrap(module, "close_sockets", impl, KEY, feature="demo")
    with pytest.raises(type(raised)) as info:
        module.close_sockets([])
    assert info.value is raised
    assert not _patch.feature_disabled("demo") and contained() == []


def test_gunicorns_exception_passes_through_every_layer(module, contained):
    def close_sockets(listeners, unlink=True):
        raise Halt()
    module.close_sockets = close_sockets
    for key, feature in (("inner", "a"), ("outer", "b")):
        assert _patch.wrap(module, "close_sockets", _calls()[1], key, feature=feature)
    try:
        with pytest.raises(Halt):
            module.close_sockets([])
        assert not _patch.feature_disabled("a") and not _patch.feature_disabled("b")
    finally:
        for key in ("outer", "inner"):
            _patch.unwrap(module, "close_sockets", key)


def test_an_inner_fault_is_contained_where_it_happened(module, contained):
    _, broken = _broken("before")
    outer_calls, outer = _calls()
    assert _patch.wrap(module, "close_sockets", broken, "inner", feature="a")
    assert _patch.wrap(module, "close_sockets", outer, "outer", feature="b")
    try:
        assert module.close_sockets([1]) == ("ours", ("closed", [1], True))
        assert _patch.feature_disabled("a") and not _patch.feature_disabled("b")
    finally:
        for key in ("outer", "inner"):
            _patch.unwrap(module, "close_sockets", key)


def test_our_own_base_exceptions_pass(module, contained):
    def impl(original, listeners, unlink=True):
        raise SystemExit(1)  # a refused bind: one line, exit 1, on purpose
    assert _patch.wrap(module, "close_sockets", impl, KEY, feature="demo")
    with pytest.raises(SystemExit):
        module.close_sockets([])
    assert not _patch.feature_disabled("demo")


def test_an_uncontained_layer_propagates(module, contained):
    _, impl = _broken("before")
    assert _patch.wrap(module, "close_sockets", impl, KEY, feature=None)
    with pytest.raises(ValueError):
        module.close_sockets([])
    assert contained() == []


def test_contain_reports_and_cleans_up_once(contained):
    cleaned = []
    _patch.on_disable("demo", lambda: cleaned.append(1))
    _patch.on_disable("demo", cleaned.append)  # another callback: both run
    for _ in range(2):
        with _patch.contain("demo"):
            raise OSError("a bug of ours")
    assert len(contained()) == 1 and cleaned == [1]
    with pytest.raises(KeyboardInterrupt):
        with _patch.contain("other"):
            raise KeyboardInterrupt()
    assert not _patch.feature_disabled("other")


def test_a_failing_cleanup_is_only_a_warning(contained, caplog):
    _patch.on_disable("demo", lambda: 1 / 0)
    caplog.set_level(logging.WARNING, logger="gunicorn.error")
    with _patch.contain("demo"):
        raise OSError("a bug of ours")
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]


def test_the_state_is_per_process(contained):
    from test_heal import in_forked_child
    with _patch.contain("demo"):
        raise OSError("in the arbiter")

    def in_a_worker():  # forked after the fault: its features are its own
        fresh = not _patch.feature_disabled("demo")
        with _patch.contain("worker-only"):
            raise OSError("in the worker")
        return fresh and _patch.feature_disabled("worker-only")
    assert in_forked_child(in_a_worker)
    assert _patch.feature_disabled("demo") and not _patch.feature_disabled("worker-only")


def test_the_test_fault_hook(module, contained, monkeypatch):
    monkeypatch.setenv(_patch.ENV_TEST_FAULT, "demo:2")
    calls, impl = _calls()
    assert _patch.wrap(module, "close_sockets", impl, KEY, feature="demo")
    assert module.close_sockets([])[0] == "ours"
    assert module.close_sockets([]) == ("closed", [], True)  # the 2nd: raised, contained
    assert len(calls) == 1 and len(contained()) == 1
    assert "test fault" in str(contained()[0].exc_info[1])


def test_the_uncontained_switch_lets_the_fault_through(module, contained, monkeypatch):
    monkeypatch.setenv(_patch.ENV_TEST_FAULT, "demo")
    monkeypatch.setenv(_patch.ENV_TEST_UNCONTAINED, "1")
    assert _patch.wrap(module, "close_sockets", _calls()[1], KEY, feature="demo")
    with pytest.raises(RuntimeError):
        module.close_sockets([])


def test_healing_stays_off_after_its_fault(contained):
    from safe_gthread import _heal
    assert _heal.enabled({})
    with _patch.contain("heal"):
        raise OSError("a bug of ours")
    assert not _heal.enabled({})  # no new backup link, no check, until a restart
