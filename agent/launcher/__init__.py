"""Launching models on the local device: inference, an OpenAI-compatible server, LoRA.

- ``devices``   what accelerator this machine has and which backends are installed
- ``jobs``      every launch is a job: a supervised process group with an id, state, log
- ``supervise`` the tiny supervisor process that runs a job and records its exit
- ``runner``    the process that chats with a model (ms-swift, or transformers as fallback)
                and the fallback LoRA trainer (transformers + peft)
- ``launch``    what the CLI and the agent call: resolve the model, build the command,
                start the job, follow training progress, register adapters
ms-swift, torch and friends come with the ``run`` extra and are imported only in the
job processes (and by ``doctor``), never by the agent core.
"""
