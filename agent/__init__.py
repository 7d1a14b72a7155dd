"""shoal's background agent: manifests, store, sources and the scheduler that pulls models.

Layout, one module per concern:
- ``agent.errors``    the error tree and exit codes;
- ``agent.manifest``  manifest codec, validation and chunk maths (pure, no I/O);
- ``agent.config``    settings from defaults, a TOML file and the environment;
- ``agent.store``     model directories on disk plus the SQLite index of verified chunks;
- ``agent.sources``   the ``ChunkSource`` interface and the OSS and ModelScope sources;
- ``agent.scheduler`` which chunk to fetch from where, retries and fallback;
- ``agent.pull``      one pull end to end: resolve, plan, fetch, verify, finish;
- ``agent.mirror``    the OSS mirror layout and ``shoal mirror push``;
- ``agent.cli``       the ``shoal`` command;
- ``agent.testing``   real local servers (OSS over moto, a ModelScope hub) and model makers.
"""

__version__ = "0.1.0"
