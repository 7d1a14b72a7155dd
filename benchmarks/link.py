#!/usr/bin/env python3
"""Benchmark: one peer's chunks over shoal's LAN data path vs curl fetching the same bytes
from nginx, on loopback, in the same run. Both write the file to disk; shoal also verifies
every chunk's BLAKE3 before writing, as a pull does.

    python benchmarks/link.py [--size-mb 1024] [--concurrency 8] [--rounds 2]

Then the same over a veth pair limited to 1 Gbit/s (``--veth-mbit``; 0 skips it): the seed
and the peer each in a network namespace of their own on a bridge (root only; the
namespaces are deleted at the end, also on failure), shoal's data path against the line
rate, with curl+nginx over the same link for reference. Each run of shoal's data path is
also made encrypted (``swarm.encrypt_data``: TLS 1.3, certificate pinned), to show what
the option costs.

Needs nginx and curl (Debian: apt-get install nginx curl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.manifest import ModelRef, chunk_span, default_chunk_size  # noqa: E402
from agent.mirror import manifest_from_dir  # noqa: E402
from agent.hashing import blake3_hash  # noqa: E402
from agent.store import Store  # noqa: E402
from agent.swarm.datapath import DataClient, DataServer, StoreLocator, Ticket, TicketBook  # noqa: E402
from agent.testing.models import make_model  # noqa: E402

NGINX_CONF = """daemon off; worker_processes 1; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{ listen {host}:{port}; root {docs}; }} }}
"""
VETH_SUBNET = "10.79.0"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoal_fetch(address, ticket, manifest, out: Path, concurrency: int, tls: bytes | None = None) -> float:
    jobs = [(f, i) for f in manifest.files for i in range(len(f.chunks))]
    lock = threading.Lock()
    fds = {}
    for f in manifest.files:
        (out / f.path).parent.mkdir(parents=True, exist_ok=True)
        fds[f.path] = os.open(out / f.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fds[f.path], f.size)
    client = DataClient()
    errors = []

    def worker():
        buffer = bytearray(manifest.chunk_size)
        while True:
            with lock:
                if not jobs:
                    return
                entry, index = jobs.pop()
            offset, length = chunk_span(entry.size, manifest.chunk_size, index)
            view = memoryview(buffer)[:length]
            try:
                client.fetch(address, ticket, manifest.id, entry.path, index, view, length, time.monotonic() + 60,
                             tls=tls)
            except Exception as e:  # recorded and re-raised in the main thread
                errors.append(e)
                return
            if blake3_hash(view) != entry.chunks[index]:
                errors.append(AssertionError(f"chunk {index} of {entry.path} does not verify"))
                return
            os.pwrite(fds[entry.path], view, offset)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds.values():
        os.fsync(fd)
        os.close(fd)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def curl_fetch(port: int, manifest, out: Path, host: str = "127.0.0.1", prefix: list[str] = ()) -> float:
    started = time.perf_counter()
    for f in manifest.files:
        target = out / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*prefix, "curl", "-sS", "--fail", "-o", str(target), f"http://{host}:{port}/{f.path}"],
                       check=True)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - started


def serve_data(args) -> int:
    """Runs in the seed's namespace: a data server for the store at --cache, on --host."""
    store = Store(args.cache)
    tickets = TicketBook(ttl=3600)
    servers = [DataServer(StoreLocator(store), tickets, host=args.host, port=port, slots=args.concurrency + 2,
                          encrypt=encrypt).start() for port, encrypt in ((7000, False), (7001, True))]
    ticket = tickets.issue("bench", None)  # the fetcher's address is the other namespace's
    print(json.dumps({"ticket": ticket.encode().hex(), "tls": servers[1].fingerprint.hex()}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    for server in servers:
        server.close()
    store.close()
    return 0


def fetch_data(args) -> int:
    """Runs in the peer's namespace: fetch every chunk from the seed, print the seconds."""
    store = Store(args.cache)
    manifest = store.manifest(store.find(ModelRef("bench/link")).manifest_id)
    store.close()
    tls = bytes.fromhex(args.tls) if args.tls else None
    elapsed = shoal_fetch((args.host, 7001 if tls else 7000), Ticket.decode(bytes.fromhex(args.ticket)), manifest,
                          Path(args.out), args.concurrency, tls)
    print(json.dumps({"seconds": elapsed}), flush=True)
    return 0


def veth_rounds(work: Path, model: Path, manifest, args, nginx: str) -> list:
    """The same fetch between two namespaces over veths limited to ``args.veth_mbit``."""
    from agent.testing import netns
    reason = netns.available()
    if reason:
        print(f"skipping the veth run: {reason}", file=sys.stderr)
        return []
    rows = []
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with netns.Lab(tag="shlnk", subnet=VETH_SUBNET) as lab:
        seed = lab.add_host("seed", mbit=args.veth_mbit)
        peer = lab.add_host("peer", mbit=args.veth_mbit)
        server = lab.popen(seed, [*me, "--serve-data", "--cache", str(work / "cache"), "--host", seed.ip,
                                  "--concurrency", str(args.concurrency)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = json.loads(server.stdout.readline())
        (work / "nginx-veth" / "tmp").mkdir(parents=True)
        conf = work / "nginx-veth" / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=work / "nginx-veth", host=seed.ip, port=8080, docs=model))
        lab.popen(seed, [nginx, "-c", str(conf), "-p", str(work / "nginx-veth")], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        for round_ in range(args.rounds):
            out = work / f"veth-out-{round_}"
            elapsed = curl_fetch(8080, manifest, out, host=seed.ip, prefix=["ip", "netns", "exec", peer.ns])
            rows.append((round_ + 1, "curl + nginx (veth)", manifest.total_size / elapsed / 1e6, elapsed))
            shutil.rmtree(out)
            for name, tls in (("shoal data path (veth)", []), ("shoal data path, TLS (veth)", ["--tls", hello["tls"]])):
                done = lab.run(peer, [*me, "--fetch-data", "--cache", str(work / "cache"), "--host", seed.ip,
                                      "--ticket", hello["ticket"], "--out", str(out), "--concurrency",
                                      str(args.concurrency), *tls], capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    raise SystemExit(f"fetch over the veth failed: {done.stderr}")
                elapsed = json.loads(done.stdout.splitlines()[-1])["seconds"]
                for f in manifest.files:
                    assert (out / f.path).stat().st_size == f.size
                rows.append((round_ + 1, name, manifest.total_size / elapsed / 1e6, elapsed))
                shutil.rmtree(out)
        server.stdin.close()
    assert netns.leftover_namespaces("shlnk") == [], "namespaces left behind"
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--veth-mbit", type=float, default=1000, help="the limited link's rate; 0 skips it")
    for hidden in ("--serve-data", "--fetch-data"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--cache", "--host", "--ticket", "--out", "--tls"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_data:
        return serve_data(args)
    if args.fetch_data:
        return fetch_data(args)
    for tool in ("nginx", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed: apt-get install nginx curl", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="shoal-link-"))
    work.chmod(0o755)  # nginx's workers run as an unprivileged user and must read the files
    server = proc = store = None
    try:
        size = args.size_mb * 1024 * 1024
        print(f"generating {args.size_mb} MiB and hashing it ...", file=sys.stderr)
        model = make_model(work / "docs", weights_bytes=size, shards=2, seed="link")
        ref = ModelRef("bench/link")
        manifest = manifest_from_dir(ref, model, default_chunk_size(size))
        store = Store(work / "cache")
        store.adopt(ref, model, manifest)
        tickets = TicketBook()
        server = DataServer(StoreLocator(store), tickets, slots=args.concurrency + 2).start()
        tls_server = DataServer(StoreLocator(store), tickets, slots=args.concurrency + 2, encrypt=True).start()
        port = free_port()
        (work / "nginx" / "tmp").mkdir(parents=True)
        conf = work / "nginx" / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=work / "nginx", host="127.0.0.1", port=port, docs=model))
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work / "nginx")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rows = []
        for round_ in range(args.rounds):
            for name in ("curl + nginx", "shoal data path", "shoal data path, TLS"):
                out = work / f"out-{round_}-{len(rows)}"
                ticket = tickets.issue("bench", None)
                if name.startswith("curl"):
                    elapsed = curl_fetch(port, manifest, out)
                elif name.endswith("TLS"):
                    elapsed = shoal_fetch(tls_server.address, ticket, manifest, out, args.concurrency,
                                          tls_server.fingerprint)
                else:
                    elapsed = shoal_fetch(server.address, ticket, manifest, out, args.concurrency)
                for f in manifest.files:  # both must have the right bytes
                    assert (out / f.path).stat().st_size == f.size
                rows.append((round_ + 1, name, manifest.total_size / elapsed / 1e6, elapsed))
                shutil.rmtree(out)
        if args.veth_mbit:
            rows += veth_rounds(work, model, manifest, args, nginx)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        if server is not None:
            server.close()
            tls_server.close()
        if store is not None:
            store.close()
        shutil.rmtree(work, ignore_errors=True)
    best = {}
    for _, name, mbps, _ in rows:
        best[name] = max(best.get(name, 0), mbps)
    print(f"\nOne peer over loopback, {args.size_mb} MiB in {len(manifest.files)} files, written to disk "
          f"(shoal: {args.concurrency} connections, {manifest.chunk_size >> 20} MiB chunks, BLAKE3-verified)\n")
    print("| round | client | MB/s | seconds |")
    print("| --- | --- | --- | --- |")
    for round_, name, mbps, elapsed in rows:
        print(f"| {round_} | {name} | {mbps:.0f} | {elapsed:.2f} |")
    print(f"\nratio shoal / curl+nginx on loopback (best of {args.rounds}): "
          f"{best['shoal data path'] / best['curl + nginx']:.2f}   (target >= 1.0: issue 28)")
    if "shoal data path (veth)" in best:
        line = args.veth_mbit * 1e6 / 8 / 1e6
        print(f"over the {args.veth_mbit:.0f} Mbit/s veth: shoal {best['shoal data path (veth)']:.0f} MB/s = "
              f"{best['shoal data path (veth)'] / line:.2f} x line rate ({line:.0f} MB/s; target >= 0.9); "
              f"curl+nginx {best['curl + nginx (veth)'] / line:.2f} x")
        cost = 1 - best["shoal data path, TLS (veth)"] / best["shoal data path (veth)"]
        print(f"encrypting the data path (TLS) costs {100 * cost:.1f}% of its throughput on the veth "
              f"(target <= 15%); on loopback {100 * (1 - best['shoal data path, TLS'] / best['shoal data path']):.1f}%")
    print(f"\nreproduce: sudo python benchmarks/link.py --size-mb {args.size_mb} --concurrency {args.concurrency} "
          f"--rounds {args.rounds} --veth-mbit {args.veth_mbit:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
