"""Every way a worker or the arbiter ends: who keeps the file, who removes it.

Stops (TERM, INT, QUIT) remove the file; everything that only replaces workers (HUP,
TTIN, TTOU, a worker killed with SIGKILL) keeps it, the same inode, still serving.
The stock worker is the control; on gunicorn 19.6.0 HUP and TTOU must lose the file.
"""
import os
import signal

import pytest

from versions import STOCK_HUP_LOGS_SIGTERM_ERROR, STOCK_WORKERS_UNLINK


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGQUIT"])
@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_stop_removes_the_socket(gunicorn_server, worker, sig):
    server = gunicorn_server(worker)
    assert server.inode() is not None
    server.signal(getattr(signal, sig))
    server.wait_exit()
    assert server.inode() is None, server.log()
    if worker == "safe":
        assert server.tracebacks() == 0, server.log()
        assert "FileNotFoundError" not in server.log()
    elif STOCK_WORKERS_UNLINK and sig == "SIGTERM":
        # The control: every stock 19.6.0 worker finds the file gone and says so.
        assert "FileNotFoundError" in server.log(), server.log()


def _ttin_ttou(server):
    workers = server.settings["workers"]
    server.signal(signal.SIGTTIN)
    server.wait_for(lambda: len(server.worker_pids()) == workers + 1, 20, "a worker after TTIN")
    server.wait_ready()
    server.signal(signal.SIGTTOU)
    server.wait_for(lambda: len(server.worker_pids()) == workers, 20,
                    "a worker to exit after TTOU")


def _kill_worker(server):
    booted = server.booted()
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    server.wait_for(lambda: server.booted() > booted, 20, "a replacement after SIGKILL")


SCENARIOS = {"SIGHUP": lambda server: server.reload(), "SIGTTIN+SIGTTOU": _ttin_ttou,
             "worker SIGKILL": _kill_worker}
#: What the stock 19.6.0 worker does to the file (the bug this library fixes).
STOCK_19_6_LOSES = {"SIGHUP", "SIGTTIN+SIGTTOU"}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_worker_replacement_keeps_the_socket(gunicorn_server, worker, scenario):
    server = gunicorn_server(worker)
    inode = server.inode()
    SCENARIOS[scenario](server)
    if worker == "stock" and STOCK_WORKERS_UNLINK and scenario in STOCK_19_6_LOSES:
        server.wait_for(lambda: server.inode() is None, 10, "the control to lose the socket")
        return
    assert server.inode() == inode, server.log()
    server.wait_for(server.serves, 10, "the server to answer")
    if worker == "safe":
        assert server.tracebacks() == 0, server.log()
    # A clean stop still removes it.
    server.signal(signal.SIGTERM)
    server.wait_exit()
    assert server.inode() is None, server.log()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_a_hup_logs_no_error(gunicorn_server, worker):
    """An ordinary deploy: no ERROR. gunicorn 21 - 23 TERM the old workers again and
    again while they exit, and a late one kills a worker in its interpreter's shutdown:
    stock logs "Worker (pid:N) was sent SIGTERM!" (the control, which may need a few
    HUPs to show it); the safe worker ignores SIGTERM once its loop is over."""
    if STOCK_WORKERS_UNLINK and worker == "stock":
        pytest.skip("the stock 19.6.0 worker loses the socket at a HUP (the control above)")
    server = gunicorn_server(worker, workers=4)
    expect_error = worker == "stock" and STOCK_HUP_LOGS_SIGTERM_ERROR
    for _ in range(8 if expect_error else 3):
        server.reload()
        if expect_error and "was sent SIGTERM" in server.errorlog():
            break
    server.wait_for(server.serves, 10, "the server to answer")
    errors = [line for line in server.errorlog().splitlines() if "[ERROR]" in line]
    if expect_error:
        assert any("was sent SIGTERM!" in line for line in errors), server.log()
    else:
        assert errors == [], server.log()
