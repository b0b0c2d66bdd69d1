"""C-STORE of a stored file's own bytes, without decoding it, through pynetdicom.

pynetdicom sends a dataset from a file as its encoded bytes (no dcmread, no re-encoding)
when `send_c_store` is given the file's path and `_config.STORE_SEND_CHUNKED_DATASET` is
on: it reads the file meta for the SOP UIDs and the transfer syntax, needs a context
accepted in exactly that syntax, and sends the bytes after the file meta as P-DATA
fragments of the peer's maximum PDU length. The node passes a path to `send_c_store`
only for that, so turning the option on for the process changes nothing else.

A C-MOVE or C-GET handler cannot yield a path: pynetdicom's sub-operation loop takes only
Datasets and hands each to the association's `send_c_store`. So the handler yields a
`StoredFile` (a Dataset with the instance's UIDs, which pynetdicom's loop needs, and the
path), and `send_stored_files(assoc)` puts a `send_c_store` on that one association that
turns a StoredFile back into its path. Any other Dataset goes through unchanged.

This adapts pynetdicom's internals; node.dicom.pynetdicom_internals checks the code relied
on and tests/test_stored_send.py pins the behaviour.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import _config
from pynetdicom.association import Association

_config.STORE_SEND_CHUNKED_DATASET = True


class StoredFile(Dataset):
    """Stands for a stored file in pynetdicom's sub-operation loop: its UIDs only."""

    def __init__(self, path: str | os.PathLike[str], sop_class: str, sop_instance: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class
        self.SOPInstanceUID = sop_instance
        self.stored_path = os.fspath(path)


def send_c_store(assoc: Association, dataset: Dataset | str, *args: Any, **kwargs: Any) -> Dataset:
    """`assoc.send_c_store` that sends a StoredFile (or a path) from the file's bytes."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # a path always means "as stored"
    if isinstance(dataset, StoredFile):
        dataset = dataset.stored_path
    return Association.send_c_store(assoc, dataset, *args, **kwargs)


def send_stored_files(assoc: Association) -> None:
    """Let pynetdicom's sub-operation loop on `assoc` send StoredFiles as stored bytes."""
    def own(dataset: Dataset | str, *args: Any, **kwargs: Any) -> Dataset:
        return send_c_store(assoc, dataset, *args, **kwargs)

    assoc.send_c_store = own  # type: ignore[method-assign]


def stop_sending_stored_files(assoc: Association) -> None:
    """Give `assoc` back its own `send_c_store`."""
    with contextlib.suppress(AttributeError):
        del assoc.send_c_store


def read_ahead(paths: Iterable[str]) -> None:
    """Ask the kernel to start reading these files now, so that they are in memory by the
    time they are sent (the sending waits on the network, not on the disk)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # reported when it is sent
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
