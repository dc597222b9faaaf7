"""The socket file survives worker restarts under load.

The stock gthread worker is the control: on gunicorn 19.6.0 it must lose the file,
or this test proves nothing.
"""
import pytest

from safe_gthread.check import load as _load
from versions import STOCK_WORKERS_UNLINK

RESTARTS = 50


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_socket_survives_restarts_under_load(gunicorn_server, worker):
    server = gunicorn_server(worker, workers=2, threads=2, max_requests=20)
    inode = server.inode()
    assert inode is not None

    def enough():
        return server.restarts() >= RESTARTS or server.inode() != inode

    result = _load.run_load(server.sock_path, seconds=60, concurrency=8, stop=enough)
    # Give a stock 19.6.0 worker time to show the bug: the file goes with the first restart.
    if worker == "stock" and STOCK_WORKERS_UNLINK:
        server.wait_for(lambda: server.inode() != inode, 10, "the control to lose the socket")
        assert server.inode() is None, server.log()
        assert not server.serves()
        return
    assert server.restarts() >= RESTARTS, (result.as_dict(), server.log())
    assert server.inode() == inode, server.log()
    if worker == "stock":
        # Stock 19.8 - 27.0.0 drops a request caught by a worker's restart (its other
        # bug; once for 21.2.0 and once for 23.0.0 in CI here): the control shows the
        # file kept and the server answering again, not one request's luck.
        server.wait_for(server.serves, 10, "the server to answer")
    else:
        assert server.serves(), server.log()
    if worker == "safe":
        assert server.tracebacks() == 0, server.log()
        assert result.failed == 0, (result.as_dict(), server.log())
