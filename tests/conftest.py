import os
import shutil

import pytest

from safe_gthread.check import procs as _procs
from safe_gthread.check.runner import Gunicorn


@pytest.fixture
def gunicorn_server(tmp_path):
    """Factory: ``gunicorn_server("safe", max_requests=20)`` starts a real gunicorn on a unix
    socket in ``tmp_path``; every server it started is ended when the test ends. ``files``
    are copied into the server's directory (its ``--chdir``) first, e.g. an app module
    served with ``app="web:app"``; ``config`` lines are added to its config file (server
    hooks)."""
    started = []

    def start(worker_class="safe", wait=True, files=(), config=(), **settings):
        directory = tmp_path / ("server%d" % len(started))
        directory.mkdir()
        for path in files:
            shutil.copy(path, str(directory))
        server = Gunicorn(directory, worker_class, **settings)
        if config:
            with open(server.config_path, "a") as fh:
                fh.write("\n".join(config) + "\n")
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.stop()


def require_tool(name):
    """Skip when a tool is missing on a laptop; fail under CI, where .ci/run installs it."""
    path = _procs.find_executable(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is not installed; .ci/run should have installed it" % name)
        pytest.skip("%s is not installed" % name)
    return path


def require_root():
    """Switching users needs root: skip on a laptop, fail under CI (which runs as root)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the tests as root: this test switches users")
        pytest.skip("needs root to switch users")


#: Test modules that start servers, proxies or builds without the gunicorn_server fixture.
_PROCESS_MODULES = ("test_check", "test_docs", "test_examples", "test_packaging",
                    "test_upstream", "test_load_restarts")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: starts real processes (gunicorn, proxies, builds); "
        "-m 'not e2e' runs only the in-process unit tests, in seconds")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "")
        if ("gunicorn_server" in getattr(item, "fixturenames", ())
                or module.rsplit(".", 1)[-1] in _PROCESS_MODULES):
            item.add_marker(pytest.mark.e2e)
