"""The store: model folders on disk, files kept once by content, and a SQLite index.

Layout under the cache directory (``SHOAL_CACHE_DIR``)::

    index.sqlite                          models, files, verified chunks, blobs (WAL mode)
    blobs/{sha256}                        every verified file once, by content
    manifests/{manifest-id}.shoal         manifests of complete pulls (served to peers later)
    models/{owner}/{name}/{revision}/     a plain model directory tools load directly: its
                                          complete files are hard links of their blobs
    datasets/{owner}/{name}/{revision}/   a dataset repository, the same way
    locks/                                one lock file per model revision being pulled

A file being fetched is ``{path}.partial`` in its model directory, preallocated to its
full size; verified chunks are written at their offsets; once the file is proven (its
SHA-256, or every chunk against a trusted manifest) it becomes the blob of its SHA-256 and
is renamed into place. A file the cache already holds under any model, dataset or
revision is linked into a new folder instead of fetched (``agent.store.content`` says
when that is safe); a model removed or evicted frees only the blobs no other model links,
and the quota counts every blob once.

Invariants (``tests/test_crash.py`` checks them after kills at random moments): the index
never claims a chunk that is not on disk and verified (a chunk row is inserted only after
its bytes were verified and written, and a reopened ``.partial`` is re-hashed); no model
folder names missing bytes (a folder file and its blob are one inode); every blob is
a proven file.

Modules, imports pointing one way (``store`` uses the others, none uses ``store``):
``index`` (every SQL statement), ``blobs`` (content on disk), ``content`` (linking,
finishing, releasing, repairing), ``folders`` (model folders), ``locks`` (per-revision
locks), ``partial`` (one file being filled), ``eviction`` (pure: whom to evict), ``quota``
(evicting, ``shoal du``), ``rebuild`` (an index lost).

Every file is opened relative to a directory handle without following links
(``agent.safefs``): a link or a file of another user where the store writes is refused.
Error handling: ``ENOSPC``/``EDQUOT`` become ``DiskFull``; nothing already verified is lost.
All methods block: call them from a worker thread in async code.
"""

from agent.store.partial import PartialFile
from agent.store.store import ModelInfo, Store, du_rows, model_row

__all__ = ["ModelInfo", "PartialFile", "Store", "du_rows", "model_row"]
