"""The LAN swarm (in progress, see the LAN swarm issue): agents find each other over libp2p
and fetch chunks from peers first.

- ``node``: the libp2p host; the offer protocol (manifest, signature, have-map, data
  address, ticket) and the client side asking peers;
- ``datapath``: the ticketed TCP data connection chunk bytes travel on (not libp2p
  streams, which DESIGN.md measured at ~60 MB/s), with its server and client;
- ``source``: ``LanPeerSource``, first in the scheduler's order, dropping lying peers;
- ``trust``: the agent's Ed25519 identity, signed manifests (``shoal publish``) and the
  policy a peer's manifest must meet (a trusted publisher's signature, or a pinned id).
To come: mDNS and DHT discovery, HAVE updates, rarest-first/endgame, swarm secret.
"""
