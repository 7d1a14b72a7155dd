"""What this machine can run on: CUDA, Ascend NPU, Apple MPS or CPU, and which backends.

``detect()`` imports torch (and torch_npu when present) lazily, so the agent core never
needs them; without torch the answer is "CPU, nothing installed to run models".
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field

BACKENDS = {"ms-swift": "swift", "vllm": "vllm", "lmdeploy": "lmdeploy", "transformers": "transformers",
            "peft": "peft", "torch": "torch", "torch_npu": "torch_npu"}


@dataclass
class DeviceReport:
    kind: str  # cuda | npu | mps | cpu
    names: list[str] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)  # bytes per device
    backends: dict[str, str | None] = field(default_factory=dict)  # distribution -> version or None

    @property
    def count(self) -> int:
        return len(self.names) or 1

    def has(self, distribution: str) -> bool:
        return self.backends.get(distribution) is not None


def installed_backends() -> dict[str, str | None]:
    found = {}
    for dist, module in BACKENDS.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a broken or deliberately hidden install
            spec = None
        if spec is None:
            found[dist] = None
            continue
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "unknown"
    return found


def detect() -> DeviceReport:
    backends = installed_backends()
    if not backends.get("torch"):
        return DeviceReport("cpu", ["cpu (torch not installed)"], [], backends)
    import torch
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return DeviceReport("cuda", [torch.cuda.get_device_name(i) for i in range(count)],
                            [torch.cuda.get_device_properties(i).total_memory for i in range(count)], backends)
    if backends.get("torch_npu"):
        import torch_npu  # noqa: F401  (registers torch.npu)
        if torch.npu.is_available():
            count = torch.npu.device_count()
            return DeviceReport("npu", [torch.npu.get_device_name(i) for i in range(count)], [], backends)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceReport("mps", ["Apple MPS"], [], backends)
    import os
    return DeviceReport("cpu", [f"cpu ({os.cpu_count()} cores)"], [], backends)


def engine_for(command: str, report: DeviceReport) -> str | None:
    """Which engine a command uses here: 'vllm'/'lmdeploy' (CUDA inference), 'swift', 'transformers'."""
    if command in ("run", "serve") and report.kind == "cuda":
        for fast in ("vllm", "lmdeploy"):
            if report.has(fast) and report.has("ms-swift"):
                return fast
    if report.has("ms-swift"):
        return "swift"
    if report.has("transformers") and (command != "train" or report.has("peft")) and command != "serve":
        return "transformers"
    return None


MISSING = ("running models needs the `run` extra: pip install 'shoal[run]' (torch 2.13.0, ms-swift 4.6.0); "
           "transformers and peft alone also do for `run` and `train`")
