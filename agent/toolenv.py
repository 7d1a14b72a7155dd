"""What a shell needs so that unmodified hub tools download through this machine's agent
(``shoal env`` prints it, ``shoal doctor`` checks the shell it runs in). Pure.

Both hubs' clients take their endpoint from the environment: ``MODELSCOPE_ENDPOINT`` (the
modelscope SDK, ms-swift) and ``HF_ENDPOINT`` (``huggingface_hub`` and everything built on
it: transformers, diffusers, datasets, vLLM, TGI, ``hf download``). What else matters:
- ``HF_HUB_ETAG_TIMEOUT`` (default 10 s): the Hugging Face client's ``HEAD`` of a file. The
  agent answers it from the revision's listing, which for a revision it has not seen comes
  from the room, the mirror or the origin first.
- ``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10 s): how long the client waits for bytes. Under a
  trusted manifest (the mirror's, a signed one) the agent streams each chunk as it is
  proven; from an origin's listing a file is proven by its SHA-256 only once whole, so the
  first bytes of a large shard wait for the whole shard.
- ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: with either set the tools never ask the
  gateway and use only their own cache. Leave them unset: the gateway answers offline from
  the cache and the room.
- ``MODELSCOPE_DOWNLOAD_INTRA_CLOUD=false``: the SDK's intra-cloud acceleration probe is of
  no use behind the gateway.
"""

from __future__ import annotations

ETAG_TIMEOUT = 60
DOWNLOAD_TIMEOUT = 600


def tool_env(gateway: str) -> list[tuple[str, str, str]]:
    """(variable, value, why) for a shell whose tools should use the gateway at ``gateway``."""
    return [
        ("HF_ENDPOINT", gateway, "huggingface_hub, transformers, datasets, vLLM, hf download"),
        ("HF_HUB_ETAG_TIMEOUT", str(ETAG_TIMEOUT), "a revision not seen yet is listed first (room, mirror, origin)"),
        ("HF_HUB_DOWNLOAD_TIMEOUT", str(DOWNLOAD_TIMEOUT),
         "from an origin's listing a shard is sent once proven whole"),
        ("MODELSCOPE_ENDPOINT", gateway, "the modelscope SDK, ms-swift"),
        ("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false", "no intra-cloud acceleration behind the gateway"),
    ]


def shell_problems(environ: dict[str, str], gateway: str) -> list[str]:
    """What in ``environ`` keeps tools from using the gateway at ``gateway``, one line each."""
    problems = []
    for var, what in (("HF_ENDPOINT", "Hugging Face tools"), ("MODELSCOPE_ENDPOINT", "ModelScope tools")):
        value = environ.get(var, "").rstrip("/")
        if value != gateway.rstrip("/"):
            problems.append(f"{what} bypass the cache: {var} is {value or 'unset'}, not {gateway} "
                            f"(eval \"$(shoal env)\")")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            problems.append(f"{var} is set: Hugging Face tools use only their own cache and never ask the "
                            "gateway, which works offline itself (unset it)")
    return problems
