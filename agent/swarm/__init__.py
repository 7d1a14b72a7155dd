"""The LAN swarm: agents find each other over libp2p and fetch chunks from peers first.

- ``protocol``: the control messages (offer request/answer, have-bitmaps, swarm membership
  proofs) as pure, validated functions;
- ``node``: the libp2p host answering peers, asking them, and discovery (mDNS, DHT);
- ``membership``: the agent's peers, the loops that keep them connected and announced, and
  the per-pull HAVE updates;
- ``view``: what peers hold of one manifest during a pull, and the chunk order (rarest
  first, then this agent's rendezvous share of the origin's chunks);
- ``source``: ``LanPeerSource``, first in the scheduler's order, dropping lying peers;
- ``datapath``: the ticketed TCP data connection chunk bytes travel on (not libp2p
  streams, which docs/design.md measured at ~60 MB/s), with its server and client;
- ``trust``: the agent's Ed25519 identity, signed manifests (``shoal publish``) and the
  policy a peer's manifest must meet (a trusted publisher's signature, or a pinned id).
"""
