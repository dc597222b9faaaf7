"""What every retirement shares: how long to linger, how to close without a reset, and
how to answer pipelined requests while retiring."""
import selectors
import socket
import time
from functools import partial

from .. import _compat

#: How long a retiring worker keeps an idle kept-alive or parked connection open for
#: a request the client may already be sending (gunicorn 27.0.1's STOP_KEEPALIVE_LINGER).
RETIRE_LINGER = 2.0

#: How long a closing connection may take to read what the peer still sends, after our
#: FIN, before it is closed: closing with unread data would turn into a reset.
CLOSE_DRAIN = 0.5


def close_gracefully(socks, drain=CLOSE_DRAIN):
    """Send FIN on every socket, read what the peers still send for up to ``drain``
    seconds, then close: closing a socket with unread data would reset the peer."""
    open_socks = []
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            open_socks.append(sock)
        except OSError:
            sock.close()
    deadline = time.monotonic() + drain
    with selectors.DefaultSelector() as sel:
        for sock in open_socks:
            sel.register(sock, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(deadline - time.monotonic(), 0.0)):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
    for sock in open_socks:
        sock.close()


class _WatchAlive(object):
    """``worker.alive`` that calls ``worker._stop_keeping_alive()`` when it first turns False.

    A data descriptor without ``__get__``: reading ``alive`` still finds the value in
    the instance's ``__dict__`` (no added work on the request path); only its rare
    writes (``True`` at init, ``False`` when the worker retires, from a signal handler
    or from the ``max_requests`` check inside ``handle_request``) come through here.
    """

    def __set__(self, worker, value):
        was = worker.__dict__.get("alive")
        worker.__dict__["alive"] = value
        if was and not value:
            worker._stop_keeping_alive()

    def __delete__(self, worker):
        del worker.__dict__["alive"]


class AnswerPipelinedWhileRetiring(object):
    """A retiring worker answers the requests a client has already pipelined.

    Once ``alive`` is False, gunicorn 20.0 - 27.0.1's ``handle_request`` answers with
    ``Connection: close`` (19.x only the response that reaches ``max_requests``), and
    the requests the client had already sent behind it on the same connection are
    dropped unanswered. Here, while retiring, a
    response keeps its connection only for a request already read behind it, and says
    ``Connection: close`` otherwise: every pipelined request is answered, the last one
    with ``Connection: close`` (RFC 9112 section 9.3.2, 9.6).

    ``handle_request`` decides by ``resp.force_close()`` before it calls ``self.wsgi``,
    and the headers go out only when the app writes: so the app is wrapped, from the
    moment the worker retires, to set ``resp.must_close`` by what is buffered.
    """

    alive = _WatchAlive()
    _app_before_retiring = None

    def _stop_keeping_alive(self):
        """Wrap the app (once): called when ``alive`` turns False, and by a loop that
        ends for another reason (its parent gone)."""
        app = self.__dict__.get("wsgi")
        if app is None or self._app_before_retiring is not None:
            return
        self._app_before_retiring = app
        self.wsgi = partial(_app_while_retiring, self, app)


def _over_keepalive_cap(worker):
    """gunicorn's own cap on kept-alive connections (``max_keepalived``), which its
    ``handle_request`` enforces with the same ``force_close()`` a retirement sets: a
    response must close there whatever is buffered behind it."""
    kept = getattr(worker, "keepalived_conns", None)  # 24.0 and later
    kept = getattr(worker, "_keep", ()) if kept is None else kept
    cap = getattr(worker, "max_keepalived", None)
    return cap is not None and len(kept) >= cap


def _app_while_retiring(worker, app, environ, start_response):
    resp = getattr(start_response, "__self__", None)
    if _compat.HTTP1_RESPONSE is not None and type(resp) is _compat.HTTP1_RESPONSE:
        req = resp.req
        resp.must_close = not (worker.cfg.keepalive and not _over_keepalive_cap(worker)
                               and _compat.request_buffered(getattr(req, "unreader", None),
                                                            req))
    return app(environ, start_response)
