"""Per-worker fd count under restarts: never more than the stock worker (issue 10,
defect 2: workers forked while the arbiter's count was discounted kept the retiring
siblings' heartbeat files, and every worker inherited the announcement pipe)."""
import os
import threading

import pytest

from safe_gthread.check import load as _load, procs as _procs
from versions import STOCK_WORKERS_UNLINK


def fd_table(pid):
    """``{fd: target}`` of ``pid`` now (empty once it is gone)."""
    table = {}
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                table[fd] = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                pass
    except OSError:
        pass
    return table


def held(before, now, arbiter_sockets):
    """The fds a worker held across two samples 20 ms apart, per-connection ones left
    out. A leak is held for the worker's life; what is open for an instant is not one
    (the instant of fork, when a child still has every sibling's heartbeat file before
    gunicorn closes them; a module being imported; ``/proc/self/statm`` read for the
    retirement line). Client connections and the temporary selectors gunicorn 27's pool
    threads open while they wait for a request (``anon_inode:[eventpoll]``, alike by
    name) depend on where the load went at that instant, not on what a worker leaks.
    Files (siblings' heartbeat files), pipes and the sockets the arbiter also holds
    (listeners, anything it would leak into its children) count."""
    return sum(1 for fd, target in now.items()
               if before.get(fd) == target
               and ((target.startswith("socket:") and target in arbiter_sockets)
                    or not target.startswith(("socket:", "anon_inode:"))))


def most_fds_under_churn(gunicorn_server, worker):
    # Stock 19.6.0 loses its socket at the first restart: its control runs guarded.
    server = gunicorn_server(worker, workers=3, threads=2, max_requests=3, keepalive=2,
                             guard=worker == "stock" and STOCK_WORKERS_UNLINK)
    most, stop = [0], threading.Event()

    def sample():
        previous = {}
        while not stop.wait(0.02):
            arbiter_sockets = set(fd_table(server.proc.pid).values())
            tables = {pid: fd_table(pid) for pid in _procs.children(server.proc.pid)}
            for pid, table in tables.items():
                if pid in previous:
                    most[0] = max(most[0], held(previous[pid], table, arbiter_sockets))
            previous = tables

    thread = threading.Thread(target=sample)
    thread.daemon = True
    thread.start()
    try:
        result = _load.run_load(server.sock_path, seconds=60, concurrency=4, keepalive_share=0.0,
                                stop=lambda: server.restarts() >= 30)
    finally:
        stop.set()
        thread.join()
    assert server.restarts() >= 30, (result.as_dict(), server.log())
    return most[0], result, server


def test_a_safe_worker_holds_no_more_fds_than_a_stock_one(gunicorn_server):
    stock, _, _ = most_fds_under_churn(gunicorn_server, "stock")
    safe, result, server = most_fds_under_churn(gunicorn_server, "safe")
    print("most fds per worker: stock %d, safe %d" % (stock, safe))
    assert safe <= stock, (safe, stock, server.log())
    assert result.failed == 0, (result.as_dict(), server.log())
