#!/usr/bin/env python3
"""Benchmark: a campus of rooms pulling one model at once, simulated on a virtual clock.

The real swarm policy (``agent.swarm.board``, ``view``, ``picker``, ``location``) drives
modelled links (``agent.testing.campus``): each machine's port, each room's uplink to the
campus router, and the campus's one outside link where every origin byte comes in. All
agents start together. Printed per run: completion over the lower bound of that topology
(the largest of: the model over the outside link; over one machine's port; N copies over
the campus's upload capacity; a room's copies over its downlink plus its machines'
uploads), bytes on the outside link / F, the largest room's bytes in and out / F, chunks
fetched from the origin twice, chunks that entered one room twice, HAVE frames received
per agent, and the simulation's own wall time. ``--contrast`` adds the same campus with
its agents not saying where they are (every peer counted as beside every other).

    python benchmarks/campus.py [--rooms 10] [--per-room 30] [--size-mb 256] [--chunk-mb 4]
        [--machine-mbit 1000] [--room-mbit 1000] [--outside-mbit 500] [--upload-slots 4]
        [--per-place 2] [--seed 1] [--contrast]

Targets (issue 28): outside <= 1.05 F, each room's link <= 1.2 F, completion <= 1.3x the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.testing.campus import Campus, Topology  # noqa: E402


def run(args, locations: bool) -> dict:
    topology = Topology(rooms=[args.per_room] * args.rooms, machine_mbit=args.machine_mbit,
                        room_mbit=args.room_mbit, outside_mbit=args.outside_mbit,
                        chunk_size=args.chunk_mb << 20, chunks=max(1, args.size_mb // args.chunk_mb),
                        locations=locations)
    campus = Campus(topology, seed=args.seed, upload_slots=args.upload_slots, concurrency=args.concurrency,
                    origin_streams=args.origin_streams, per_place=args.per_place or None)
    wall = time.perf_counter()
    took = campus.run(limit_s=3600)
    report = campus.report(took)
    report["wall_s"] = time.perf_counter() - wall
    report["locations"] = locations
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--per-room", type=int, default=30)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--chunk-mb", type=int, default=4)
    parser.add_argument("--machine-mbit", type=float, default=1000)
    parser.add_argument("--room-mbit", type=float, default=1000)
    parser.add_argument("--outside-mbit", type=float, default=500)
    parser.add_argument("--upload-slots", type=int, default=4, help="a holder's uploads at once (SHOAL_UPLOAD_SLOTS)")
    parser.add_argument("--concurrency", type=int, default=8, help="an agent's fetches at once (SHOAL_CONCURRENCY)")
    parser.add_argument("--origin-streams", type=int, default=4)
    parser.add_argument("--per-place", type=int, default=2,
                        help="peers each agent follows in each other room (0: every peer, unbounded)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--contrast", action="store_true", help="also run with the agents' locations unsaid")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.environ.get("PYTHONHASHSEED") != str(args.seed):
        # The same campus, the same figures: sets of names iterate in an order Python seeds
        # per process, and that order moves who picks first (figures 0.02x apart).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": str(args.seed)})

    reports = [run(args, True)] + ([run(args, False)] if args.contrast else [])
    print(f"\ncampus: {args.rooms} rooms x {args.per_room} agents, {args.size_mb} MiB in {args.chunk_mb} MiB chunks; "
          f"machines {args.machine_mbit:g} Mbit/s, room uplinks {args.room_mbit:g}, outside {args.outside_mbit:g}; "
          f"upload slots {args.upload_slots}, concurrency {args.concurrency}, origin streams {args.origin_streams}; "
          f"following {'every peer' if not args.per_place else f'the room and {args.per_place} per other room'}\n")
    bound = reports[0]["bound_parts"]
    print("| lower bound part | seconds |\n|---|---|")
    for name, seconds in bound.items():
        print(f"| {name} | {seconds:.2f} |")
    print()
    print("| locations | completion | / bound | outside link done | outside / F | max room in / F | max room out / F "
          "| origin twice | entered a room twice | frames / agent | sim wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(f"| {'said' if r['locations'] else 'unsaid'} | {r['completion_s']:.2f} s | {r['ratio']:.2f}x "
              f"| {r['origin_done_s']:.2f} s "
              f"| {r['outside_F']:.2f} | {r['room_in_F_max']:.2f} | {r['room_out_F_max']:.2f} | {r['origin_twice']} "
              f"| {r['entered_twice']} | {r['frames_per_agent']:.0f} | {r['wall_s']:.0f} s |")
    print("\nreproduce: python benchmarks/campus.py " + " ".join(sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
