"""gunicorn 19.x - 23.x (the futures-based gthread loop): retire without loss.

This module is tied to one gunicorn generation and should never need to change.
"""
import selectors
import time
from concurrent import futures
from functools import partial

from .. import _compat, _schedule
from ._common import RETIRE_LINGER, AnswerPipelinedWhileRetiring, close_gracefully


class Retirement(AnswerPipelinedWhileRetiring):
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
    The whole retirement, tail included, lasts at most ``graceful_timeout``.

    At all times, requests a client pipelined (read together with the one before) are
    served at once, in the same thread: stock files the connection in the poller,
    which never wakes for bytes already read, so they wait for the keep-alive timeout
    and are dropped.
    """

    _retirement_began = None

    def run(self):
        poller = self.poller
        # An instance attribute: the stock tail's ``self.poller.close()`` lands here,
        # and no other poller call pays for an indirection.
        poller.close = self._loop_ended
        try:
            super(Retirement, self).run()
            self._serve_remaining()
        finally:
            del poller.close
            poller.close()

    def _loop_ended(self):
        self._retirement_began = time.time()  # the legacy loop's clock
        # The loop has ended; the tail closes the listeners next. Unregister them first:
        # epoll watches the open file, which the arbiter and our siblings still hold.
        with self._lock:
            for listener in self.sockets:
                try:
                    self.poller.unregister(listener)
                except Exception:  # never registered, or closed: nothing to undo
                    pass
        # From now on a response says "Connection: close" unless a request is already
        # buffered behind it (also when the loop ended because the parent is gone).
        self._stop_keeping_alive()
        _schedule.stopped_accepting(self)

    def handle(self, conn):
        result = super(Retirement, self).handle(conn)
        # Requests pipelined behind this one are already read: the poller would never
        # wake for them. Serve them now, in order, as 27.0.0 does.
        while result[0] and _compat.conn_request_buffered(conn):
            result = super(Retirement, self).handle(conn)
        return result

    def finish_request(self, fs):
        if fs.cancelled() or fs.exception() is not None:
            return super(Retirement, self).finish_request(fs)
        keepalive, conn = fs.result()
        if not keepalive:
            return super(Retirement, self).finish_request(fs)
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
        except Exception:  # as stock: whatever fails, the connection is closed and counted
            with self._lock:
                try:
                    self._keep.remove(conn)
                except ValueError:
                    pass
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
        # One graceful_timeout for the whole retirement: the stock tail may have spent
        # most of it waiting for in-flight requests.
        began = self._retirement_began if self._retirement_began is not None else start
        deadline = began + self.cfg.graceful_timeout
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
        except Exception:
            # Stock would have crashed the worker here; the connections kept for the
            # drain are still closed with a FIN rather than reset at exit.
            self.log.exception("safe-gthread: the retiring worker's drain failed")
        finally:
            self.tpool.shutdown(wait=False)
        self._forget(self._waiting_connections())

    def _waiting_connections(self):
        """The connections still registered with the poller, each waiting for a request."""
        # Under the lock: pool threads register kept-alive connections meanwhile, and a
        # dict that changes size during the walk raises RuntimeError.
        with self._lock:
            keys = list(self.poller.get_map().values())
        conns = []
        for key in keys:
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
                except Exception:  # already gone, or a closed fd: it is forgotten anyway
                    pass
                try:
                    self._keep.remove(conn)
                except ValueError:
                    pass
                self.nr_conns -= 1
        close_gracefully([conn.sock for conn in conns])
