"""Per-worker fd count under restarts: never more than the stock worker (workers
forked while the arbiter's count was discounted kept the retiring
siblings' heartbeat files, and every worker inherited the announcement pipe)."""
import os
import threading
import time


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


#: A leak is held for a worker's life; a child still holding its siblings' heartbeat
#: files between fork and gunicorn's closing them is not one. So a worker counts only
#: once its app is imported (``SAFE_GTHREAD_APP_READY_DIR``: long after gunicorn closed
#: them; on a loaded CI machine the instant after fork once lasted over 0.25 s), and an
#: fd only once held this long.
HELD_FOR = 0.25


def held(first_seen, table, arbiter_targets, now):
    """How many fds a worker inherited from the arbiter and has held for ``HELD_FOR``
    seconds: the leak class once found here (siblings' heartbeat files, the arbiter's pipes
    and sockets). A worker needs a few (stdio, the log, the listeners, its own
    heartbeat file); what it opens itself (its poller, pool pipes, client connections)
    depends on how long it lived and where the load went, not on what it leaks.
    ``anon_inode`` targets (the arbiter's inotify, a poller) count too: they look alike
    by name, but a stock worker's count has the same ones."""
    return sum(1 for fd, target in table.items()
               if target in arbiter_targets
               and now - first_seen.get((fd, target), now) >= HELD_FOR)


def most_fds_under_churn(gunicorn_server, ready_dir, worker, max_requests=3):
    # Stock 19.6.0 loses its socket at the first restart: its control runs guarded.
    server = gunicorn_server(worker, workers=3, threads=2, max_requests=max_requests,
                             keepalive=2, guard=worker == "stock" and STOCK_WORKERS_UNLINK)
    most, stop = [0], threading.Event()

    def sample():
        first_seen = {}  # pid -> {(fd, target): when first seen}
        while not stop.wait(0.02):
            arbiter_targets = set(fd_table(server.proc.pid).values())
            now = time.monotonic()
            for pid in _procs.children(server.proc.pid):
                if not os.path.exists(os.path.join(ready_dir, str(pid))):
                    continue  # not booted yet
                table = fd_table(pid)
                seen = first_seen.setdefault(pid, {})
                for item in table.items():
                    seen.setdefault(item, now)
                most[0] = max(most[0], held(seen, table, arbiter_targets, now))

    thread = threading.Thread(target=sample)
    thread.daemon = True
    thread.start()
    try:
        if max_requests:
            result = _load.run_load(server.sock_path, seconds=60, concurrency=4,
                                    keepalive_share=0.0, stop=lambda: server.restarts() >= 30)
        else:
            result = _load.run_load(server.sock_path, seconds=2, concurrency=4,
                                    keepalive_share=0.0)
    finally:
        stop.set()
        thread.join()
    assert server.restarts() >= (30 if max_requests else 0), (result.as_dict(), server.log())
    return most[0], result, server


def test_a_safe_worker_holds_no_more_fds_than_a_stock_one(gunicorn_server, tmp_path,
                                                          monkeypatch):
    ready_dir = str(tmp_path / "ready")
    os.mkdir(ready_dir)
    monkeypatch.setenv("SAFE_GTHREAD_APP_READY_DIR", ready_dir)
    # Under this churn a stock worker lives a few milliseconds, often too short for two
    # samples: a stock worker at rest (same workers, no restarts) is the steadier
    # control of what a worker inherits (on 19.6 - 19.8 that includes the heartbeat
    # files of the siblings forked before it).
    stock_churn, _, _ = most_fds_under_churn(gunicorn_server, ready_dir, "stock")
    stock_rest, _, _ = most_fds_under_churn(gunicorn_server, ready_dir, "stock", max_requests=0)
    safe, result, server = most_fds_under_churn(gunicorn_server, ready_dir, "safe")
    stock = max(stock_churn, stock_rest)
    print("most inherited fds per worker: stock %d (churn %d, rest %d), safe %d"
          % (stock, stock_churn, stock_rest, safe))
    assert safe <= stock, (safe, stock, server.log())
    assert result.failed == 0, (result.as_dict(), server.log())
