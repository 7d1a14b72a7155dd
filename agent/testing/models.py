"""Deterministic generated model directories: same seed, same bytes, on every machine.

Bytes come from BLAKE3's extendable output (fast, ~GB/s, seekable), so a few hundred MB
is written in about a second and a test can say exactly which bytes a file must hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3

BLOCK = 8 * 1024 * 1024


def pseudo_random_bytes(seed: str, offset: int, length: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=length, seek=offset)


def write_pseudo_random_file(path: Path, seed: str, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for offset in range(0, size, BLOCK):
            f.write(pseudo_random_bytes(seed, offset, min(BLOCK, size - offset)))


def make_model(directory: str | Path, *, weights_bytes: int, shards: int = 2, seed: str = "shoal") -> Path:
    """A model directory shaped like a hub model: config, tokenizer, sharded weights."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "seed": seed}, indent=2))
    (root / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(2048)))
    per_shard = weights_bytes // shards
    for i in range(shards):
        size = per_shard if i < shards - 1 else weights_bytes - per_shard * (shards - 1)
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_pseudo_random_file(root / name, f"{seed}/{name}", size)
    return root
