"""Who is calling: the uid behind a local connection, and whether that uid may use the agent.

One admission rule for every local surface (the control socket and the gateway): the
agent's own user, root, and members of ``agent.control_group``. Nobody else.

- On the control socket (a Unix socket) the kernel tells the caller's uid (``SO_PEERCRED``).
- On the gateway (TCP on 127.0.0.1) the caller is the owner of the *other end* of the
  connection, a socket of this machine: ``tcp_peer_uid`` asks the kernel for that socket's
  owner through ``sock_diag`` (the netlink interface ``ss`` uses: an exact lookup of one
  socket, cheap and race-free while the connection is open), and falls back to reading
  ``/proc/net/tcp`` and ``tcp6``. A caller whose uid cannot be found is refused.

Pure lookups; they block briefly (one netlink round trip).
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_MSG_UID_OFFSET = 4 + 48 + 12  # family..retrans, inet_diag_sockid, expires/rqueue/wqueue


def unix_peer_uid(sock) -> int:
    """The uid of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def uid_allowed(uid: int, group: str | None) -> bool:
    """The agent's own user, root, and members of ``group`` (primary or listed)."""
    if uid in (os.getuid(), 0):
        return True
    if group:
        try:
            entry = grp.getgrnam(group)
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return user.pw_gid == entry.gr_gid or user.pw_name in entry.gr_mem
    return False


def refusal(uid: int | None, group: str | None) -> str:
    who = f"uid {uid}" if uid is not None else "a caller whose uid could not be found"
    return (f"{who} may not use this agent: only its owner (uid {os.getuid()}), root"
            + (f" and members of group {group}" if group else "")
            + " may; ask the lab admin to add you to the agent's group")


def tcp_peer_uid(sock) -> int | None:
    """The uid owning the local socket at the other end of ``sock`` (a connection accepted
    on a loopback listener), or None when it cannot be found (not local, or gone)."""
    local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
    try:
        uid = _sock_diag_uid(sock.family, remote, local)
    except OSError:
        uid = None
    if uid is None:
        uid = _proc_net_uid(sock.family, remote, local)
    return uid


def _addr16(family: int, host: str) -> bytes:
    packed = ipaddress.ip_address(host).packed
    return packed + b"\0" * (16 - len(packed)) if family == socket.AF_INET else packed


def _sock_diag_uid(family: int, src: tuple, dst: tuple) -> int | None:
    """Exact lookup of the TCP socket bound to ``src`` and connected to ``dst``."""
    sockid = struct.pack("!HH16s16s", src[1], dst[1], _addr16(family, src[0]), _addr16(family, dst[0]))
    sockid += struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(header + request, (0, 0))
        data = nl.recv(8192)
    if len(data) < _NLMSGHDR.size:
        return None
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    if kind == NLMSG_ERROR or kind != SOCK_DIAG_BY_FAMILY:
        return None
    body = data[_NLMSGHDR.size:length]
    if len(body) < _DIAG_MSG_UID_OFFSET + 4:
        return None
    return struct.unpack_from("=I", body, _DIAG_MSG_UID_OFFSET)[0]


def _proc_hex(family: int, host: str, port: int) -> str:
    packed = ipaddress.ip_address(host).packed
    # /proc prints each 32-bit word of the address in host byte order.
    words = [packed[i:i + 4] for i in range(0, len(packed), 4)]
    return "".join(struct.pack("=I", struct.unpack(">I", w)[0]).hex() for w in words).upper() + f":{port:04X}"


def _proc_net_uid(family: int, src: tuple, dst: tuple) -> int | None:
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    want_local, want_remote = _proc_hex(family, *src), _proc_hex(family, *dst)
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                    return int(fields[7])
    except OSError:
        return None
    return None
