"""shoal's background agent and the ``shoal`` command (docs/architecture.md draws it).

One module per concern:
- ``errors`` the error tree and exit codes; ``config`` settings (defaults, TOML, room file,
  environment); ``logs`` log formatting; ``cpu`` CPU accounting;
- ``manifest`` manifest codec, validation and chunk maths (pure); ``hashing`` BLAKE3 and
  SHA-256; ``httprange`` Range parsing; ``ratelimit`` the token bucket;
- ``store`` model folders plus the SQLite index of verified chunks; ``storefiles`` folders,
  locks and file handles without the index; ``eviction`` quota and LRU; ``partial`` a file
  being fetched; ``safefs`` directory-handle file access without following links;
- ``sources`` the ``ChunkSource`` interface, registry, and the OSS, ModelScope and
  Hugging Face origins; ``plan`` what a pull fetches; ``scheduler`` chunks in flight,
  retries, fallback; ``pull`` one pull end to end; ``verify`` ``shoal verify``;
  ``mirror`` ``shoal mirror push``;
- ``swarm`` the LAN swarm (its own package docstring); ``room`` join codes and room files;
- ``client`` the one backend commands and the TUI use; ``reporter`` progress output;
  ``runtime`` trio from blocking code; ``cli`` the ``shoal`` command;
- ``service`` the agent's composition root; ``pulls`` its pulls; ``api`` the control API
  table; ``control`` the control socket; ``rpc`` its framing and blocking client;
  ``access`` who may call; ``gateway`` the ModelScope-compatible gateway; ``metrics``;
- ``launcher`` devices, jobs, chats and training; ``demo`` ``shoal demo``;
- ``testing`` real local servers (OSS over moto, a ModelScope hub, a Hugging Face hub),
  faults, model makers, the loopback guard, network-namespace labs.
"""

__version__ = "0.1.0"
