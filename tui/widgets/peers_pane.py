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
        table.add_columns("Peer", "Addresses", "RTT", "Holds", "Up", "Down", "Banned")
        yield table

    def show(self, peers: list[dict]) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for p in peers:
            addresses = p.get("addresses") or [p.get("addr", "")]
            rtt = f"{p['rtt_ms']:.0f} ms" if p.get("rtt_ms") is not None else ("up" if p.get("connected") else "down")
            table.add_row(p["id"][:16], ", ".join(addresses)[:40], rtt, str(len(p.get("holds", []))),
                          human_bytes(p.get("bytes_up", 0)), human_bytes(p.get("bytes_down", 0)),
                          p.get("banned") or p.get("error") or "", key=p["id"])
        self.query_one("#no-peers").display = not peers
        table.display = bool(peers)
