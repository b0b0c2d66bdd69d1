"""The decoded-image cache: each DICOM decoded, windowed and resized to the training size once.

Decoding a 1024x1024 JPEG costs more than a small network's forward and backward pass on
it, so without a cache the CPU spends most of every epoch in the JPEG decoder. Here every
file goes once through `ai.data.preprocess` (the node's own code, so the pixels are the ones
inference sees) in parallel worker processes, and lands as a `.npy` file that later runs,
folds and recipes memory-map. The header values training needs (SOP Instance UID, Patient
ID) and the SIIM mask at the same size are stored beside it.

A file's entry is named by its absolute path, size, modification time, the training size
and `CACHE_VERSION`: a changed file, another size or changed preprocessing misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ai.cli.console import progress

log = logging.getLogger(__name__)

# Raise when ai.data.preprocess or the mask resizing changes what is stored (3: JPEG Baseline
# decoded by Pillow).
CACHE_VERSION = 3
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "pneumonode" / "decoded"

# Fewer missing files than this are decoded in this process: a fresh worker process
# imports torch and pydicom (5-15 s on a busy 2-core machine), which costs more than
# decoding a thousand 1024x1024 JPEGs there (8-11 ms each). Above it, processes win.
PROCESS_THRESHOLD = 1000
_MASKS: dict[str, list[str]] = {}  # ImageId -> run-length codes, set once per worker


@dataclass(frozen=True)
class CachedItem:
    """One file's cache entry: the resized grey image, its mask (None: no mask) and ids."""

    image: np.ndarray
    mask: np.ndarray | None
    sop_instance_uid: str
    patient_id: str
    shape: tuple[int, int]  # rows, columns of the original image (the mask's full size)


def entry_key(path: str | Path, size: int) -> str:
    """The entry's name: changes when the file, the size or the preprocessing changes."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    text = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}\0{CACHE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _save_npy(target: Path, array: np.ndarray) -> None:
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".npy")
    os.close(handle)
    try:
        np.save(tmp, array)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _init_worker(masks: dict[str, list[str]]) -> None:
    _MASKS.clear()
    _MASKS.update(masks)


def resized_mask(codes: Sequence[str], shape: tuple[int, int], size: int) -> np.ndarray | None:
    """Union of the run-length masks at `shape`, squeezed to size x size as the image is
    (area average, then > 0.5), as uint8 0/1; None when there is no mask."""
    import torch
    import torch.nn.functional as F

    from ai.data.labelled import mask_union

    full = mask_union(codes, shape)
    if not full.any():
        return None
    tensor = torch.from_numpy(full.astype(np.float32))[None, None]
    small = F.interpolate(tensor, size=(size, size), mode="area")[0, 0]
    resized = (small > 0.5).numpy().astype(np.uint8)
    if not resized.any():  # a tiny pneumothorax still marks its most covered pixel
        flat = int(torch.argmax(small))
        resized.flat[flat] = 1
    return resized


def _decode_entry(path: str, size: int, folder: str, key: str) -> dict[str, str | bool]:
    """Worker: decode one file into `folder/key.npy` (+ mask and header JSON)."""
    import pydicom

    from ai.data.preprocess import read_grey8, resize_grey8

    ds = pydicom.dcmread(path)
    grey = read_grey8(ds)
    image = resize_grey8([grey], size)[0].numpy()
    base = Path(folder) / key
    uid = str(ds.get("SOPInstanceUID", ""))
    mask = resized_mask(_MASKS.get(uid, []), grey.shape, size)
    if mask is not None:
        _save_npy(base.with_suffix(".mask.npy"), mask)
    _save_npy(base.with_suffix(".npy"), image)
    header = {"sop_instance_uid": uid, "patient_id": str(ds.get("PatientID", "")),
              "has_mask": mask is not None, "shape": list(grey.shape)}
    base.with_suffix(".json").write_text(json.dumps(header))
    return header


def _complete(base: Path) -> bool:
    return base.with_suffix(".npy").is_file() and base.with_suffix(".json").is_file()


def _spawn_context():
    """Worker processes started fresh: forking a process whose torch thread pool has run
    can deadlock the children."""
    return multiprocessing.get_context("spawn")


class ImageCache:
    """Decoded, resized images on disk under `folder/<size>/`, filled in parallel processes."""

    def __init__(self, folder: str | Path | None, size: int, workers: int | None = None,
                 process_threshold: int = PROCESS_THRESHOLD) -> None:
        self.folder = Path(folder or DEFAULT_CACHE_DIR) / str(size)
        self.size = size
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.process_threshold = process_threshold

    def fill(self, paths: Sequence[str], masks: dict[str, list[str]] | None = None) -> int:
        """Decode every file not yet cached; return how many were decoded now.

        `masks` maps SOP Instance UIDs to their run-length codes (the SIIM train-rle.csv);
        it must be the same on every call for one folder (the key does not include it).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = {path: entry_key(path, self.size) for path in paths}
        missing = [path for path in paths if not _complete(self.folder / keys[path])]
        if not missing:
            return 0
        started = time.perf_counter()
        masks = masks or {}
        in_process = self.workers == 1 or len(missing) < self.process_threshold
        if in_process:
            _init_worker(masks)
            for path in progress(missing, desc="decode", unit="file"):
                _decode_entry(path, self.size, str(self.folder), keys[path])
        else:
            with ProcessPoolExecutor(self.workers, mp_context=_spawn_context(),
                                     initializer=_init_worker, initargs=(masks,)) as pool:
                futures = [pool.submit(_decode_entry, path, self.size, str(self.folder),
                                       keys[path]) for path in missing]
                for future in progress(as_completed(futures), total=len(futures),
                                       desc="decode", unit="file"):
                    future.result()
        seconds = time.perf_counter() - started
        log.info("decoded %d files at %d px in %.1f s (%d process(es)) into %s", len(missing),
                 self.size, seconds, 1 if in_process else self.workers, self.folder)
        return len(missing)

    def load(self, paths: Sequence[str]) -> dict[str, CachedItem]:
        """The cached entries of `paths` (memory-mapped images); `fill` them first."""
        entries: dict[str, CachedItem] = {}
        for path in paths:
            base = self.folder / entry_key(path, self.size)
            header = json.loads(base.with_suffix(".json").read_text())
            mask_path = base.with_suffix(".mask.npy")
            entries[path] = CachedItem(
                image=np.load(base.with_suffix(".npy"), mmap_mode="r"),
                mask=np.load(mask_path) if header["has_mask"] else None,
                sop_instance_uid=header["sop_instance_uid"],
                patient_id=header["patient_id"],
                shape=tuple(header["shape"]),
            )
        return entries
