"""``safe_gthread.Worker``: gunicorn's gthread worker that keeps the socket and every request."""
import logging
import selectors
import socket
import time
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

from . import _compat, _handoff, guard
from ._version import __version__

#: How long a retiring worker keeps an idle kept-alive or parked connection open for
#: a request the client may already be sending (gunicorn 27.0.1's STOP_KEEPALIVE_LINGER).
RETIRE_LINGER = 2.0

#: How long a closing connection may take to read what the peer still sends, after our
#: FIN, before it is closed: closing with unread data would turn into a reset.
CLOSE_DRAIN = 0.5

_announced = []


class _AnnounceRetirement(object):
    """gunicorn >= 27.0.1: its own stop path loses nothing; only bring the successor early."""

    def set_accept_enabled(self, enabled):
        super(_AnnounceRetirement, self).set_accept_enabled(enabled)
        if not enabled and not self.alive:
            self._retirement_started()

    def _retirement_started(self):
        _handoff.announce_retirement(self)


class _LingerWhileRetiring(_AnnounceRetirement):
    """gunicorn 24.0 - 27.0.0: give the method-queue loop 27.0.1's stop path.

    Their stop path closes a connection whose response had just promised keep-alive
    (the client may already have sent its next request on it), and waits for idle
    kept-alive connections without ever closing them until ``graceful_timeout``.
    Here, as in 27.0.1, such a connection is kept for one more request, answered with
    ``Connection: close``, and every kept-alive connection is closed once idle for
    ``RETIRE_LINGER``. 27.0.0 instead closes every kept-alive connection at once when
    its in-flight requests are done; there the same lingering runs first.
    """

    _linger_until = None

    def _linger_deadline(self):
        # Set on the first sign of retirement: a response finished after ``alive``
        # went False may come before the loop has even noticed.
        if self._linger_until is None:
            self._linger_until = time.monotonic() + RETIRE_LINGER
            for conn in self.keepalived_conns:  # one deadline for all keeps them sorted
                conn.timeout = min(conn.timeout, self._linger_until)
        return self._linger_until

    def _retirement_started(self):
        self._linger_deadline()
        super(_LingerWhileRetiring, self)._retirement_started()

    def finish_request(self, conn, fs):
        # Stock files a kept-alive connection only ``if result and self.alive``, tested
        # after the response has promised keep-alive: a worker that retires meanwhile
        # closes a connection the client may already be reusing. File every one here.
        if fs.cancelled() or fs.exception() is not None:
            return super(_LingerWhileRetiring, self).finish_request(conn, fs)
        result = fs.result()
        if not result or result is _compat.GTHREAD_DEFER:
            return super(_LingerWhileRetiring, self).finish_request(conn, fs)
        try:
            conn.sock.setblocking(False)
            conn.set_timeout()
            if not self.alive:
                conn.timeout = min(conn.timeout, self._linger_deadline())
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))
        except (OSError, ValueError, KeyError):
            self.nr_conns -= 1
            conn.close()

    if _compat.STOP_CLOSES_KEPT_ALIVE_AT_ONCE:
        def murder_keepalived(self, force=False):
            if force and not self.alive:
                self._linger_before_closing()
            return super(_LingerWhileRetiring, self).murder_keepalived(force=force)

        def _linger_before_closing(self):
            """Serve what still arrives on kept-alive connections until each has carried
            one more request or reached the linger deadline (within ``graceful_timeout``
            of the stop), as 27.0.1's stop loop does."""
            graceful_until = (self._linger_deadline() - RETIRE_LINGER
                              + self.cfg.graceful_timeout)
            while self.nr_conns > 0 and time.monotonic() < graceful_until:
                self.wait_for_and_dispatch_events(timeout=1.0)
                self.murder_keepalived()
                self.murder_pending()

    def wait_for_and_dispatch_events(self, timeout):
        if not self.alive:
            # The stop path waits up to graceful_timeout for an event; wake up for the
            # next keep-alive expiry instead, and keep telling the arbiter we live.
            # (Once the linger deadline has passed, only a kept-alive expiry still due
            # shortens the wait: in-flight requests must not make it spin.)
            self.notify()
            now = time.monotonic()
            timeout = min(timeout, 1.0)
            if self._linger_deadline() > now:
                timeout = min(timeout, self._linger_deadline() - now)
            if self.keepalived_conns:
                timeout = min(timeout, max(self.keepalived_conns[0].timeout - now, 0.0))
        return super(_LingerWhileRetiring, self).wait_for_and_dispatch_events(timeout)


class _RetireWithoutLoss(object):
    """gunicorn 19.x - 23.x: retire the way 27.0.1 does, dropping nothing.

    The stock loop of these versions, once ``alive`` is False, closes its poller and
    forgets every kept-alive connection (and, from 21.0, every accepted connection it
    had parked until readable), although the proxy may already have sent a request
    on it; 20.x - 23.x also close at once a connection whose response had just
    promised keep-alive. h2o answers those requests with 502; nginx retries a GET
    elsewhere but not a POST.

    Here the stock loop and its tail still run unchanged (stop accepting, close the
    listeners, wait for in-flight requests), but the poller's close is deferred: after
    the tail, every connection still registered is served one more request, answered
    with ``Connection: close``, or closed gracefully once idle for ``RETIRE_LINGER``.
    """

    def run(self):
        poller = self.poller
        # An instance attribute: the stock tail's ``self.poller.close()`` lands here,
        # and no other poller call pays for an indirection.
        poller.close = self._loop_ended
        try:
            super(_RetireWithoutLoss, self).run()
            self._serve_remaining()
        finally:
            del poller.close
            poller.close()

    def _loop_ended(self):
        # The loop has ended; the tail closes the listeners next. Unregister them first:
        # epoll watches the open file, which the arbiter and our siblings still hold.
        for listener in self.sockets:
            try:
                self.poller.unregister(listener)
            except (KeyError, ValueError, OSError):
                pass
        # From now on every response says "Connection: close" (handle_request's own test).
        self.max_keepalived = 0
        _handoff.announce_retirement(self)

    def finish_request(self, fs):
        if fs.cancelled() or fs.exception() is not None:
            return super(_RetireWithoutLoss, self).finish_request(fs)
        keepalive, conn = fs.result()
        if not keepalive:
            return super(_RetireWithoutLoss, self).finish_request(fs)
        # The response promised keep-alive, so the client may be sending its next request
        # already (RFC 9112 section 9.6). 20.x - 23.x file the connection only ``if
        # keepalive and self.alive``, tested after that promise, and close it when the
        # worker retired meanwhile; file it whatever ``alive`` says, as 27.0.1 does.
        try:
            conn.sock.setblocking(False)
            conn.set_timeout()
            with self._lock:
                self._keep.append(conn)
                self.poller.register(conn.sock, selectors.EVENT_READ,
                                     partial(getattr(self, _compat.KEEPALIVE_CALLBACK), conn))
        except (OSError, ValueError, KeyError):
            self.nr_conns -= 1
            conn.close()

    def _new_thread_pool(self):
        if _compat.HAS_GET_THREAD_POOL:
            return self.get_thread_pool()
        return futures.ThreadPoolExecutor(max_workers=self.cfg.threads)

    def _serve_remaining(self):
        # The stock tail shut its pool down without waiting: its threads may still be
        # running done-callbacks (finish_request). Serve with a new pool meanwhile.
        pools = [self.tpool]
        self.tpool = self._new_thread_pool()
        start = time.time()  # the legacy loop's connection timeouts use time.time()
        linger_until = start + RETIRE_LINGER
        deadline = start + self.cfg.graceful_timeout
        try:
            while True:
                self.notify()
                for fut in [fut for fut in self.futures if fut.done()]:
                    self.futures.remove(fut)
                now = time.time()
                waiting = self._waiting_connections()
                expired = [conn for conn in waiting
                           if min(conn.timeout or linger_until, linger_until) <= now]
                self._forget(expired)
                if now >= deadline:
                    break
                if len(expired) == len(waiting) and not self.futures:
                    # A future is done before its done-callback (finish_request) has
                    # run, and that may still keep its connection for one more
                    # request: let every pool's threads finish, then look again.
                    pools.append(self.tpool)
                    for pool in pools:
                        pool.shutdown(wait=True)
                    if all(conn in expired for conn in self._waiting_connections()):
                        break  # nothing new was filed meanwhile
                    self.tpool = self._new_thread_pool()
                    continue
                if len(expired) == len(waiting):
                    # Only requests in flight: their end does not wake the poller.
                    futures.wait(self.futures, timeout=min(1.0, deadline - now),
                                 return_when=futures.FIRST_COMPLETED)
                    continue
                timeout = min(1.0, max(linger_until - now, 0.0), deadline - now)
                if self.futures:
                    timeout = min(timeout, 0.05)
                for key, _ in self.poller.select(timeout):
                    key.data(key.fileobj)
            self._forget(self._waiting_connections())
        finally:
            self.tpool.shutdown(wait=False)

    def _waiting_connections(self):
        """The connections still registered with the poller, each waiting for a request."""
        conns = []
        for key in list(self.poller.get_map().values()):
            callback = key.data
            if isinstance(callback, partial) and callback.args:
                conns.append(callback.args[0])
        return conns

    def _forget(self, conns):
        if not conns:
            return
        with self._lock:
            for conn in conns:
                try:
                    self.poller.unregister(conn.sock)
                except (KeyError, ValueError, OSError):
                    pass
                try:
                    self._keep.remove(conn)
                except ValueError:
                    pass
                self.nr_conns -= 1
        close_gracefully([conn.sock for conn in conns])


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


#: The retirement this gunicorn's gthread loop needs, chosen once.
_Retirement = {
    "legacy": _RetireWithoutLoss,
    "method-queue": _LingerWhileRetiring,
    "graceful": _AnnounceRetirement,
}[_compat.GTHREAD_GENERATION]


class Worker(_Retirement, ThreadWorker):
    """gunicorn's threaded worker (``gthread``) that neither deletes the unix socket nor
    drops a request when it restarts.

    Use it with ``worker_class = "safe_gthread.Worker"`` or ``-k safe_gthread.Worker``;
    every gthread setting (``threads``, ``keepalive``, ``max_requests``,
    ``graceful_timeout``) means what it means for the stock worker.

    - When gunicorn loads the class (in the arbiter, before it binds), it installs
      :mod:`safe_gthread.guard`: only the arbiter that bound the socket removes it,
      at its own stop, and only if the path is still that socket.
    - A worker that retires (``max_requests``, HUP, TERM) stops accepting at once,
      finishes what it accepted and answers one more request on each kept-alive
      connection with ``Connection: close`` (gunicorn 24 and later do this themselves).
    - A worker that retires for ``max_requests`` gets its successor forked at once,
      instead of after it has exited.
    """

    @classmethod
    def setup(cls):
        parent = getattr(super(Worker, cls), "setup", None)
        if parent is not None:
            parent()
        guard.install()
        _handoff.install()
        if not _announced:
            _announced.append(True)
            logging.getLogger("gunicorn.error").info(
                "safe-gthread %s on gunicorn %s (Python %s): %s.", __version__,
                _compat.GUNICORN_VERSION, _compat.PYTHON_VERSION,
                "; ".join(_compat.protections()))
