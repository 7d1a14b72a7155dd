"""The agent's localhost gateway: unmodified hub tools download through the cache.

``MODELSCOPE_ENDPOINT`` or ``HF_ENDPOINT`` = ``http://127.0.0.1:PORT`` (the agent prints PORT;
default 8790, ``shoal env`` prints the lines to paste) and the modelscope SDK, ms-swift,
``huggingface_hub``, transformers, datasets, vLLM... get their files from the agent: the
cache, the room, the mirror, then the origins, every byte proven before it is sent. Also
serves Prometheus metrics at ``/metrics``.

- ``server``: connections, admission (the agent's user, root, the control group; Host and
  Origin checked), sending (``sendfile``), routing to the faces.
- ``serve``: the one resolve-and-serve path every face uses (listings, commit ids, files
  with Range, pulls started or joined, bytes streamed as they are proven); ``lease``: the
  gateway's hold on a pull.
- the faces, one module per hub API (``faces.make_faces``): ``ms_models``, ``ms_datasets``
  (ModelScope), ``hub`` (Hugging Face, models and datasets).
"""

from agent.gateway.server import Gateway, parse_target, serve_gateway

__all__ = ["Gateway", "parse_target", "serve_gateway"]
