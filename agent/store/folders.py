"""Model folders: where a cache keeps a model (or a dataset) and how its files are reached
without the index: the folder, the per-revision lock file (``hold_in_use`` for job
processes), a read-only fd of a model's file opened without following links (the gateway,
the data port, ``shoal verify``), and the removal of a folder's files. A complete file in
a folder is a hard link of its blob (``agent.store.blobs``): a plain file to every tool."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import quote

from agent.errors import UnsafePath
from agent.manifest import PARTIAL_SUFFIX, ModelRef, hub_repo
from agent.safefs import SafeDir

if TYPE_CHECKING:
    from agent.store.store import Store


def kind_folder(root: Path, ref: ModelRef) -> Path:
    """The cache's folder for ``ref``'s kind: ``models/`` or ``datasets/``."""
    return Path(root) / ("datasets" if ref.is_dataset else "models")


def model_dir(root: Path, ref: ModelRef) -> Path:
    """Where ``ref`` lands in a cache at ``root`` unless a pull says ``--to``:
    ``models/OWNER/NAME/REV`` or, for a dataset, ``datasets/OWNER/NAME/REV``."""
    return kind_folder(root, ref) / hub_repo(ref.model_id)[1] / ref.revision


def lock_name(ref: ModelRef) -> str:
    """The lock file of ``ref`` in ``locks/``: exclusive while pulled, shared while in use
    (``Store.use``). Percent-encoding is injective: ``a--b/c`` and ``a/b--c`` differ."""
    return quote(str(ref), safe="") + ".lock"


def hold_in_use(root: Path, ref: ModelRef) -> int:
    """Take the shared "in use" lock of ``ref`` without opening the index (for job processes);
    returns the fd, held until closed or the process ends."""
    with SafeDir.open(Path(root) / "locks", create=True) as locks:
        fd = locks.open_file(lock_name(ref), os.O_RDWR | os.O_CREAT, 0o600, writing=False)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def open_model_file(store: "Store", directory: Path, path: str, *, partial_ok: bool = False) -> int:
    """A read-only fd of a file of the model in ``directory`` (or, if ``partial_ok`` and it is
    not finished, its ``.partial``), opened without following links and only if it is the
    store's own."""
    return open_fd(store.open_dir, directory, path, partial_ok=partial_ok)


def open_fd(open_dir: Callable[[Path], SafeDir], directory, path: str, *, partial_ok: bool = False) -> int:
    """``open_model_file`` with the folder opener given (``Store.open_dir``)."""
    with open_dir(Path(directory)) as model, model.parent_of(path)[0] as parent:
        name = path.rpartition("/")[2]
        try:
            return parent.open_file(name, os.O_RDONLY)
        except FileNotFoundError:
            if not partial_ok:
                raise
            return parent.open_file(name + PARTIAL_SUFFIX, os.O_RDONLY)


def delete_files(model: SafeDir, paths: list[str], *, partials: bool = True) -> None:
    """Delete ``paths`` (and, with ``partials``, their ``.partial``) in the model folder
    ``model``, then the subfolders left empty, deepest first: a folder holding anything
    shoal did not put there stays. No link is followed."""
    subdirs: set[str] = set()
    for path in paths:
        head, _, name = path.rpartition("/")
        try:
            with model.parent_of(path)[0] as parent:
                parent.unlink(name, missing_ok=True)
                if partials:
                    parent.unlink(name + PARTIAL_SUFFIX, missing_ok=True)
        except FileNotFoundError:
            continue
        while head:
            subdirs.add(head)
            head = head.rpartition("/")[0]
    for sub in sorted(subdirs, key=lambda d: d.count("/"), reverse=True):
        parent_rel, _, name = sub.rpartition("/")
        with (model.subdir(parent_rel) if parent_rel else model.subdir("")) as parent:
            parent.rmdir_if_empty(name)


def remove_empty_folders(open_dir: Callable[[Path], SafeDir], folder: Path, models: Path) -> None:
    """Remove ``folder`` and, inside ``models``, the owner/name/ folders above it, each only
    if empty; stop at the first that is not."""
    chain = [folder] + [p for p in folder.parents if models in p.parents]
    for current in chain:
        if current != folder and models not in current.parents:
            break
        try:
            with open_dir(current.parent) as parent:
                if not parent.rmdir_if_empty(current.name):
                    break
        except (FileNotFoundError, UnsafePath):
            break
