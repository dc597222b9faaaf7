"""safe-gthread's own settings: ``safe_gthread.configure(...)`` and ``SAFE_GTHREAD_*``.

gunicorn silently ignores names it does not know in a config file, so our knobs come
through :func:`configure`, called in the gunicorn config file (which runs in the
arbiter, before the worker class is loaded, and again on every HUP), or through
environment variables for deployments without a config file. Each call to
:func:`configure` starts again from the defaults and the environment: the last call
wins, and a setting it does not name goes back to its default (or environment value).

A bad value is a configuration error, reported the way gunicorn reports its own: one
line naming the setting and what it accepts, then exit status 1, no traceback.

Other modules read the settings in force with :func:`current`
(``_settings.current().max_retiring``, ``_settings.current().heal``). Workers are forked
from the arbiter and inherit them.
"""
import logging
import os
import re
import sys
import threading

__all__ = ["configure", "current", "Settings", "SettingsError"]


class SettingsError(ValueError):
    """A bad value for one of our settings; the message is the one line users see."""


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def parse_size(name, value):
    """Bytes from an int or a string like "512M", "1G", "65536" (binary units); 0 = off."""
    if isinstance(value, bool):
        value = None  # True/False are ints in Python, not sizes
    if isinstance(value, int) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise SettingsError(
            "%s: %r is not a size; use a number of bytes or a number followed by K, M or "
            "G (binary: 1K = 1024), e.g. \"512M\"; 0 turns it off" % (name, value))
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_seconds(name, value):
    """Seconds (int, float or numeric string, >= 0); 0 = off."""
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError
    except (TypeError, ValueError):
        raise SettingsError("%s: %r is not a number of seconds; use a number >= 0 "
                            "(0 turns it off), e.g. 3600" % (name, value))
    return seconds


def parse_count(name, value):
    """A whole number >= 1."""
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        count = int(value)
        if count < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise SettingsError("%s: %r is not a whole number >= 1" % (name, value))
    return count


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError("%s: %r is not a boolean; use 1/0, true/false, yes/no or on/off"
                        % (name, value))


#: name -> (default, parser). The environment variable is SAFE_GTHREAD_<NAME>.
REGISTRY = {
    # Retire a worker whose resident set size reaches this many bytes (0: never).
    "max_worker_memory": (0, parse_size),
    # Retire a worker after this many seconds, +-10 % per worker (0: never).
    "max_worker_lifetime": (0.0, parse_seconds),
    # Retirements in flight at once: worker processes stay <= workers + max_retiring.
    # Two: one boot slot was overrun by a 1 s-import app at ordinary churn, two kept up
    # (docs/settings.md has the measurement).
    "max_retiring": (2, parse_count),
    # The healing unix socket path (a removed path is linked back): on unless turned off.
    "heal": (True, parse_bool),
    # A HUP replaces at most this many workers at a time (0: all at once; docs/deploying.md).
    "reload_batch": (0, lambda name, value: 0 if str(value).strip() in ("0", "") else parse_count(name, value)),
    # Workers forked from a warm per-generation template process (docs/mold.md): off
    # unless asked for.
    "mold": (False, parse_bool),
}


def env_name(name):
    return "SAFE_GTHREAD_" + name.upper()


class Settings(object):
    """The settings in force; attributes named as in :data:`REGISTRY`."""

    __slots__ = tuple(REGISTRY) + ("sources",)

    def __init__(self, values, sources):
        for name, value in values.items():
            setattr(self, name, value)
        self.sources = sources  # name -> "default" | "environment" | "configure()"

    def as_dict(self):
        return {name: getattr(self, name) for name in REGISTRY}

    def describe(self):
        """For the boot line: ``max_worker_memory=512M, max_retiring=1, ...``."""
        parts = []
        for name in sorted(REGISTRY):
            value = getattr(self, name)
            if name == "max_worker_memory":
                text = format_size(value) if value else "off"
            elif name == "max_worker_lifetime":
                text = ("%gs" % value) if value else "off"
            elif name in ("heal", "mold"):
                text = "on" if value else "off"
            else:
                text = str(value)
            parts.append("%s=%s" % (name, text))
        return ", ".join(parts)


def format_size(nbytes):
    for unit, size in (("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if nbytes >= size and nbytes % size == 0:
            return "%d%s" % (nbytes // size, unit)
    if nbytes >= 1024 ** 2:
        return "%.1fM" % (nbytes / 1024.0 ** 2)
    return "%d" % nbytes


def build(given=None, environ=None):
    """The settings from defaults, then the environment, then ``given`` (keywords);
    raises :class:`SettingsError` for the first bad or unknown one."""
    given = dict(given or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(given) - set(REGISTRY))
    if unknown:
        raise SettingsError("safe_gthread.configure(): unknown setting %s; known: %s"
                            % (", ".join(unknown), ", ".join(sorted(REGISTRY))))
    values, sources = {}, {}
    for name in sorted(REGISTRY):
        default, parse = REGISTRY[name]
        if name in given:
            values[name] = parse(name, given[name])
            sources[name] = "configure()"
        elif environ.get(env_name(name), "").strip():
            values[name] = parse(env_name(name), environ[env_name(name)])
            sources[name] = "environment"
        else:
            values[name] = default
            sources[name] = "default"
    return Settings(values, sources)


_lock = threading.Lock()
_current = []  # [Settings] once built


def fail(message, log=None):
    """Report a configuration error the way gunicorn does (one line), and exit 1."""
    line = "Error: safe-gthread: %s" % message
    log = log or logging.getLogger("gunicorn.error")
    to_stderr = True
    if log.handlers:
        log.error("%s", line)
        # gunicorn's errorlog "-" already is stderr: do not print the line twice there.
        to_stderr = not any(getattr(handler, "stream", None) in (sys.stderr, sys.__stderr__)
                            for handler in log.handlers)
    if to_stderr:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    raise SystemExit(1)


def configure(**settings):
    """Set safe-gthread's settings; call it in the gunicorn config file.

    ``max_worker_memory`` (bytes, or "512M", "1G"), ``max_worker_lifetime`` (seconds),
    ``max_retiring`` (retirements in flight at once), ``heal`` (bool), ``reload_batch``,
    ``mold`` (bool: workers forked from a warm template process). Settings not
    given come from ``SAFE_GTHREAD_*`` environment variables, else their defaults. A bad
    or unknown setting: one line on stderr and exit status 1.
    """
    try:
        built = build(settings)
    except SettingsError as exc:
        fail(str(exc))
    with _lock:
        _current[:] = [built]
    from . import _heal  # the guard reads heal there (it also runs without the worker)
    _heal.set_enabled(built.heal if "heal" in settings else None)
    return built


def current():
    """The settings in force (built from the environment if ``configure`` was never
    called). Raises :class:`SettingsError` for a bad environment value."""
    with _lock:
        if not _current:
            _current.append(build())
        return _current[0]


def reset():
    """Forget what ``configure`` set, ``heal`` included (a HUP's config may no longer
    call it; tests)."""
    with _lock:
        del _current[:]
    from . import _heal
    _heal.set_enabled(None)
