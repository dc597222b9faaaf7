"""Pipelined requests: three requests in one write on one connection.

The stock worker is the control. gunicorn 19.x - 26.x answer only the first: the other
two are already in the parser's buffer, which never wakes the poller, so they wait for
the keep-alive timeout, which closes the connection unanswered. 27.0.0 and later answer
all three. ``safe_gthread.Worker`` must answer all three, in order, on every gunicorn,
and also when the worker retires in the middle of the batch: then the last response says
``Connection: close`` (stock, even 27.0.1, closes after the retiring response and drops
the rest).

A raw unix-socket client, so that the three requests really leave in one write. No
timing is asserted: a worker that stalls shows it by closing the connection at its
keep-alive timeout with responses missing.
"""
import signal
import socket
import time

import pytest

from versions import STOCK_ANSWERS_PIPELINED, STOCK_ANSWERS_PIPELINED_WHILE_RETIRING

KEEPALIVE = 3  # seconds: how long a stalled batch waits before the server closes

BATCH = (b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n"
         b"POST /second HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
         b"GET /third HTTP/1.1\r\nHost: localhost\r\n\r\n")

#: What the bundled app answers to each, in order (a POST answers its body's length).
BODIES = [b"Hello World", b"5 bytes", b"Hello World"]

#: Bound on one batch: far above the keep-alive timeout, so only a hung server hits it.
DEADLINE = 30.0


def _parse(buf):
    """The complete responses at the start of ``buf`` and what follows them."""
    responses = []
    while b"\r\n\r\n" in buf:
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        responses.append((int(lines[0].split(" ", 2)[1]), headers, rest[:length]))
        buf = rest[length:]
    return responses, buf


def send_batch(path):
    """Send ``BATCH`` in one write; read until three responses came or the server closed.

    Returns ``(responses, closed)``: ``closed`` is True when the server ended the
    connection (EOF or reset) after the responses read.
    """
    deadline = time.monotonic() + DEADLINE
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(DEADLINE)
        sock.connect(path)
        sock.sendall(BATCH)
        buf, responses = b"", []
        while True:
            responses, rest = _parse(buf)
            if len(responses) == len(BODIES):
                break
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no answer and no close in %ss: %r" % (DEADLINE, responses)
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return responses, True
            if not data:
                return responses, True
            buf += data
        # All three answered: does the server close now (it said so) or keep it open?
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            closed = sock.recv(1) == b""
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        return responses, closed
    finally:
        sock.close()


def connection_header(response):
    return response[1].get("connection", "").lower()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_pipelined_requests_are_answered_in_order(gunicorn_server, worker):
    server = gunicorn_server(worker, workers=1, threads=2, keepalive=KEEPALIVE)
    responses, closed = send_batch(server.sock_path)
    bodies = [body for _, _, body in responses]
    if worker == "stock" and not STOCK_ANSWERS_PIPELINED:
        # The control shows the bug: one answer, then the keep-alive timeout's close.
        assert bodies == BODIES[:1], (responses, server.log())
        assert closed, responses
        return
    assert bodies == BODIES, (responses, server.log())
    assert all(status == 200 for status, _, _ in responses), responses
    # Not retiring: every response keeps the connection, which stays open.
    assert [connection_header(r) for r in responses] == ["keep-alive"] * 3, responses
    assert server.serves()
    if worker == "safe":
        assert server.tracebacks() == 0, server.log()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_pipelined_requests_are_answered_while_retiring(gunicorn_server, worker):
    # The readiness probe was the worker's first request, so the batch's first request
    # (or its second) reaches max_requests: the worker asks to retire in the middle of it
    # (stock stops at once; the safe worker serves on until its successor is ready).
    server = gunicorn_server(worker, workers=1, threads=2, keepalive=KEEPALIVE,
                             max_requests=2)
    responses, closed = send_batch(server.sock_path)
    bodies = [body for _, _, body in responses]
    if worker == "stock":
        assert not STOCK_ANSWERS_PIPELINED_WHILE_RETIRING
        assert len(bodies) < len(BODIES), (responses, server.log())
        assert bodies == BODIES[:len(bodies)], responses
        assert closed, responses
        return
    assert bodies == BODIES, (responses, server.log())
    assert all(status == 200 for status, _, _ in responses), responses
    # Each response keeps the connection for the request already sent behind it. The
    # worker retires when its successor is ready (the scheduler), often after the batch:
    # then the last response keeps it too and the retirement closes it once idle; if it
    # retires during the batch, the last one says close. Never an earlier one.
    headers = [connection_header(r) for r in responses]
    assert headers[:-1] == ["keep-alive", "keep-alive"], responses
    assert headers[-1] in ("keep-alive", "close"), responses
    assert closed, responses
    server.wait_for(lambda: server.exited() >= 1, 30, "the retired worker to exit")
    server.wait_for(server.serves, 30, "the successor to serve")
    assert server.tracebacks() == 0, server.log()


@pytest.mark.parametrize("worker", ["stock", "safe"])
def test_pipelined_requests_are_answered_across_a_reload(gunicorn_server, monkeypatch, worker):
    """HUP while a batch is in flight: the old worker is told to stop (SIGTERM) while it
    serves the second request, the third already read behind it."""
    monkeypatch.setenv("SAFE_GTHREAD_APP_SLEEP", "1")  # each request takes a second
    server = gunicorn_server(worker, workers=1, threads=2, keepalive=KEEPALIVE)
    old = set(server.worker_pids())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(DEADLINE)
        sock.connect(server.sock_path)
        sock.sendall(BATCH)
        buf, responses, closed = b"", [], False
        deadline = time.monotonic() + DEADLINE
        hup_sent = False
        while len(responses) < len(BODIES):
            if responses and not hup_sent:
                server.signal(signal.SIGHUP)  # the second request is being served
                hup_sent = True
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                closed = True
                break
            buf += data
            responses, _ = _parse(buf)
        if not closed:  # the retiring worker closes it: at once, or after its linger
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
    finally:
        sock.close()
    bodies = [body for _, _, body in responses]
    assert bodies == BODIES[:len(bodies)], responses
    assert closed, responses
    server.wait_for(lambda: not old.intersection(server.worker_pids()), 30,
                    "the old worker to exit after HUP")
    if worker == "stock":
        if not STOCK_ANSWERS_PIPELINED:
            assert bodies == BODIES[:1], (responses, server.log())
        return
    assert bodies == BODIES, (responses, server.log())
    assert server.serves()
    assert server.tracebacks() == 0, server.log()
