#!/usr/bin/python3
"""One libtorrent 2.0 client for ``benchmarks/classroom.py``: the same room run with
BitTorrent for contrast. Run with Debian's Python, which has ``python3-libtorrent``
(``apt-get install python3-libtorrent``); not part of shoal.

    lt_client.py --make-torrent DIR OUT.torrent        # hash a model folder into a torrent
    lt_client.py --torrent T --save DIR --listen IP --port P [--seed] [--peers ip:port,...]

A client prints JSON lines on stdout: ``{"progress": f}`` about every half second, then
``{"done_s": s}`` when it has every piece (a downloader), and keeps seeding until its stdin
closes; then ``{"uploaded": n, "downloaded": n, "cpu_s": s, "peak_rss_bytes": n}``. No DHT,
no local discovery, no UPnP: it learns its peers from ``--peers``, as from a tracker, and
from peer exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import sys
import time

import libtorrent as lt


def make_torrent(folder: str, out: str) -> None:
    fs = lt.file_storage()
    lt.add_files(fs, folder)
    torrent = lt.create_torrent(fs)
    lt.set_piece_hashes(torrent, os.path.dirname(os.path.abspath(folder)))
    with open(out, "wb") as f:
        f.write(lt.bencode(torrent.generate()))


def say(**payload) -> None:
    print(json.dumps(payload), flush=True)


def stdin_closed(timeout: float) -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and not sys.stdin.readline()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--make-torrent", nargs=2)
    parser.add_argument("--torrent")
    parser.add_argument("--save")
    parser.add_argument("--listen")
    parser.add_argument("--port", type=int, default=6881)
    parser.add_argument("--seed", action="store_true")
    parser.add_argument("--peers", default="")
    args = parser.parse_args()
    if args.make_torrent:
        make_torrent(*args.make_torrent)
        return 0
    session = lt.session({
        "listen_interfaces": f"{args.listen}:{args.port}", "enable_dht": False, "enable_lsd": False,
        "enable_upnp": False, "enable_natpmp": False, "alert_mask": 0,
        "connections_limit": 200, "allow_multiple_connections_per_ip": True})
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(args.torrent)
    params.save_path = args.save
    if args.seed:
        params.flags |= lt.torrent_flags.seed_mode
    handle = session.add_torrent(params)
    for peer in filter(None, args.peers.split(",")):
        host, port = peer.rsplit(":", 1)
        if (host, int(port)) != (args.listen, args.port):
            handle.connect_peer((host, int(port)))
    started = time.monotonic()
    done = args.seed
    last = 0.0
    while True:
        status = handle.status()
        if not done and status.is_seeding:
            done = True
            say(done_s=round(time.monotonic() - started, 3))
        if time.monotonic() - last >= 0.5:
            last = time.monotonic()
            say(progress=round(status.progress, 4))
        if stdin_closed(0.2):
            break
    usage = resource.getrusage(resource.RUSAGE_SELF)
    status = handle.status()
    say(uploaded=status.total_payload_upload, downloaded=status.total_payload_download,
        cpu_s=round(usage.ru_utime + usage.ru_stime, 3), peak_rss_bytes=usage.ru_maxrss * 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
