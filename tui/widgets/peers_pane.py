"""The Peers tab: LAN peers, what they hold, traffic, and banned peers with the reason."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from agent.progress import human_bytes


class PeersPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("No LAN peers known. Peers come from the agent's swarm settings "
                     "(SHOAL_SWARM=1, SHOAL_SWARM_PEERS=...); without them every byte comes from the "
                     "OSS mirror or ModelScope.", id="no-peers")
        table = DataTable(id="peers-table", cursor_type="row")
        table.add_columns("Peer", "Addresses", "RTT", "Holds", "Up", "Down", "Problem")
        yield table

    def show(self, peers: list[dict]) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for p in peers:
            addresses = p.get("addresses") or [p.get("addr", "")]
            rtt = f"{p['rtt_ms']:.0f} ms" if p.get("rtt_ms") is not None else ("up" if p.get("connected") else "down")
            holds = ", ".join(f"{m} {h['chunks']}/{h['of']}" for m, h in (p.get("holds") or {}).items()) or "-"
            problem = f"dropped: {p['dropped']}" if p.get("dropped") else (p.get("error") or "")
            table.add_row(p["id"][:16], ", ".join(a for a in addresses if a)[:40], rtt, holds[:40],
                          human_bytes(p.get("bytes_up", 0)), human_bytes(p.get("bytes_down", 0)),
                          problem, key=p["id"])
        self.query_one("#no-peers").display = not peers
        table.display = bool(peers)
