"""gunicorn's own test suite as a peer check.

From 24.0 gunicorn's sdist ships its tests. On a cell whose gunicorn has them, this
fetches that version's sdist (cached in .matrix/upstream/), and runs its gthread,
keep-alive shutdown, socket, arbiter and signal tests with ``safe_gthread.Worker``
standing in for ``gunicorn.workers.gthread.ThreadWorker`` (tests/upstream/standin.py)
in one pytest run in a fresh interpreter, reported here file by file.

Every difference from stock is deliberate: ``EXPECTED_FAILURES`` below is the one list
of upstream tests that fail with the safe worker, each with its reason. They run as
strict xfails: an unexpected failure fails here, and so does an expected one that
passes (then it leaves the list).
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET

import pytest

import gunicorn
from safe_gthread import _compat
from versions import GUNICORN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "tests", "upstream")
CACHE = os.environ.get("SAFE_GTHREAD_UPSTREAM_CACHE") or os.path.join(ROOT, ".matrix", "upstream")

#: gunicorn's test files that exercise what safe-gthread touches.
FILES = ["test_gthread.py", "test_gthread_keepalive_shutdown.py", "test_sock.py",
         "test_arbiter.py", "test_signal_integration.py"]

#: ``"file::test"`` (any parametrisation) -> ``(applies on this gunicorn, why it fails
#: with the safe worker)``: the one list of deliberate differences. A test a version does
#: not ship is not checked; one that applies and passes fails the run (strict xfail).
EXPECTED_FAILURES = {
    "test_sock.py::test_unix_socket_close_unlink": (
        _compat.HAS_CLOSE_SOCKETS,
        "deliberate: the guard unlinks a unix socket only in the process that bound it, "
        "and only while lstat still shows that socket (DESIGN.md invariant 2); the test's "
        "Mock listener was never bound, so nothing is unlinked"),
    # 27.0.0 closes every kept-alive connection at once when its in-flight requests are
    # done, though a proxy may already have sent a request on one; the safe worker gives
    # it 27.0.1's stop path (safe_gthread/_retire/method_queue.py).
    "test_gthread.py::TestSignalHandling::test_graceful_shutdown_ignore_idle_keepalived": (
        _compat.STOP_CLOSES_KEPT_ALIVE_AT_ONCE,
        "deliberate: a retiring safe worker keeps idle kept-alive connections for one more "
        "request or RETIRE_LINGER (27.0.1's stop path), where 27.0.0 closes them at once; "
        "the test's mocked select never blocks, so the linger loop spins until the deadline"),
    "test_gthread.py::TestSignalHandling::test_graceful_shutdown_drains_connections": (
        _compat.STOP_CLOSES_KEPT_ALIVE_AT_ONCE,
        "deliberate: the safe worker's stop loop wakes at least once a second and "
        "notifies the arbiter each time, so a long linger never trips the worker timeout; "
        "the test counts 27.0.0's exact notify calls (3, here 5)"),
}


def _expected_here():
    return dict((name, reason) for name, (applies, reason) in EXPECTED_FAILURES.items()
                if applies)


def _sdist_tests(version):
    """The ``tests/`` directory of gunicorn ``version``'s sdist, fetched once."""
    target = os.path.join(CACHE, "gunicorn-%s" % version)
    if os.path.isdir(os.path.join(target, "tests")):
        return target
    os.makedirs(CACHE, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="sdist-", dir=CACHE)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
             ":all:", "gunicorn==%s" % version, "-d", scratch],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
            env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"), timeout=300)
        archives = [name for name in os.listdir(scratch) if name.endswith(".tar.gz")]
        if proc.returncode or not archives:
            message = "cannot fetch gunicorn %s's sdist:\n%s" % (version, proc.stdout)
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        unpacked = os.path.join(scratch, "unpacked")
        with tarfile.open(os.path.join(scratch, archives[0])) as archive:
            # Only tests/: the sdist's gunicorn/ must not shadow the installed one.
            members = [m for m in archive.getmembers()
                       if m.name.split("/")[1:2] == ["tests"] and (m.isfile() or m.isdir())]
            archive.extractall(unpacked, members=members)
        (top,) = os.listdir(unpacked)
        try:
            os.rename(os.path.join(unpacked, top), target)
        except OSError:
            if not os.path.isdir(os.path.join(target, "tests")):  # not a concurrent cell
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _outcomes(junit):
    """``{file name: {"Class::test[param]": "passed" | "failed" | "skipped" | "xfailed"}}``."""
    outcomes = {}
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "xfailed" if "xfail" in case.find("skipped").get("type", "") else "skipped"
        else:
            outcome = "passed"
        name = "%s::%s" % (case.get("classname", "").split(".")[-1], case.get("name"))
        outcomes.setdefault(os.path.basename(case.get("file", "")), {})[name] = outcome
    return outcomes


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One pytest run over every selected file this gunicorn ships (one interpreter
    start-up, not five); ``(sdist dir, outcomes per file, output)``."""
    if GUNICORN < (24,):
        pytest.skip("gunicorn ships its tests in the sdist from 24.0")
    base = _sdist_tests(gunicorn.__version__)
    files = [os.path.join("tests", name) for name in FILES
             if os.path.exists(os.path.join(base, "tests", name))]
    tmp = tmp_path_factory.mktemp("upstream")
    junit = str(tmp / "junit.xml")
    ini = tmp / "pytest.ini"
    ini.write_text("[pytest]\n")  # not gunicorn's: its addopts need pytest-cov
    env = dict(os.environ, SAFE_GTHREAD_STANDIN="1",
               SAFE_GTHREAD_UPSTREAM_XFAIL=json.dumps(_expected_here()),
               PYTHONPATH=os.pathsep.join(
                   [STANDIN] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # What the run below tests is ours, not stock gthread:
    standing_in = subprocess.run(
        [sys.executable, "-c", "from gunicorn import util; import safe_gthread; "
         "assert util.load_class('gthread') is safe_gthread.Worker"],
        cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120)
    assert standing_in.returncode == 0, standing_in.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "standin",
         "-W", "ignore::pytest.PytestAssertRewriteWarning",
         "-c", str(ini), "--rootdir", base, "--basetemp", str(tmp / "t"),
         "--junitxml", junit, "-o", "junit_family=xunit1", "-rfEX"] + files,
        cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=600)
    assert proc.returncode in (0, 1) and os.path.exists(junit), proc.stdout  # 1: failures
    return base, _outcomes(junit), proc.stdout


@pytest.mark.parametrize("filename", FILES)
def test_gunicorn_own_tests_pass_with_the_safe_worker(upstream, filename):
    base, outcomes, output = upstream
    if not os.path.exists(os.path.join(base, "tests", filename)):
        pytest.skip("gunicorn %s has no tests/%s" % (gunicorn.__version__, filename))
    mine = dict(outcomes.get(filename, {}))
    mine.update(outcomes.get("", {}))  # errors pytest could not place in a file
    counts = dict((kind, sum(1 for o in mine.values() if o == kind))
                  for kind in ("passed", "failed", "xfailed", "skipped"))
    print("gunicorn %s tests/%s with safe_gthread.Worker: %s" % (
        gunicorn.__version__, filename, ", ".join("%d %s" % (n, k) for k, n in counts.items())))
    failed = sorted(name for name, outcome in mine.items() if outcome == "failed")
    assert not failed, "%s\n%s" % (failed, output)
    assert counts["passed"] + counts["xfailed"] > 0, output  # the file ran
