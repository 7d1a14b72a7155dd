"""A loopback-only guard: any connection to an address outside 127.0.0.0/8 or ::1 fails.

Tests install it in their own process (conftest) and in every subprocess they start
(``tests/loopback_guard/sitecustomize.py`` on ``PYTHONPATH``), so a forgotten default
endpoint (the public ModelScope hub, a real OSS region) fails loudly instead of
sending traffic out.
"""

from __future__ import annotations

import ipaddress
import os
import socket

_installed = False
# A test that builds its own network namespaces names their subnet here (e.g. 10.77.0.0/16);
# traffic to it stays inside namespaces the test created and removes.
ALLOW_ENV = "SHOAL_TEST_ALLOW_NET"


def allowed_nets() -> list:
    nets = []
    for part in os.environ.get(ALLOW_ENV, "").split(","):
        if part.strip():
            nets.append(ipaddress.ip_network(part.strip()))
    return nets


class OutsideConnection(ConnectionRefusedError):
    """Raised instead of connecting anywhere but loopback."""


def _check(address) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            if host == "localhost":
                return
            raise OutsideConnection(f"loopback guard: refusing to connect to {host!r} (tests use 127.0.0.1 only)")
        if not ip.is_loopback and not any(ip in net for net in allowed_nets()):
            raise OutsideConnection(f"loopback guard: refusing to connect to {host} (tests use 127.0.0.1 only)")


def install() -> None:
    """Patch socket connects and name lookups; idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return original_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)
        return original_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        results = original_getaddrinfo(host, *args, **kwargs) if host in (
            None, "localhost", "127.0.0.1", "::1") or _is_loopback_literal(host) else None
        if results is None:
            raise OutsideConnection(f"loopback guard: refusing to resolve {host!r} (tests use 127.0.0.1 only)")
        return results

    original_sendto = socket.socket.sendto

    def sendto(self, data, *args):
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address)  # UDP too: mDNS multicast (224.0.0.251) must not leave a test's namespaces
        return original_sendto(self, data, *args)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo


def _is_loopback_literal(host) -> bool:
    try:
        ip = ipaddress.ip_address(str(host if not isinstance(host, bytes) else host.decode()))
    except ValueError:
        return False
    return ip.is_loopback or any(ip in net for net in allowed_nets())
