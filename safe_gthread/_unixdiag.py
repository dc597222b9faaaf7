"""Which file a bound unix socket was bound to, asked of the kernel (Linux ``unix_diag``).

``os.fstat`` of a socket fd describes its sockfs inode, not the file ``bind`` created;
``getsockname`` gives the path it was bound to, which may since have been unlinked and
reused by another server. The kernel still knows the bound file: a ``SOCK_DIAG_BY_FAMILY``
request for ``AF_UNIX`` over ``NETLINK_SOCK_DIAG`` with ``UDIAG_SHOW_VFS`` answers the
``(device, inode)`` of the file the socket holds (``ss -x`` and ``lsof`` read the same).
Comparing that with ``os.lstat(path)`` proves whether a path names the very socket an
inherited fd is, without connecting to it.

Pure stdlib; Linux only. Anything that does not work (no netlink, no ``unix_diag``
module, another kernel) answers None, and callers then decide without the proof.
"""
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
_NO_COOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")     # len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBHIIIII")   # family, protocol, pad, states, ino, show, cookie[2]
_MESSAGE = struct.Struct("=BBBBIII")    # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")          # len, type
_VFS = struct.Struct("=II")             # vfs ino, vfs dev (kernel dev_t)


def kernel_dev(dev):
    """The kernel's ``dev_t`` encoding (major << 20 | minor) as ``os.makedev`` spells it."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


def request(sockfs_ino, seq=1):
    """The netlink message asking for the socket with sockfs inode ``sockfs_ino``."""
    body = _REQUEST.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, sockfs_ino & 0xFFFFFFFF,
                         UDIAG_SHOW_VFS | UDIAG_SHOW_NAME, _NO_COOKIE, _NO_COOKIE)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                          seq, 0) + body


def parse(data, sockfs_ino):
    """``(st_dev, st_ino, name)`` of the bound file in a ``unix_diag`` reply, or None."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
        if length < _NLMSGHDR.size or offset + length > len(data):
            return None
        if kind == NLMSG_ERROR:
            return None
        if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MESSAGE.size:
            start = offset + _NLMSGHDR.size
            ino = _MESSAGE.unpack_from(data, start)[4]
            if ino == sockfs_ino & 0xFFFFFFFF:
                return _attributes(data[start + _MESSAGE.size:offset + length])
        offset += (length + 3) & ~3
    return None


def _attributes(attrs):
    vfs, name, offset = None, None, 0
    while offset + _RTATTR.size <= len(attrs):
        length, kind = _RTATTR.unpack_from(attrs, offset)
        if length < _RTATTR.size:
            return None
        value = attrs[offset + _RTATTR.size:offset + length]
        if kind == UNIX_DIAG_VFS and len(value) >= _VFS.size:
            vfs_ino, vfs_dev = _VFS.unpack_from(value)
            vfs = (kernel_dev(vfs_dev), vfs_ino)
        elif kind == UNIX_DIAG_NAME:
            name = os.fsdecode(value.rstrip(b"\0"))
        offset += (length + 3) & ~3
    return None if vfs is None else vfs + (name,)  # unbound or abstract: no file


def bound_file(fd, timeout=1.0):
    """``(st_dev, st_ino, name)`` of the file the unix socket ``fd`` is bound to and the
    name it was bound with, or None when the kernel cannot tell (no netlink, no
    ``unix_diag``, an abstract or unbound socket).

    The inode number comes back as 32 bits (``udiag_vfs_ino`` is a ``__u32``): compare
    with :func:`same_file`, which also holds the name to the path.
    """
    try:
        sockfs_ino = os.fstat(fd).st_ino
        conn = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError, ValueError):
        return None
    try:
        conn.settimeout(timeout)
        conn.sendto(request(sockfs_ino), (0, 0))
        return parse(conn.recv(65536), sockfs_ino)
    except (OSError, ValueError, struct.error):
        return None
    finally:
        conn.close()


def same_file(bound, st, path):
    """True if ``bound`` (from :func:`bound_file`) is the file ``st`` describes, found at
    ``path``: the same device, the same low 32 bits of the inode (all the kernel gives;
    on a file system with 64-bit inode numbers another file can share them) and the
    name the socket was bound with."""
    if bound is None:
        return False
    dev, ino, name = bound
    return (dev == st.st_dev and ino == st.st_ino & 0xFFFFFFFF
            and (name is None or name == path))
