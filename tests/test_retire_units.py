"""In-process unit tests of the retirements (``safe_gthread._retire``), the way gunicorn's
own tests/test_gthread.py tests its worker: socketpairs, fake futures, fake pollers.

A retirement module is written for one gthread generation and can only be exercised
against it: the tests of the other generations skip, naming the gunicorn they need.
"""
import os
import selectors
import socket
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from functools import partial
from unittest import mock

import pytest
from gunicorn.config import Config
from gunicorn.workers import gthread

import safe_gthread
from safe_gthread import _compat
from safe_gthread._retire import _common
from safe_gthread.check.app import app as bundled_app

GENERATION = _compat.GTHREAD_GENERATION

only_legacy = pytest.mark.skipif(
    GENERATION != "legacy",
    reason="the legacy retirement is for gunicorn 19.x - 23.x's futures loop; this is %s"
           % _compat.GUNICORN_VERSION)
overrides_finish_request = pytest.mark.skipif(
    GENERATION not in ("legacy", "method-queue"),
    reason="only the legacy (19.x - 23.x) and method-queue (24.0 - 27.0.0) retirements "
           "override finish_request; this is %s" % _compat.GUNICORN_VERSION)
not_legacy = pytest.mark.skipif(
    GENERATION not in ("method-queue", "graceful"),
    reason="gunicorn 24.0+'s finish_request(conn, fs) runs on the main thread; this is %s"
           % _compat.GUNICORN_VERSION)

GET = b"GET /%s HTTP/1.1\r\nHost: localhost\r\n\r\n"
POST = b"POST /%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")
BATCH = GET % b"1" + POST % b"2" + GET % b"3"


# -- fakes ------------------------------------------------------------------------------
class FakeFuture(object):
    """A done future, as ``finish_request`` receives it."""

    def __init__(self, result=None, exception=None, cancelled=False, conn=None):
        self._result, self._exception, self._cancelled = result, exception, cancelled
        self.conn = conn

    def cancelled(self):
        return self._cancelled

    def exception(self):
        return self._exception

    def result(self):
        if self._exception is not None:
            raise self._exception
        return self._result

    def done(self):
        return True


def make_cfg(**settings):
    cfg = Config()
    base = {"workers": 1, "threads": 2, "worker_connections": 100, "keepalive": 2,
            "graceful_timeout": 5}
    base.update(settings)
    for name, value in base.items():
        cfg.set(name, value)
    return cfg


@pytest.fixture
def worker(tmp_path):
    """``safe_gthread.Worker`` for this gunicorn, its loop's state set up by hand (as
    ``init_process`` would, without running the loop)."""
    made = safe_gthread.Worker(age=1, ppid=os.getpid(), sockets=[], app=mock.Mock(),
                               timeout=30, cfg=make_cfg(), log=mock.Mock())
    made.wsgi = bundled_app
    made.poller = selectors.DefaultSelector()
    made.tpool = futures.ThreadPoolExecutor(max_workers=2)
    if hasattr(made, "_lock"):
        made._lock = threading.RLock()
    yield made
    made.tpool.shutdown(wait=True)
    made.poller.close()
    tmp = getattr(made, "tmp", None)
    if tmp is not None:
        tmp.close()


@pytest.fixture
def pair():
    """A connected unix socketpair: (server side, client side); both closed at the end."""
    server, client = socket.socketpair()
    client.settimeout(10)
    yield server, client
    for sock in (server, client):
        sock.close()


def make_conn(server_sock):
    conn = gthread.TConn(make_cfg(), server_sock, ("127.0.0.1", 12345), ("127.0.0.1", 8000))
    conn.init()  # the parser, as the worker thread creates it
    return conn


def read_responses(client, count):
    """``count`` responses from ``client``: [(connection header, body)]."""
    buf, responses = b"", []
    while len(responses) < count:
        while b"\r\n\r\n" not in buf:
            data = client.recv(65536)
            assert data, "connection closed after %r" % responses
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
        length = int(headers.get(b"content-length", b"0"))
        while len(buf) < length:
            data = client.recv(65536)
            assert data, "connection closed in a body"
            buf += data
        responses.append((headers.get(b"connection", b"").decode(), buf[:length]))
        buf = buf[length:]
    return responses


def finish(worker, conn, keepalive):
    """``finish_request`` as this generation's loop calls it, with a done future."""
    if GENERATION == "legacy":
        return worker.finish_request(FakeFuture(result=(keepalive, conn), conn=conn))
    return worker.finish_request(conn, FakeFuture(result=keepalive))


def kept_alive(worker):
    return list(worker._keep if GENERATION == "legacy" else worker.keepalived_conns)


def handled(result):
    """``handle()``'s keep-alive verdict: 19.x - 23.x return ``(keepalive, conn)``."""
    return result[0] if isinstance(result, tuple) else result


# -- what is buffered -------------------------------------------------------------------
def test_nothing_buffered_after_a_lone_request(pair):
    server, client = pair
    client.sendall(GET % b"a")
    conn = make_conn(server)
    next(conn.parser)
    assert not _compat.conn_request_buffered(conn)


def test_the_next_pipelined_request_is_seen(pair):
    server, client = pair
    client.sendall(GET % b"a" + GET % b"b")
    conn = make_conn(server)
    next(conn.parser)
    assert _compat.conn_request_buffered(conn)


def test_an_unread_body_is_not_a_request(pair):
    server, client = pair
    client.sendall(POST % b"a")
    conn = make_conn(server)
    req = next(conn.parser)
    assert not _compat.conn_request_buffered(conn)  # only its own 5 bytes are buffered
    assert req.body.read() == b"hello"
    assert not _compat.conn_request_buffered(conn)


def test_a_request_behind_a_body_is_seen_read_or_not(pair):
    server, client = pair
    client.sendall(POST % b"a" + GET % b"b")
    conn = make_conn(server)
    req = next(conn.parser)
    assert _compat.conn_request_buffered(conn)
    req.body.read()
    assert _compat.conn_request_buffered(conn)


def test_a_chunked_body_counts_only_once_read_to_its_end(pair):
    server, client = pair
    client.sendall(CHUNKED + GET % b"b")
    conn = make_conn(server)
    req = next(conn.parser)
    assert not _compat.conn_request_buffered(conn)  # where it ends is unknown yet
    assert req.body.read() == b"hello"
    assert _compat.conn_request_buffered(conn)


def test_no_parser_no_buffer():
    assert not _compat.conn_request_buffered(mock.Mock(parser=None))
    assert not _compat.request_buffered(None, None)


# -- close_gracefully -------------------------------------------------------------------
def test_close_gracefully_reads_what_the_peer_still_sends(pair):
    server, client = pair
    client.sendall(b"x" * 4096)  # unread: a plain close() would reset the peer
    client.shutdown(socket.SHUT_WR)
    _common.close_gracefully([server], drain=10.0)
    assert server.fileno() == -1
    data = b""
    while True:
        chunk = client.recv(65536)  # EOF, not ECONNRESET
        if not chunk:
            break
        data += chunk
    assert data == b""


def test_close_gracefully_closes_a_socket_it_cannot_shut_down():
    server, client = socket.socketpair()
    client.close()
    broken = mock.Mock(spec=socket.socket)
    broken.shutdown.side_effect = OSError("not connected")
    _common.close_gracefully([broken, server], drain=1.0)
    broken.close.assert_called_once_with()
    assert server.fileno() == -1


def test_close_gracefully_of_nothing():
    _common.close_gracefully([])


# -- answering pipelined requests while retiring (every generation) ---------------------
def test_alive_reads_stay_plain_attribute_reads(worker):
    assert worker.__dict__["alive"] is True
    assert worker.alive is True
    assert worker.wsgi is bundled_app  # not wrapped before retiring


def test_retiring_wraps_the_app_once(worker):
    worker.alive = False
    wrapped = worker.wsgi
    assert wrapped is not bundled_app
    worker.alive = False
    worker._stop_keeping_alive()
    assert worker.wsgi is wrapped


def _serve_one(worker, conn):
    return handled(worker.handle(conn))


@pytest.mark.skipif(GENERATION is None, reason="an unrecognised gthread loop keeps its own path")
def test_retiring_response_keeps_the_connection_only_for_a_buffered_request(worker, pair):
    server, client = pair
    client.sendall(GET % b"1" + GET % b"2")
    conn = make_conn(server)
    worker.alive = False
    # Legacy serves the whole batch in one call; later generations re-queue between.
    assert _serve_one(worker, conn) or GENERATION == "legacy"
    if GENERATION != "legacy":
        assert not _serve_one(worker, conn)
    assert read_responses(client, 2) == [("keep-alive", b"Hello World"),
                                         ("close", b"Hello World")]


@pytest.mark.skipif(GENERATION is None, reason="an unrecognised gthread loop keeps its own path")
@pytest.mark.parametrize("limit", ["keepalive off", "keepalive cap"])
def test_retiring_without_keepalive_closes_at_once(worker, pair, limit):
    """Also at gunicorn's cap on kept-alive connections (``worker_connections`` -
    ``threads``), which closes through the same ``force_close()`` (issue 18 j: a
    retiring worker overrode it for a buffered request)."""
    if limit == "keepalive off":
        worker.cfg.set("keepalive", 0)
    else:
        worker.max_keepalived = 0
    server, client = pair
    client.sendall(GET % b"1" + GET % b"2")
    conn = make_conn(server)
    worker.alive = False
    assert not _serve_one(worker, conn)
    assert read_responses(client, 1) == [("close", b"Hello World")]


# -- filing a finished request (legacy and method-queue override finish_request) --------
@overrides_finish_request
def test_a_kept_alive_connection_is_filed_even_when_retiring(worker, pair):
    server, _ = pair
    conn = make_conn(server)
    worker.nr_conns = 1
    worker.alive = False
    finish(worker, conn, True)
    assert kept_alive(worker) == [conn]
    assert worker.poller.get_key(server).data.args == (conn,)
    assert worker.nr_conns == 1
    if GENERATION == "method-queue":  # it lingers no longer than the others
        assert conn.timeout <= time.monotonic() + _common.RETIRE_LINGER


@overrides_finish_request
@pytest.mark.parametrize("error", [RuntimeError("unexpected"), KeyError(7), OSError(9, "EBADF")])
def test_finish_request_error_closes_and_uncounts(worker, pair, error):
    """Stock catches every Exception here; so must the overrides, or a connection and
    its count in ``nr_conns`` leak."""
    server, _ = pair
    conn = make_conn(server)
    worker.nr_conns = 1
    worker.poller = mock.Mock(wraps=worker.poller)
    worker.poller.register.side_effect = error
    finish(worker, conn, True)
    assert worker.nr_conns == 0
    assert kept_alive(worker) == []
    assert server.fileno() == -1


@overrides_finish_request
def test_finish_request_closes_a_closing_connection(worker, pair):
    server, client = pair
    client.shutdown(socket.SHUT_WR)  # 24.0+ close gracefully: reading until the peer's EOF
    conn = make_conn(server)
    worker.nr_conns = 1
    finish(worker, conn, False)
    assert worker.nr_conns == 0
    assert server.fileno() == -1


# -- legacy (19.x - 23.x) ---------------------------------------------------------------
@only_legacy
def test_legacy_handle_serves_a_pipelined_batch_in_order(worker, pair):
    server, client = pair
    client.sendall(BATCH)
    conn = make_conn(server)
    keepalive, same = worker.handle(conn)
    assert keepalive and same is conn
    assert read_responses(client, 3) == [("keep-alive", b"Hello World"),
                                         ("keep-alive", b"5 bytes"),
                                         ("keep-alive", b"Hello World")]
    assert not _compat.conn_request_buffered(conn)


@only_legacy
def test_legacy_retiring_serves_the_batch_and_closes_after_the_last(worker, pair):
    server, client = pair
    client.sendall(BATCH)
    conn = make_conn(server)
    worker._stop_keeping_alive()  # the loop has ended (``_loop_ended``), alive or not
    keepalive, _ = worker.handle(conn)
    assert not keepalive
    assert read_responses(client, 3) == [("keep-alive", b"Hello World"),
                                         ("keep-alive", b"5 bytes"),
                                         ("close", b"Hello World")]


class _PausingMap(Mapping):
    """The poller's map, pausing after its first key until told to go on: what a thread
    switch in the middle of the walk does."""

    def __init__(self, real, walking, go_on):
        self._real, self._walking, self._go_on = real, walking, go_on

    def __getitem__(self, key):
        return self._real[key]

    def __len__(self):
        return len(self._real)

    def __iter__(self):
        for number, key in enumerate(self._real):
            yield key
            if number == 0:
                self._walking.set()
                self._go_on.wait(1.0)  # bounded: with the lock held it never comes


@only_legacy
def test_legacy_drain_walks_the_poller_under_the_lock(worker):
    """A pool thread files a kept-alive connection (under ``_lock``, as finish_request
    does) while the drain walks the poller: the walk must not see the dict change size
    (RuntimeError, which ended ``_serve_remaining`` and dropped its connections)."""
    socks = [socket.socketpair() for _ in range(3)]
    try:
        conns = [mock.Mock(sock=pair_[0]) for pair_ in socks]
        for conn in conns[:2]:
            worker.poller.register(conn.sock, selectors.EVENT_READ, partial(print, conn))
        walking, go_on = threading.Event(), threading.Event()
        real_poller = worker.poller
        worker.poller = mock.Mock(wraps=real_poller)
        worker.poller.get_map.side_effect = lambda: _PausingMap(real_poller.get_map(),
                                                                walking, go_on)

        def register_while_walking():
            walking.wait(10)
            with worker._lock:
                real_poller.register(conns[2].sock, selectors.EVENT_READ,
                                     partial(print, conns[2]))
            go_on.set()

        thread = threading.Thread(target=register_while_walking)
        thread.start()
        try:
            waiting = worker._waiting_connections()
        finally:
            go_on.set()
            thread.join(10)
        assert set(waiting) == set(conns[:2])
        assert set(worker._waiting_connections()) == set(conns)
    finally:
        for pair_ in socks:
            for sock in pair_:
                sock.close()


@only_legacy
def test_legacy_drain_ends_within_graceful_timeout_of_the_retirement(worker, pair):
    """The stock tail may have spent the whole graceful_timeout waiting for in-flight
    requests: the drain after it must not start a second one."""
    server, client = pair
    conn = make_conn(server)
    conn.set_timeout()
    worker.nr_conns = 1
    with worker._lock:
        worker._keep.append(conn)
        worker.poller.register(server, selectors.EVENT_READ,
                               partial(getattr(worker, _compat.KEEPALIVE_CALLBACK), conn))
    worker._retirement_began = time.time() - worker.cfg.graceful_timeout
    worker.poller = mock.Mock(wraps=worker.poller)
    worker.notify = mock.Mock()
    worker._serve_remaining()
    assert not worker.poller.select.called  # no waiting at all: the time was spent
    assert worker.nr_conns == 0
    assert list(worker._keep) == []
    assert client.recv(1) == b""  # closed with a FIN


@only_legacy
def test_legacy_drain_that_fails_still_closes_its_connections(worker, pair):
    """An unexpected error in the drain (stock code it calls, a bug of ours) is logged;
    the connections it kept are still closed and uncounted, not left to a reset."""
    server, client = pair
    conn = make_conn(server)
    conn.set_timeout()
    worker.nr_conns = 1

    def broken_callback(conn, sock):
        raise RuntimeError("unexpected")

    with worker._lock:
        worker._keep.append(conn)
        worker.poller.register(server, selectors.EVENT_READ, partial(broken_callback, conn))
    worker._retirement_began = time.time()
    worker.notify = mock.Mock()
    client.sendall(GET % b"1")  # wakes the poller: the callback raises
    worker._serve_remaining()
    assert worker.log.exception.called
    assert worker.nr_conns == 0
    assert list(worker._keep) == []
    assert client.recv(1) == b""


# -- method queue (24.0 - 27.0.0) and graceful (27.0.1+) --------------------------------
@not_legacy
def test_finish_request_requeues_a_pipelined_request(worker, pair):
    server, client = pair
    client.sendall(GET % b"1" + GET % b"2")
    conn = make_conn(server)
    assert _serve_one(worker, conn)
    worker.nr_conns = 1
    worker.enqueue_req = mock.Mock()
    worker.finish_request(conn, FakeFuture(result=True))
    worker.enqueue_req.assert_called_once_with(conn)
    assert conn not in worker.keepalived_conns
    assert worker.nr_conns == 1


@not_legacy
def test_finish_request_files_an_idle_kept_alive_connection(worker, pair):
    server, client = pair
    client.sendall(GET % b"1")
    conn = make_conn(server)
    assert _serve_one(worker, conn)
    worker.nr_conns = 1
    worker.enqueue_req = mock.Mock()
    worker.finish_request(conn, FakeFuture(result=True))
    assert not worker.enqueue_req.called
    assert list(worker.keepalived_conns) == [conn]
    assert worker.poller.get_key(server).data.args == (conn,)
