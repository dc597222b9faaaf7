"""safe_gthread.configure() and SAFE_GTHREAD_*: parsing, errors, HUP."""
import os

import pytest

import safe_gthread
from safe_gthread import _settings
from safe_gthread.check import procs as _procs
from safe_gthread.check.runner import Gunicorn


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for name in _settings.REGISTRY:
        monkeypatch.delenv(_settings.env_name(name), raising=False)
    _settings.reset()
    yield
    _settings.reset()


@pytest.mark.parametrize("text, expected", [
    (0, 0), (1048576, 1048576), ("512M", 512 * 1024 ** 2), ("1G", 1024 ** 3),
    ("64k", 65536), ("100", 100), (" 2 G ", 2 * 1024 ** 3), ("256MiB", 256 * 1024 ** 2)])
def test_sizes(text, expected):
    assert _settings.parse_size("max_worker_memory", text) == expected


@pytest.mark.parametrize("text", ["-1", "1.5G", "512X", "", "lots", -5, True, None, 1.5])
def test_bad_sizes(text):
    with pytest.raises(_settings.SettingsError) as info:
        _settings.parse_size("max_worker_memory", text)
    assert str(info.value).startswith("max_worker_memory: ")
    assert "K, M or G" in str(info.value)


def test_defaults():
    settings = _settings.build(environ={})
    assert settings.as_dict() == {"max_worker_memory": 0, "max_worker_lifetime": 0.0,
                                  "max_retiring": 2, "heal": True, "reload_batch": 0,
                                  "mold": False}
    assert settings.describe() == ("heal=on, max_retiring=2, max_worker_lifetime=off, "
                                   "max_worker_memory=off, mold=off, reload_batch=0")


def test_reload_batch_takes_zero_or_a_count():
    assert _settings.build({"reload_batch": 0}, environ={}).reload_batch == 0
    assert _settings.build({"reload_batch": 2}, environ={}).reload_batch == 2
    assert _settings.build(environ={"SAFE_GTHREAD_RELOAD_BATCH": "1"}).reload_batch == 1
    with pytest.raises(_settings.SettingsError):
        _settings.build({"reload_batch": -1}, environ={})


def test_environment_then_configure_last_call_wins():
    environ = {"SAFE_GTHREAD_MAX_WORKER_MEMORY": "1G", "SAFE_GTHREAD_MAX_RETIRING": "2",
               "SAFE_GTHREAD_MAX_WORKER_LIFETIME": "600", "SAFE_GTHREAD_HEAL": "0"}
    settings = _settings.build(environ=environ)
    assert (settings.max_worker_memory, settings.max_retiring, settings.max_worker_lifetime,
            settings.heal) == (1024 ** 3, 2, 600.0, False)
    settings = _settings.build({"max_retiring": 3}, environ=environ)
    assert settings.max_retiring == 3 and settings.max_worker_memory == 1024 ** 3
    assert settings.sources["max_retiring"] == "configure()"
    assert settings.sources["max_worker_memory"] == "environment"


def test_configure_sets_current_and_a_later_call_resets_what_it_does_not_name():
    safe_gthread.configure(max_worker_memory="512M", max_worker_lifetime=3600, max_retiring=1)
    assert _settings.current().max_worker_memory == 512 * 1024 ** 2
    assert _settings.current().max_worker_lifetime == 3600
    safe_gthread.configure(max_retiring=2)
    assert _settings.current().max_worker_memory == 0
    assert _settings.current().max_retiring == 2
    safe_gthread.configure(heal=False)
    assert _settings.current().heal is False


@pytest.mark.parametrize("given, named", [
    ({"max_worker_memory": "lots"}, "max_worker_memory"),
    ({"max_worker_lifetime": -1}, "max_worker_lifetime"),
    ({"max_retiring": 0}, "max_retiring"),
    ({"heal": "maybe"}, "heal"),
    ({"max_memory": "1G"}, "unknown setting max_memory")])
def test_bad_configure_is_one_line_and_exit_1(capsys, given, named):
    with pytest.raises(SystemExit) as info:
        safe_gthread.configure(**given)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("Error: safe-gthread: "), err


# -- against real gunicorn ---------------------------------------------------------------
def _server(tmp_path, lines=(), **settings):
    server = Gunicorn(tmp_path, "safe", **settings)
    with open(server.config_path, "a") as fh:
        for line in lines:
            fh.write(line + "\n")
    return server


def _fails_to_boot(server):
    server.start(wait=False)
    try:
        status = server.wait_exit(timeout=30)
    finally:
        server.stop()
    return status, server.log()


@pytest.mark.parametrize("how", ["environment", "configure"])
def test_bad_setting_stops_the_boot_with_one_line(tmp_path, monkeypatch, how):
    # Not ours to count: gunicorn <= 20 on a recent setuptools warns about pkg_resources.
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::UserWarning")
    if how == "environment":
        monkeypatch.setenv("SAFE_GTHREAD_MAX_WORKER_MEMORY", "512 apples")
        server = _server(tmp_path)
    else:
        server = _server(tmp_path, ["import safe_gthread",
                                    "safe_gthread.configure(max_retiring='many')"])
    status, log = _fails_to_boot(server)
    assert status == 1, log
    assert "Traceback" not in log, log
    name = "SAFE_GTHREAD_MAX_WORKER_MEMORY" if how == "environment" else "max_retiring"
    # One line on stderr, as gunicorn's own config errors (and, once gunicorn's logger
    # is set up, the same line in its error log file).
    out = _procs.read_text(os.path.join(server.directory, "gunicorn.out"))
    assert [line for line in out.splitlines() if line.strip()] == [
        line for line in out.splitlines() if "Error: safe-gthread: %s: " % name in line], out
    assert len(out.strip().splitlines()) == 1, out
    assert server.errorlog().count("safe-gthread: %s" % name) <= 1, log
    assert "Booting worker" not in log, log


def test_environment_shows_in_the_boot_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFE_GTHREAD_MAX_WORKER_MEMORY", "1G")
    monkeypatch.setenv("SAFE_GTHREAD_MAX_WORKER_LIFETIME", "3600")
    monkeypatch.setenv("SAFE_GTHREAD_MAX_RETIRING", "3")  # not the default (2)
    server = _server(tmp_path).start()
    try:
        assert ("safe-gthread settings: heal=on, max_retiring=3, max_worker_lifetime=3600s, "
                "max_worker_memory=1G" in server.errorlog()), server.log()
    finally:
        server.stop()


def test_hup_runs_configure_again(tmp_path):
    value = tmp_path / "retiring.txt"
    value.write_text("2")
    server = _server(tmp_path, [
        "import safe_gthread",
        "safe_gthread.configure(max_worker_memory='512M', "
        "max_retiring=int(open(%r).read()))" % str(value)]).start()
    try:
        assert "max_retiring=2, max_worker_lifetime=off, max_worker_memory=512M" in \
            server.errorlog(), server.log()
        value.write_text("3")
        server.reload()
        server.wait_for(lambda: "max_retiring=3" in server.errorlog(), 20, "the new setting")
        assert server.serves()
    finally:
        server.stop()


def test_a_hup_whose_config_no_longer_configures_goes_back_to_the_defaults(tmp_path):
    """Issue 18 j: the settings a configure() call made stayed in force after a HUP whose
    config file no longer calls it."""
    server = _server(tmp_path, ["import safe_gthread",
                                "safe_gthread.configure(max_retiring=3, heal=False)"]).start()
    try:
        assert "heal=off, max_retiring=3" in server.errorlog(), server.log()
        with open(server.config_path) as fh:
            kept = [line for line in fh if not line.startswith(("import safe_gthread",
                                                             "safe_gthread.configure"))]
        with open(server.config_path, "w") as fh:
            fh.writelines(kept)
        before = server.errorlog().count("safe-gthread settings:")
        server.reload()
        server.wait_for(lambda: server.errorlog().count("safe-gthread settings:") > before,
                        20, "the settings line after HUP")
        last = server.errorlog().split("safe-gthread settings:")[-1].splitlines()[0]
        default = _settings.REGISTRY["max_retiring"][0]
        assert "heal=on, max_retiring=%d," % default in last, server.log()
        assert server.serves()
    finally:
        server.stop()


_SETUP_PROBE = """
import logging
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
log = logging.getLogger("gunicorn.error")
log.addHandler(Keep())
log.setLevel(logging.INFO)
from safe_gthread import _boot, guard
done = [_boot.setup_once(log) for _ in range(3)]  # boot, then two more accesses
guard._reload(lambda arbiter: None, None)  # a HUP: the new configuration's turn
done += [_boot.setup_once(log) for _ in range(2)]
print(done, sum("safe-gthread settings:" in line for line in lines))
"""


def test_setup_runs_once_per_configuration_load():
    """Issue 18 h: gunicorn calls the worker class's setup() on every cfg.worker_class
    access; each one logged the settings line again (and, from the control socket's
    thread, took the installers' locks)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _SETUP_PROBE], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=60).stdout.decode()
    assert out.strip().splitlines()[-1] == "[True, False, False, True, False] 2", out
