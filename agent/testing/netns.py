"""A throwaway lab network in Linux network namespaces (root only), for tests and benchmarks.

``Lab`` makes one *switch* namespace holding a bridge per subnet (``10.77.0.0/24`` unless
told otherwise), and one namespace per host, joined to its subnet's bridge by a veth pair.
With more than one subnet a *router* namespace joins them (``.1`` on each), forwarding
unicast but not multicast, as between a school's lab rooms. Nothing is added to the
namespace the caller runs in, so no traffic can leave the lab. Each link can be limited
with ``tc`` (token bucket) in both directions: the host's egress is its upload, the
switch port's egress its download.

Resource handling: ``Lab`` is a context manager; ``close`` deletes every namespace it
made (the veths and the bridge go with them) and is safe to call twice, also from a
signal handler. Processes started with ``popen`` are killed first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass


class LabUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`)."""


def available() -> str | None:
    """None when a ``Lab`` can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "`ip` and `tc` (iproute2) are needed"
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabUnavailable(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def _shape(dev: str, ns: str, mbit: float) -> None:
    rate_bytes = mbit * 1e6 / 8
    burst = max(64 * 1024, int(rate_bytes / 100))  # 10 ms worth, at least 64 KiB (GSO segments)
    _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
        "latency", "50ms", ns=ns)


def _counter(ns: str, dev: str, name: str) -> int:
    """An interface's statistics counter (``tx_bytes``, ``rx_bytes``) inside a namespace."""
    return int(_ip("cat", f"/sys/class/net/{dev}/statistics/{name}", ns=ns).stdout.strip())


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    dev: str


class Lab:
    def __init__(self, tag: str | None = None, subnet: str = "10.77.0", *, more_subnets: tuple[str, ...] = (),
                 router_mbit: float | None = None):
        """``router_mbit``: each subnet's link to the router limited to this, each way (a
        room's uplink on a campus)."""
        reason = available()
        if reason:
            raise LabUnavailable(reason)
        self.tag = tag or f"sh{os.getpid() % 100000}"
        self.subnet = subnet
        self.subnets = (subnet, *more_subnets)
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._closed = False
        self._ports = 0
        self.router_mbit = router_mbit
        try:
            self._add_ns(self.switch)
            for number in range(len(self.subnets)):
                _ip("ip", "link", "add", f"br{number}", "type", "bridge", ns=self.switch)
                _ip("ip", "link", "set", f"br{number}", "up", ns=self.switch)
            if len(self.subnets) > 1:
                self._add_router()
        except BaseException:
            self.close()
            raise

    def _port(self, ns: str, dev: str, segment: int) -> str:
        """A veth from ``ns`` (named ``dev`` there) to bridge ``segment``; the switch side's name."""
        self._ports += 1
        port = f"p{self._ports}"
        _ip("ip", "link", "add", port, "netns", self.switch, "type", "veth", "peer", "name", dev, "netns", ns)
        _ip("ip", "link", "set", port, "master", f"br{segment}", ns=self.switch)
        _ip("ip", "link", "set", port, "up", ns=self.switch)
        _ip("ip", "link", "set", dev, "up", ns=ns)
        return port

    def _add_router(self) -> None:
        router = f"{self.tag}-rt"
        self._add_ns(router)
        for number, subnet in enumerate(self.subnets):
            port = self._port(router, f"eth{number}", number)
            _ip("ip", "addr", "add", f"{subnet}.1/24", "dev", f"eth{number}", ns=router)
            if self.router_mbit:  # into the subnet (the router's egress), out of it (the port's)
                _shape(f"eth{number}", router, self.router_mbit)
                _shape(port, self.switch, self.router_mbit)
        _ip("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)

    def _add_ns(self, name: str) -> None:
        _ip("ip", "netns", "add", name)
        self._made.append(name)
        _ip("ip", "link", "set", "lo", "up", ns=name)

    def add_host(self, name: str, *, mbit: float | None = None, up_mbit: float | None = None,
                 down_mbit: float | None = None, segment: int = 0) -> Host:
        """A new namespace on subnet number ``segment``, its link limited to ``mbit`` each
        way (or ``up_mbit``/``down_mbit``)."""
        index = len(self.hosts) + 2
        ns = f"{self.tag}-{name}"
        self._add_ns(ns)
        dev = "eth0"
        port = self._port(ns, dev, segment)
        subnet = self.subnets[segment]
        ip = f"{subnet}.{index}"
        _ip("ip", "addr", "add", f"{ip}/24", "dev", dev, ns=ns)
        # mDNS and the swarm use multicast on the host's own link only (the router does not
        # forward it); unicast to the other subnets goes through the router.
        _ip("ip", "route", "add", "224.0.0.0/4", "dev", dev, ns=ns)
        for other in self.subnets:
            if other != subnet:
                _ip("ip", "route", "add", f"{other}.0/24", "via", f"{subnet}.1", ns=ns)
        up, down = up_mbit or mbit, down_mbit or mbit
        if up:
            _shape(dev, ns, up)
        if down:
            _shape(port, self.switch, down)
        host = Host(name, ns, ip, dev)
        self.hosts[name] = host
        return host

    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: Host, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", host.ns, *argv], **kwargs)

    def tx_bytes(self, host: Host) -> int:
        """Bytes the host has sent on its lab link (its upload)."""
        return _counter(host.ns, host.dev, "tx_bytes")

    def into_subnet_bytes(self, segment: int) -> int:
        """Bytes the router has sent into subnet number ``segment`` (all that entered it
        from the other subnets)."""
        return _counter(f"{self.tag}-rt", f"eth{segment}", "tx_bytes")

    def out_of_subnet_bytes(self, segment: int) -> int:
        """Bytes the router has received from subnet number ``segment`` (all that left it)."""
        return _counter(f"{self.tag}-rt", f"eth{segment}", "rx_bytes")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._made):
            _ip("ip", "netns", "delete", ns, check=False)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def leftover_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
