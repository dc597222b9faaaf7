"""gunicorn 24.0 - 27.0.0 (the method-queue gthread loop): give it 27.0.1's stop path.

This module is tied to one gunicorn generation and should never need to change.
"""
import selectors
import time
from functools import partial

from .. import _compat
from . import graceful
from ._common import RETIRE_LINGER


class Retirement(graceful.Retirement):
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
        super(Retirement, self)._retirement_started()

    def finish_request(self, conn, fs):
        # Stock files a kept-alive connection only ``if result and self.alive``, tested
        # after the response has promised keep-alive: a worker that retires meanwhile
        # closes a connection the client may already be reusing. File every one here.
        if fs.cancelled() or fs.exception() is not None:
            return super(Retirement, self).finish_request(conn, fs)
        result = fs.result()
        if not result or result is _compat.GTHREAD_DEFER:
            return super(Retirement, self).finish_request(conn, fs)
        try:
            if _compat.conn_request_buffered(conn):
                # A request pipelined behind this one is already read: the poller would
                # never wake for it (24.0 - 26.x wait for the keep-alive timeout; 27.0.0
                # makes this same check).
                self.enqueue_req(conn)
                return
            conn.sock.setblocking(False)
            conn.set_timeout()
            if not self.alive:
                conn.timeout = min(conn.timeout, self._linger_deadline())
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))
        except Exception:  # as stock: whatever fails, the connection is closed and counted
            try:
                self.keepalived_conns.remove(conn)
            except ValueError:
                pass
            self.nr_conns -= 1
            conn.close()

    if _compat.STOP_CLOSES_KEPT_ALIVE_AT_ONCE:
        def murder_keepalived(self, force=False):
            if force and not self.alive:
                self._linger_before_closing()
            return super(Retirement, self).murder_keepalived(force=force)

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
        return super(Retirement, self).wait_for_and_dispatch_events(timeout)
