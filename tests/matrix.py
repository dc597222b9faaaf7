#!/usr/bin/env python3
"""Run the test suite on every cell of the supported matrix: one venv per cell, the
package installed from a freshly built wheel (never the source tree).

    python3 tests/matrix.py                      # every cell
    python3 tests/matrix.py --cells 19.6.0-3.6   # some cells (gunicorn-python, comma-separated)
    python3 tests/matrix.py --jobs 1             # one cell at a time (default: two)
    python3 tests/matrix.py -- -k restart        # extra pytest arguments after --
    python3 tests/matrix.py --cells 27.0.1-3.13 -- tests/test_patch.py   # named tests only
    python3 tests/matrix.py --load               # all of tests/load/ on every cell, not LOAD_CELLS

Venvs live in .matrix/ and are reused when their pins are unchanged. Each cell's output
is printed whole when the cell ends. The last line is the total over all cells:
``matrix: N passed, N failed, N skipped``.
"""
import argparse
import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import threading
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent import futures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX_DIR = os.path.join(ROOT, ".matrix")

#: (gunicorn, Python): the original report's version on its Python and on the newest it runs on,
#: the first fixed 19.x, each major line after it; for the 24.0 - 27.0.0 gthread loop
#: (a retirement of its own) its first release line (24.1.1), a 25.x before 25.3's
#: ``_DEFER`` (25.1.0) and 26.x's newest (26.2.0; 26.0.0 has the same shape: see
#: tests/test_compat.py), and 27.0.0, whose stop closes kept-alive connections at once;
#: the newest on the newest Python. Each cell costs about 5 minutes (8 with the load
#: tests): CI runs two at a time within its 45-minute budget.
CELLS = [
    ("19.6.0", "3.6"), ("19.6.0", "3.9"), ("19.9.0", "3.6"), ("20.1.0", "3.8"),
    ("21.2.0", "3.10"), ("23.0.0", "3.12"), ("24.1.1", "3.12"), ("25.1.0", "3.12"),
    ("26.2.0", "3.12"), ("27.0.0", "3.12"), ("27.0.1", "3.13"),
]

#: The load tests (tests/load/, a few minutes a file and cell) and the cells that run
#: which: the wrk/proxy restart tests on the lowest and the newest and on each side of
#: every gthread generation boundary (19.x - 23.x legacy loop, 24.0 - 27.0.0 method
#: queue, 27.0.1 graceful stop); the reuse_port tests on each line whose workers bind
#: their own listeners (24.x, 26.x, 27.0.0, 27.0.1; before 24.0 the arbiter binds the
#: one listener, and there is no listener loss for a control to show).
#: ``--load`` runs both everywhere; ``--no-load`` neither.
LOAD_RESTARTS = ("test_load_restarts.py", "test_load_max_requests.py")
LOAD_REUSEPORT = ("test_reuseport.py",)
ALL_LOAD = LOAD_RESTARTS + LOAD_REUSEPORT
LOAD_CELLS = {
    ("19.6.0", "3.6"): LOAD_RESTARTS,
    ("23.0.0", "3.12"): LOAD_RESTARTS,
    ("24.1.1", "3.12"): LOAD_REUSEPORT,
    ("26.2.0", "3.12"): LOAD_REUSEPORT,
    ("27.0.0", "3.12"): ALL_LOAD,
    ("27.0.1", "3.13"): ALL_LOAD,
}


def gunicorn_requirements(gunicorn):
    """gunicorn itself, and what it needs but does not declare: up to 20.x it imports
    ``pkg_resources``, which setuptools 81 removed."""
    pins = ["gunicorn==%s" % gunicorn]
    if int(gunicorn.split(".")[0]) < 21:
        pins.append("setuptools<81")
    return pins


def eventlet_requirement(gunicorn, python):
    """gunicorn 19.7 - 20.x's eventlet worker imports ``eventlet.wsgi.ALREADY_HANDLED``,
    which eventlet 0.30.3 removed (21.0 copes without it); 0.33.3 is the last for 3.6."""
    if (19, 7) <= _version(gunicorn) < (21,):
        return "eventlet<0.30.3"
    return "eventlet==0.33.3" if python == "3.6" else "eventlet"


def _version(text):
    return tuple(int(part) for part in text.split("."))


def test_requirements(python, gunicorn):
    """What the tests need besides the package, pinned to what still supports ``python``.

    gevent and eventlet let tests/test_scenarios.py run the guard under every built-in
    worker class (``eventlet_requirement``). bottle is the original report's framework
    (examples/web.py); 0.13.5 installs and runs on every Python 3.6 - 3.13.
    """
    bottle = ["bottle==0.13.5"]
    if python == "3.6":
        return ["pytest>=7.0,<7.1", "hypothesis>=6.31,<6.32",
                eventlet_requirement(gunicorn, python), "gevent>=21,<22.11"] + bottle
    if python == "3.7":
        return ["pytest>=7.4,<7.5", "hypothesis>=6.79,<6.80"] + bottle
    # mkdocs (tests/test_docs.py builds the site) runs on Python >= 3.8; build and twine
    # (tests/test_packaging.py) are needed in one cell only.
    docs = ["mkdocs>=1.6,<2"]
    packaging = ["build>=1.2,<2", "twine>=6,<8"] if python == "3.13" else []
    workers = [eventlet_requirement(gunicorn, python), "gevent"]
    return ["pytest>=8,<9", "hypothesis>=6.100,<7"] + docs + packaging + workers + bottle


def find_python(version):
    candidates = sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/%s.*/bin/python%s" % (version, version))))
    found = candidates[-1:] or [shutil.which("python" + version)]
    if not found[0]:
        sys.exit("matrix: no Python %s found (pyenv or PATH)" % version)
    return found[0]


def run(cmd, **kwargs):
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, check=True, env=env, **kwargs)


def build_wheel(python, dist):
    """One wheel for every cell (pure Python, py3): built once with the host's Python,
    into this run's own ``dist`` (two matrix runs side by side keep their own wheels)."""
    run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, ROOT],
        stdout=subprocess.DEVNULL)
    return glob.glob(os.path.join(dist, "safe_gthread-*.whl"))[0]


@contextlib.contextmanager
def built_wheel(python=sys.executable):
    """This checkout as a wheel in a directory of this run's own, removed afterwards."""
    os.makedirs(MATRIX_DIR, exist_ok=True)
    dist = tempfile.mkdtemp(prefix="dist-", dir=MATRIX_DIR)
    try:
        yield build_wheel(python, dist)
    finally:
        shutil.rmtree(dist, ignore_errors=True)


def prepare(gunicorn, python, wheel):
    venv = os.path.join(MATRIX_DIR, "gunicorn%s-py%s" % (gunicorn, python))
    pins = gunicorn_requirements(gunicorn) + test_requirements(python, gunicorn)
    stamp = os.path.join(venv, "pins.txt")
    bin_python = os.path.join(venv, "bin", "python")
    if not (os.path.exists(stamp) and open(stamp).read() == "\n".join(pins)):
        shutil.rmtree(venv, ignore_errors=True)
        run([find_python(python), "-m", "venv", venv])
        pip = [bin_python, "-m", "pip", "install", "-q", "--prefer-binary"]
        run(pip + ["--upgrade", "pip<22" if python == "3.6" else "pip"])
        run(pip + pins)
        with open(stamp, "w") as fh:
            fh.write("\n".join(pins))
    run([bin_python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel])
    return venv


#: The cells' pytest processes now running; a signal to the matrix ends them and all
#: they started (each server runs in a session of its own, out of reach of Ctrl-C).
_running = set()
_running_lock = threading.Lock()
_stopping = threading.Event()


def _descendant_groups(pid):
    """The process groups of ``pid``'s live descendants (Linux /proc), ``pid``'s first."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % entry) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append((int(entry), int(fields[2])))
    groups, todo = [os.getpgid(pid)] if os.path.exists("/proc/%d" % pid) else [], [pid]
    while todo:
        for child, group in parents.get(todo.pop(), ()):
            todo.append(child)
            if group not in groups:
                groups.append(group)
    return groups


def terminate(proc, grace=20.0):
    """End a cell's pytest and every server it started, by process group: SIGTERM, then
    SIGKILL what is left after ``grace`` seconds."""
    groups = _descendant_groups(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for group in groups:
            try:
                os.killpg(group, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not any(_group_alive(group) for group in groups):
                return
            time.sleep(0.1)


def _group_alive(group):
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _on_signal(signum, frame):
    _stopping.set()
    print("matrix: %s: stopping every cell and its servers" % signal.Signals(signum).name,
          flush=True)
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        terminate(proc)
    raise SystemExit(128 + signum)


def stop_cells_on_signals():
    """Ctrl-C or SIGTERM to the matrix ends every running cell and the servers it started
    (before, they ran on: each server is in a session of its own)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)


def count(junit):
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    if not os.path.exists(junit):
        totals["failed"] = 1
        return totals
    root = ET.parse(junit).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
        tests = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        totals["failed"] += failed
        totals["skipped"] += skipped
        totals["passed"] += tests - failed - skipped
    return totals


def run_cell(number, total, gunicorn, python, wheel, extra, load=ALL_LOAD):
    """Prepare one cell's venv and run the suite in it, with the files of tests/load/
    named in ``load``; return (cell counts, output)."""
    label = "gunicorn %s on Python %s" % (gunicorn, python)
    if _stopping.is_set():
        raise SystemExit(1)
    print("=== [%d/%d] %s: preparing its venv" % (number, total, label), flush=True)
    started = time.monotonic()
    venv = prepare(gunicorn, python, wheel)
    junit = os.path.join(venv, "junit.xml")
    if os.path.exists(junit):
        os.remove(junit)
    paths = test_paths(extra, load)
    if not paths:
        what = "named tests"
    else:
        what = "load: " + ", ".join(load) if load else "no load tests"
    print("=== [%d/%d] %s: testing" % (number, total, label), flush=True)
    # A short private base for pytest's tmp_path: unix socket paths must stay under
    # 108 bytes, and cells running side by side must not share pytest's numbering.
    basetemp = tempfile.mkdtemp(prefix="sgm-")
    try:
        # The venv's pytest script, not ``python -m pytest``: the source tree must not
        # shadow the installed package on sys.path. In a session of its own: a signal to
        # the matrix ends it and its servers (``_on_signal``), not only some of them.
        with _running_lock:
            if _stopping.is_set():
                raise SystemExit(1)
            proc = subprocess.Popen(
                [os.path.join(venv, "bin", "pytest"), "-q", "-p", "no:cacheprovider",
                 "-rfEs", "--basetemp", os.path.join(basetemp, "t"), "--junitxml", junit,
                 "-o", "junit_family=xunit1"] + paths + extra,
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            _running.add(proc)
        try:
            out = proc.communicate()[0]
        finally:
            with _running_lock:
                _running.discard(proc)
    finally:
        shutil.rmtree(basetemp, ignore_errors=True)
    cell = count(junit)
    line = "%-32s %3d passed, %d failed, %d skipped  (%ds, %s)" % (
        label, cell["passed"], cell["failed"], cell["skipped"], time.monotonic() - started,
        what)
    output = out.decode("utf-8", "replace")
    return cell, line, "\n=== [%d/%d] %s\n%s" % (number, total, label, output)


def test_paths(extra, load=ALL_LOAD):
    """The whole suite with the files of tests/load/ named in ``load``, unless the extra
    pytest arguments name tests themselves (``tests/test_patch.py``,
    ``tests/test_x.py::test_y``, a directory): then those, whatever ``load`` says."""
    for arg in extra:
        if not arg.startswith("-") and os.path.exists(os.path.join(ROOT, arg.split("::")[0])):
            return []
    tests = os.path.join(ROOT, "tests")
    paths = [tests]
    for name in ALL_LOAD:
        if name not in load:
            paths += ["--ignore", os.path.join(tests, "load", name)]
    return paths


_CELL = re.compile(r"^(\d+\.\d+(?:\.\d+)?)-(3\.\d+)$")


def parse_cells(text):
    """``"19.6.0-3.6,27.0.1-3.13"`` -> ``[("19.6.0", "3.6"), ("27.0.1", "3.13")]``."""
    cells = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _CELL.match(item)
        if not match:
            raise argparse.ArgumentTypeError(
                "%r is not a gunicorn-python cell such as 19.6.0-3.6" % item)
        cells.append(match.groups())
    if not cells:
        raise argparse.ArgumentTypeError("no cell given")
    return cells


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=parse_cells,
                        help="comma-separated gunicorn-python cells, e.g. 19.6.0-3.6; "
                             "any released gunicorn and installed Python, not only the "
                             "matrix's (default: %s)" % ",".join("-".join(c) for c in CELLS))
    parser.add_argument("--jobs", type=int, default=2,
                        help="cells run side by side (default 2; each cell's output is "
                             "printed whole when it ends)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--load", action="store_true",
                      help="run all of tests/load/ on every cell (default: %s)"
                      % "; ".join("%s on %s" % ("-".join(c), "+".join(f))
                                  for c, f in sorted(LOAD_CELLS.items())))
    load.add_argument("--no-load", action="store_true", help="run tests/load/ on no cell")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    cells = args.cells or CELLS
    for _, python in cells:
        find_python(python)  # a missing interpreter fails here, before any venv is built
    stop_cells_on_signals()
    with built_wheel() as wheel:
        return _run_cells(args, cells, wheel, extra)


def load_for(args, cell):
    """The load test files a cell runs under these options."""
    if args.no_load:
        return ()
    return ALL_LOAD if args.load else LOAD_CELLS.get(cell, ())


def _run_cells(args, cells, wheel, extra):
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    summary = {}
    with futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {pool.submit(run_cell, number, len(cells), gunicorn, python, wheel, extra,
                               load_for(args, (gunicorn, python))):
                   number for number, (gunicorn, python) in enumerate(cells, 1)}
        for done in futures.as_completed(running):
            cell, line, output = done.result()
            print(output, flush=True)
            for key in totals:
                totals[key] += cell[key]
            summary[running[done]] = line
    print("\n=== matrix summary")
    for number in sorted(summary):
        print(summary[number])
    print("matrix: %(passed)d passed, %(failed)d failed, %(skipped)d skipped" % totals)
    return 1 if totals["failed"] or not totals["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
