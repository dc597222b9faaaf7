"""``safe-gthread check``, run for real as users run it: ``python -m safe_gthread
check`` in a subprocess, against the installed package and gunicorn.

Its temporary directory is created under ``$SAFE_GTHREAD_TMPDIR``, which every test points
at an empty directory of its own (``scratch``), so "no file left behind" is "that directory
is empty". It is made in /tmp, not in ``tmp_path``: pytest's paths are too long for a unix
socket path (108 bytes).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import gunicorn
import pytest

from conftest import require_tool
from safe_gthread.check import procs as _procs
from versions import STOCK_RETIRES_WITHOUT_LOSS, STOCK_WORKERS_UNLINK

SECONDS = "3"  # of load per worker class: enough for tens of restarts at max_requests 50
FAST = ["--seconds", SECONDS, "--max-requests", "50"]


@pytest.fixture
def scratch():
    path = tempfile.mkdtemp(prefix="sgt-")
    yield path
    shutil.rmtree(path)


def run_check(scratch, *args, **kwargs):
    env = dict(os.environ, SAFE_GTHREAD_TMPDIR=scratch)
    env.update(kwargs.pop("env", {}))
    proc = subprocess.run([sys.executable, "-m", "safe_gthread", "check"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=120, **kwargs)
    # Whatever happened, it cleaned up after itself.
    assert os.listdir(scratch) == [], proc.stderr
    return proc


def test_json_reports_affected_and_safe_held(scratch):
    proc = run_check(scratch, "--json", *FAST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1  # exactly one JSON object, on one line
    report = json.loads(proc.stdout)
    assert report["gunicorn"] == gunicorn.__version__
    assert report["python"] == "%d.%d.%d" % sys.version_info[:3]
    for phase in ("stock", "safe"):
        for key in ("restarts", "socket_survived", "requests", "failed_requests",
                    "successful_requests_per_second", "requests_per_restart", "tracebacks"):
            assert key in report[phase], key
        assert report[phase]["requests"] > 0
    stock, safe = report["stock"], report["safe"]
    # The control: stock 19.6.0 must lose the socket, or the check proves nothing.
    if STOCK_WORKERS_UNLINK:
        assert report["affected"] is True
        assert stock["socket_survived"] is False
        assert stock["failed_requests"] > 0
    if STOCK_RETIRES_WITHOUT_LOSS:
        assert report["affected"] is False
        assert stock["socket_survived"] is True and stock["failed_requests"] == 0
    assert report["affected"] == (not stock["socket_survived"] or stock["failed_requests"] > 0)
    assert safe["socket_survived"] is True
    assert safe["failed_requests"] == 0, safe
    assert safe["restarts"] > 0
    assert safe["requests_per_restart"] == pytest.approx(
        (safe["requests"] - safe["failed_requests"]) / float(safe["restarts"]), abs=0.1)
    assert safe["tracebacks"] == 0
    assert report["held"] is True
    # Progress went to stderr, never into the JSON.
    assert "safe_gthread.Worker:" in proc.stderr


def test_table_and_verdict(scratch):
    proc = run_check(scratch, *FAST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    header = [line for line in out.splitlines() if "stock gthread" in line][0]
    assert "safe_gthread.Worker" in header
    for row in ("restarts", "socket kept (same inode)", "requests", "failed requests",
                "successful requests/s", "tracebacks in the log"):
        assert any(line.startswith(row + " ") for line in out.splitlines()), row
    kept = [line for line in out.splitlines() if line.startswith("socket kept")][0].split()
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("gunicorn %s is " % gunicorn.__version__)
    assert "safe_gthread.Worker held" in verdict
    if STOCK_WORKERS_UNLINK:
        assert kept[-2:] == ["NO", "yes"]
        assert "is affected: the stock gthread worker lost its unix socket" in verdict
    if STOCK_RETIRES_WITHOUT_LOSS:
        assert kept[-2:] == ["yes", "yes"]
        assert "is not affected" in verdict
    # On a pipe, progress comes as plain lines: no carriage returns.
    assert "requests" in proc.stderr and "\r" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--seconds", "-1"], "--seconds: expected a whole number from 1 to 600, got -1"),
    (["--seconds", "0"], "--seconds: expected a whole number from 1 to 600, got 0"),
    (["--seconds", "ten"], "--seconds: expected a whole number, got 'ten'"),
    (["--max-requests", "0"], "--max-requests: expected a whole number from 1"),
    (["--workers", "0"], "--workers: expected a whole number from 1 to 32"),
    (["--threads", "1.5"], "--threads: expected a whole number, got '1.5'"),
    (["--proxy", "nope"], "--proxy: invalid choice: 'nope'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_usage_exits_2(scratch, args, message):
    proc = run_check(scratch, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""


def test_no_command_exits_2():
    proc = subprocess.run([sys.executable, "-m", "safe_gthread"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert proc.returncode == 2
    assert "a command is required: check" in proc.stderr


def test_cannot_run_exits_2(scratch, tmp_path):
    # A temporary directory whose socket path would not fit in sockaddr_un.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    proc = run_check(scratch, env={"SAFE_GTHREAD_TMPDIR": str(deep)})
    assert proc.returncode == 2
    assert "could not run: no usable socket path" in proc.stderr
    assert os.listdir(str(deep)) == []
    # One that does not exist.
    proc = run_check(scratch, env={"SAFE_GTHREAD_TMPDIR": os.path.join(scratch, "missing")})
    assert proc.returncode == 2
    assert "could not run: cannot create a temporary directory" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("kind", ["h2o", "nginx"])
def test_proxy(scratch, kind):
    try:
        import safe_gthread.check.proxy  # noqa: F401
    except ImportError:
        # Not written yet: --proxy must say so, cleanly.
        proc = run_check(scratch, "--proxy", kind, *FAST)
        assert proc.returncode == 2
        assert "--proxy is not available" in proc.stderr
        return
    require_tool(kind)
    proc = run_check(scratch, "--proxy", kind, "--json", *FAST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["settings"]["proxy"] == kind
    assert report["safe"]["socket_survived"] is True
    assert report["safe"]["failed_requests"] == 0, report["safe"]
    if STOCK_WORKERS_UNLINK:
        assert report["affected"] is True and report["stock"]["socket_survived"] is False


def test_report_exit_status_when_the_safe_worker_fails():
    """The one outcome a real run cannot show (the worker holds): its verdict and status."""
    import argparse
    from safe_gthread.check import cli

    args = argparse.Namespace(seconds=3, max_requests=50, workers=2, threads=2, proxy=None,
                              json=False)

    def phase(**changes):
        result = {"restarts": 10, "socket_survived": True, "socket_lost_at_restart": None,
                  "requests": 100, "failed_requests": 0}
        result.update(changes)
        return result

    report = cli.Check(args)._report({"stock": phase(), "safe": phase(failed_requests=3)})
    assert report["exit_status"] == 1 and report["held"] is False
    assert "safe_gthread.Worker did NOT hold: it failed 3 of 100 requests" in report["verdict"]
    report = cli.Check(args)._report({"stock": phase(), "safe": phase(restarts=0)})
    assert report["exit_status"] == 2 and "inconclusive" in report["verdict"]


def test_unequal_restart_rates_are_called_out():
    """Throughput compares like for like only at like restart rates: the table's note and
    the verdict say so when requests per restart differ by more than 1.25x."""
    import argparse
    from safe_gthread.check import cli

    args = argparse.Namespace(seconds=3, max_requests=50, workers=2, threads=2, proxy=None,
                              json=False, bind="unix", reuse_port=False)

    def phase(per_restart):
        return {"restarts": 10, "socket_survived": True, "socket_lost_at_restart": None,
                "requests": 1000, "failed_requests": 0, "requests_per_restart": per_restart,
                "successful_requests_per_second": 100.0, "tracebacks": 0, "errors": {}}

    check = cli.Check(args)
    check.clients = 4
    report = check._report({"stock": phase(213.0), "safe": phase(1355.0)})
    assert "restarted at different rates" in report["verdict"]
    assert "Note: the two workers restarted at different rates (213 vs 1,355 requests per " \
           "restart)" in check._table(report)
    report = check._report({"stock": phase(213.0), "safe": phase(240.0)})
    assert "different rates" not in report["verdict"] + check._table(report)
    assert "requests per restart" in check._table(report)


def test_status_fields_of_a_live_and_a_gone_process():
    uid, euid = os.getuid(), os.geteuid()
    assert [int(v) for v in _procs.status_field(os.getpid(), "Uid")[:2]] == [uid, euid]
    assert _procs.status_field(os.getpid(), "NoSuchField") is None
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # reaped: its /proc entry is gone
    assert _procs.status_field(child.pid, "Uid") is None
    assert _procs.caught_signals(child.pid) is None


# -- Ctrl-C ---------------------------------------------------------------------------------

def _processes():
    """(pid, ppid, pgid, sid, cmdline) of every live process."""
    for pid, ppid, pgid, sid in _procs.live_processes():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        yield pid, ppid, pgid, sid, cmdline


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail("timed out after %ss waiting for %s" % (timeout, what))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_leaves_nothing_behind(scratch, tmp_path, sig):
    stderr_path = tmp_path / "stderr.txt"
    env = dict(os.environ, SAFE_GTHREAD_TMPDIR=scratch)
    with open(str(stderr_path), "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "safe_gthread", "check", "--seconds", "60"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
    try:
        # Running: its gunicorn is up and the load is on (a progress line says so).
        _wait_for(lambda: "requests sent" in stderr_path.read_text(), 60, "progress")
        arbiters = [pid for pid, ppid, _, _, cmd in _processes()
                    if ppid == proc.pid and "gunicorn" in cmd]
        assert arbiters, stderr_path.read_text()
        interrupted = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(30)
        assert time.monotonic() - interrupted < 20
    finally:
        if proc.poll() is None:  # the test failed: do not leave it running either
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 128 + getattr(signal, sig)
    assert "interrupted" in stderr_path.read_text()
    # gunicorn runs in its own session (its pgid and sid are the arbiter's pid).
    groups = {proc.pid} | set(arbiters)
    left = [(pid, cmd) for pid, _, pgid, sid, cmd in _processes()
            if pgid in groups or sid in groups or scratch in cmd]
    assert left == []
    assert os.listdir(scratch) == []
