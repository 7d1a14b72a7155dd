"""The room seen from the teacher's seat: every member, each assignment's progress on it,
where the bytes came from, who is stuck and why, and an ETA beside the Kumar-Ross bound of
the room's links. Pure: built from the members' status reports (``RoomWork.report``) and
the swarm's peer list.

The bound (Kumar & Ross, 2006): a file of F bytes, a seed uploading at u_s, N peers with
upload u_i and download d_i: T_min = max(F/u_s, F/d_min, N·F/(u_s + Σu_i)). Here F is the
assignments' size, the seed is the teacher, and every link runs at ``room.link_mbit``
(what the room's switch gives each machine; 1000 by default). The ETA is the time so far
over the fraction done.
"""

from __future__ import annotations

from agent.assign.record import Record, start_at

STUCK = ("failed", "refused")


def kumar_ross(size: int, members: int, seed_up: float, up: float, down: float) -> float:
    """T_min in seconds for ``size`` bytes to ``members`` peers (rates in bytes per second)."""
    if size <= 0 or members <= 0:
        return 0.0
    return max(size / seed_up, size / down, members * size / (seed_up + members * up))


def room_view(record: Record | None, peers: list[dict], reports: dict[str, dict], own: dict, settings,
              now: float) -> dict:
    """What ``shoal room status`` shows (``--json`` as is)."""
    items = list(record.items) if record else []
    link = settings.room_link_mbit * 1e6 / 8
    members, stuck = [], []
    totals = {str(i.ref): 0 for i in items}
    progress = {str(i.ref): {"complete": 0, "have": 0, "total": 0, "by_source": {}} for i in items}
    for peer in peers:
        report = reports.get(peer["id"])
        online = bool(peer.get("connected"))
        row = {"id": peer["id"], "name": (report or {}).get("name") or "?", "addr": peer.get("addr"),
               "via": peer.get("via"), "online": online, "seq": (report or {}).get("seq", 0),
               "reported_s_ago": round(now - report["at"], 1) if report and "at" in report else None, "items": {}}
        for item in items:
            key = str(item.ref)
            state = ((report or {}).get("items") or {}).get(key)
            if state is None:
                state = {"state": "unknown" if online else "offline", "have": 0, "total": 0, "by_source": {},
                         "detail": "has not told yet" if online else "offline"}
            total = state.get("total") or 0
            totals[key] = max(totals[key], total)
            row["items"][key] = {"state": state.get("state"), "detail": state.get("detail", ""),
                                 "percent": round(100 * state.get("have", 0) / total, 1) if total else (
                                     100.0 if state.get("state") == "complete" else 0.0),
                                 "by_source": state.get("by_source") or {}}
            agg = progress[key]
            agg["complete"] += state.get("state") == "complete"
            agg["have"] += min(state.get("have", 0), total) if total else 0
            for source, n in (state.get("by_source") or {}).items():
                agg["by_source"][source] = agg["by_source"].get(source, 0) + n
            why = None
            if not online:
                why = "offline"
            elif state.get("state") in STUCK:
                why = state.get("detail") or state.get("state")
            elif item.by and state.get("state") != "complete" and _past(item.by, record.issued, now):
                why = f"late: wanted by {item.by}"
            if why:
                stuck.append({"member": row["name"], "id": peer["id"], "ref": key, "why": why})
        members.append(row)
    n = len(members)
    assignments = []
    for item in items:
        key = str(item.ref)
        agg = progress[key]
        whole = totals[key] * n
        assignments.append({"ref": key, "kind": item.kind, "at": item.at, "by": item.by, "size": totals[key],
                            "complete": agg["complete"], "members": n,
                            "percent": round(100 * agg["have"] / whole, 1) if whole else 0.0,
                            "by_source": agg["by_source"]})
    size = sum(totals.values())
    done = sum(a["percent"] / 100 * a["size"] * n for a in assignments)
    elapsed = now - record.issued if record else 0.0
    fraction = done / (size * n) if size and n else 0.0
    eta = 0.0 if fraction >= 1 else (elapsed * (1 - fraction) / fraction if fraction > 0 else None)
    return {"seq": record.seq if record else 0, "issued": record.issued if record else None,
            "members": members, "assignments": assignments, "stuck": stuck,
            "bound": {"bytes": size, "members": n, "link_mbit": settings.room_link_mbit,
                      "t_min_s": round(kumar_ross(size, n, link, link, link), 2),
                      "elapsed_s": round(elapsed, 1), "done": round(fraction, 4),
                      "eta_s": None if eta is None else round(eta, 1)},
            "teacher": own}


def _past(by: str, issued: int, now: float) -> bool:
    return now >= start_at(by, issued)
