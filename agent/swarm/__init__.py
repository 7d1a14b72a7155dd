"""The LAN swarm (in progress, see the LAN swarm issue): agents find each other over libp2p
and fetch chunks from peers first.

Built so far: ``datapath`` — the ticketed TCP data connection chunk bytes travel on (not
libp2p streams, which DESIGN.md measured at ~60 MB/s), with its server and client.
To come: identity, mDNS/bootstrap/DHT discovery, have-maps, tickets over libp2p, the
``LanPeerSource`` and signed manifests.
"""
