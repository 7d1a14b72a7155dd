"""The CPU one agent spends pushing its board's HAVE stream to a room's subscribers: one
publisher thread for all (``agent.swarm.publisher``) against a thread per subscriber (the
design before it, reproduced here as the baseline), in the same run.

Each subscriber is a real socket pair whose far end a reader thread drains (the same in
both); the board changes every ``--every`` seconds, as chunks verify in a pull. Printed:
CPU seconds of the whole process per board change, and the ratio.

    python benchmarks/have_push.py [--subscribers 29] [--changes 40] [--every 0.1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.manifest import FileEntry, Manifest  # noqa: E402
from agent.swarm import wire  # noqa: E402
from agent.swarm.board import Board  # noqa: E402
from agent.swarm.publisher import COALESCE, HEARTBEAT, BoardPublisher, greet  # noqa: E402


def thread_per_subscriber(board: Board, conn: socket.socket, stop: threading.Event) -> None:
    """The baseline: what each subscription's thread did before the publisher."""
    seq, have, origin, claims, pulling = board.snapshot()
    frames = 1
    conn.sendall(wire.encode_snapshot(frames, have, origin, claims, pulling, board.total))
    while not stop.is_set():
        if board.wait(seq, HEARTBEAT):
            time.sleep(COALESCE)
        changes = board.changes_since(seq)
        frames += 1
        try:
            if changes is None:
                seq, have, origin, claims, pulling = board.snapshot()
                conn.sendall(wire.encode_snapshot(frames, have, origin, claims, pulling, board.total))
            elif changes.seq == seq:
                conn.sendall(wire.encode_beat(frames))
            else:
                seq = changes.seq
                conn.sendall(wire.encode_delta(frames, have=changes.have, origin=changes.origin, claim=changes.claim,
                                               unclaim=changes.unclaim, pulling=changes.pulling))
        except OSError:
            return


def drain(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.2)
    while not stop.is_set():
        try:
            if not conn.recv(65536):
                return
        except socket.timeout:
            continue
        except OSError:
            return


def measure(design: str, args) -> float:
    chunks = args.changes + 1
    manifest = Manifest("lab/m", "master", 1 << 16, (FileEntry(
        "f", chunks * (1 << 16), b"\0" * 32, tuple(j.to_bytes(4, "big") * 8 for j in range(chunks))),))
    board = Board(manifest, pulling=True)
    stop = threading.Event()
    pairs = [socket.socketpair() for _ in range(args.subscribers)]
    threads = [threading.Thread(target=drain, args=(theirs, stop), daemon=True) for _, theirs in pairs]
    publisher = BoardPublisher(board)
    for ours, _ in pairs:
        if design == "publisher":
            publisher.add(ours, greet(ours, board))
        else:
            threads.append(threading.Thread(target=thread_per_subscriber, args=(board, ours, stop), daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.process_time()
    for ordinal in range(args.changes):
        board.add_have(ordinal, from_origin=False)
        time.sleep(args.every)
    spent = time.process_time() - started
    stop.set()
    publisher.close()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
    return spent / args.changes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=29)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--every", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"thread per subscriber": [], "publisher": []}
    for _ in range(args.rounds):  # alternating: the machine's noise hits both alike
        for design in results:
            results[design].append(measure(design, args))
    base = min(results["thread per subscriber"])
    print(f"HAVE stream push, {args.subscribers} subscribers, a change every {args.every} s, "
          f"{args.changes} changes, best of {args.rounds}\n")
    print("| design | CPU ms per board change (all subscribers) | ratio to the baseline |")
    print("| --- | --- | --- |")
    for design, spent in results.items():
        print(f"| {design} | {min(spent) * 1000:.2f} | {min(spent) / base:.2f} |")
    print("\nreproduce: python benchmarks/have_push.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
