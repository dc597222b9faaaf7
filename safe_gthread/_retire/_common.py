"""What every retirement shares: how long to linger, and how to close without a reset."""
import selectors
import socket
import time

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
