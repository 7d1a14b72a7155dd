"""The LAN swarm: agents find each other over libp2p and fetch chunks from peers first.

- ``protocol``: hello and offer messages, have-bitmaps, swarm membership proofs (pure,
  validated);
- ``node``: the libp2p host (hello protocol) and the data server; ``answers`` (what the
  data port answers besides chunks: offers, content and room asks), ``discovery`` (mDNS, peer exchange), ``records`` (DHT provider records), ``admission``
  (who the host lets in);
- ``membership``: the agent's peers, the loops that keep them connected and announced, this
  agent's boards; ``offers``: the asks a pull (and a room) makes of peers;
- ``datapath`` / ``uploads`` / ``datawire`` / ``dataclient``: the keyed TCP data port chunk
  bytes travel on (not libp2p streams, which docs/design.md measured at ~60 MB/s): server,
  its chunk requests, wire format and keys, client;
- ``board`` and ``wire``: what this agent tells subscribers about a manifest (have, origin,
  claims) and the HAVE stream's codec;
- ``session``: a pull following each peer (one subscription) into its view;
- ``view``: what each live peer holds and claims during a pull (``pullers``: who pulls and
  owns each chunk; ``holders``: choosing a chunk's holder); ``picker``: the chunk order;
  ``origin``: the room's origin policy (mixed into the picker);
- ``source``: ``LanPeerSource``, first in the scheduler's order, dropping lying peers;
- ``trust``: the agent's Ed25519 identity, signed manifests (``shoal publish``) and the
  policy a peer's manifest must meet (a trusted publisher's signature, or a pinned id).
"""
