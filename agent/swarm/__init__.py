"""The LAN swarm (in progress, see the LAN swarm issue): agents find each other over libp2p
and fetch chunks from peers first.

Built so far:
- ``datapath``: the ticketed TCP data connection chunk bytes travel on (not libp2p
  streams, which DESIGN.md measured at ~60 MB/s), with its server and client;
- ``trust``: the agent's Ed25519 identity, signed manifests (``shoal publish``) and the
  policy a peer's manifest must meet (a trusted publisher's signature, or a pinned id).
To come: libp2p hosts, mDNS/bootstrap/DHT discovery, have-maps, tickets over libp2p and
the ``LanPeerSource`` that puts peers first in the scheduler.
"""
