"""tests/matrix.py itself: a signal to it ends its cells and their servers (issue 18 k)."""
import os
import signal
import subprocess
import sys
import time

import pytest

import matrix

#: A cell's pytest, in miniature: it starts a "server" in a session of its own, as the
#: gunicorn_server fixture does, says its pid, and runs on.
CELL = """
import subprocess, sys, time
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                          start_new_session=True)
print(server.pid, flush=True)
time.sleep(120)
"""

#: The matrix, in miniature: its own signal handling around one running cell.
DRIVER = """
import subprocess, sys, time
sys.path.insert(0, %r)
import matrix
matrix.stop_cells_on_signals()
cell = subprocess.Popen([sys.executable, "-c", %r], stdout=subprocess.PIPE,
                        start_new_session=True)
matrix._running.add(cell)
print(cell.stdout.readline().decode().strip(), flush=True)
time.sleep(120)
"""


def _gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_matrix_ends_its_cells_servers(sig):
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER % (os.path.dirname(matrix.__file__), CELL)],
        stdout=subprocess.PIPE, start_new_session=True)
    server = None
    try:
        server = int(driver.stdout.readline())
        os.kill(driver.pid, sig)
        driver.wait(30)
        deadline = time.monotonic() + 10
        while not _gone(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(server), "the cell's server outlived the matrix"
    finally:
        for pid in (server, driver.pid):
            if pid and not _gone(pid):
                os.killpg(pid, signal.SIGKILL)
        driver.stdout.close()
        driver.wait()
