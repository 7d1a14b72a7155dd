"""Every kind of source shoal knows, in fallback order: one place for its name, what a
person reads, its colour in the TUI, whether it is configured and how to make it.

Progress lines, ``shoal status``, the TUI's source bars and chunk maps, and the list of
sources a pull uses are all read from here; adding an origin is a ``SourceKind`` line
and a module under ``agent/sources/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from agent.config import Settings


@dataclass(frozen=True)
class SourceKind:
    name: str  # in events, logs, the index ("oss")
    label: str  # what a person reads in a sentence ("OSS mirror")
    short: str  # in a split or a legend ("OSS mirror", "LAN")
    colour: str  # Rich colour of its bytes in the TUI
    factory: str | None = None  # "module:Class" taking Settings; None: built elsewhere (per pull)
    setting: str | None = None  # the Settings field that turns it on (truthy)
    how: str = ""  # how to turn it on, for the "no source" error

    def configured(self, settings: Settings) -> bool:
        return bool(self.setting and getattr(settings, self.setting))

    def make(self, settings: Settings):
        module, _, cls = self.factory.partition(":")
        return getattr(importlib.import_module(module), cls)(settings)


KINDS: tuple[SourceKind, ...] = (
    # LAN peers come first; the swarm builds that source for each pull (agent.swarm.source).
    SourceKind("lan", "LAN peers", "LAN", "green"),
    SourceKind("oss", "OSS mirror", "OSS mirror", "dodger_blue2", "agent.sources.oss:OssSource", "oss_bucket",
               "SHOAL_OSS_BUCKET and OSS_ENDPOINT for the lab's mirror"),
    SourceKind("modelscope", "ModelScope", "ModelScope", "dark_orange", "agent.sources.modelscope:ModelScopeSource",
               "use_modelscope", "SHOAL_USE_MODELSCOPE=1 for ModelScope"),
    SourceKind("huggingface", "Hugging Face hub", "Hugging Face", "gold3",
               "agent.sources.huggingface:HuggingFaceSource", "hf_endpoint", "HF_ENDPOINT for a Hugging Face hub"),
    # Files shoal registered itself (a LoRA adapter it trained).
    SourceKind("local", "local files", "local", "grey50"),
    # Bytes the cache held under another model, dataset or revision (agent.store.content).
    SourceKind("cache", "the cache", "cache", "medium_purple"),
)
MISSING_COLOUR = "grey30"
_BY_NAME = {k.name: k for k in KINDS}


def kind(name: str) -> SourceKind:
    """The kind called ``name`` (an unknown name reads as itself)."""
    return _BY_NAME.get(name) or SourceKind(name, name, name, "white")


def label(name: str) -> str:
    return kind(name).label


def short(name: str) -> str:
    return kind(name).short


def colour(name: str) -> str:
    return kind(name).colour


def origins(settings: Settings) -> list[SourceKind]:
    """The configured kinds shoal builds once per process (not per pull), in order."""
    return [k for k in KINDS if k.factory and k.configured(settings)]
