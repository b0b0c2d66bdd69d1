"""Where the model found the finding: the segmentation head's map, thresholded on the
source image's own grid, split into connected regions with their outlines.

Found once per image and shared by the kinds that show it (the SR's image regions, the
SEG's mask), so the outline a viewer draws from the SR and the mask it draws from the SEG
are the same pixels. The map is a per-pixel probability at the model's input size (the
whole image squeezed to a square, `ai.data.preprocess.resize_grey8`), so it is resized
straight back to the source's Rows x Columns.

Coordinates are DICOM's image coordinates (PS3.3 C.18.6.1.2): column then row, (0, 0) the
outer corner of the top-left pixel, so a pixel's centre is at +0.5; an outline runs along
the pixel edges around its region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# A pixel belongs to the finding when the mask head's probability is at least this.
PIXEL_THRESHOLD = 0.5
# Regions smaller than this share of the image are dropped as specks (0.1 %: about 1,000
# pixels of a 1024 x 1024 X-ray, a 3 x 3 mm patch at 0.1 mm per pixel).
MIN_REGION_FRACTION = 0.001


@dataclass(frozen=True)
class Region:
    """One connected region of the finding."""

    outline: np.ndarray  # (N, 2) float: column, row; closed (last point = first)
    pixels: int  # its area in source pixels


@dataclass(frozen=True)
class Regions:
    """The finding's regions on the source grid; `mask` is their union."""

    mask: np.ndarray  # bool, source Rows x Columns
    regions: tuple[Region, ...]

    @property
    def found(self) -> bool:
        return bool(self.regions)


def on_source_grid(probability_map: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The map resized to the source's Rows x Columns (bilinear, pixel centres aligned)."""
    from ai.results.sc.picture import upsample_bilinear

    return upsample_bilinear(np.asarray(probability_map, dtype=np.float32), rows, columns)


def _outline(region: np.ndarray) -> np.ndarray:
    """The outer boundary of one 4-connected region, along pixel edges, closed.

    Traced by contourpy at level 0.5 on a 2x upsampled copy (each pixel a 2 x 2 block), so
    that the line runs exactly on pixel edges; collinear points are dropped.
    """
    import contourpy

    blocks = np.kron(np.pad(region, 1), np.ones((2, 2), dtype=np.uint8)).astype(np.float64)
    lines = contourpy.contour_generator(z=blocks, line_type="Separate").lines(0.5)
    outer = max(lines, key=len)  # holes have shorter boundaries than their region's
    # Block coordinates: pixel (r, c) of the padded mask covers 2r..2r+1; the level-0.5 line
    # between two blocks lies at 2r+1.5 -> the edge (r+1) of the padded grid -> r unpadded.
    # Corners come out cut by a quarter pixel; every pixel edge lies on whole numbers.
    points = np.round((outer + 0.5) / 2.0 - 1.0)
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    return _simplified(points[keep])


def _simplified(points: np.ndarray) -> np.ndarray:
    """The closed line without points that lie on the straight line between their
    neighbours; first point repeated last."""
    ring = points[:-1] if np.array_equal(points[0], points[-1]) else points
    before = np.roll(ring, 1, axis=0)
    after = np.roll(ring, -1, axis=0)
    cross = (ring[:, 0] - before[:, 0]) * (after[:, 1] - before[:, 1]) - (
        ring[:, 1] - before[:, 1]
    ) * (after[:, 0] - before[:, 0])
    kept = ring[np.abs(cross) > 1e-9]
    if len(kept) < 3:
        kept = ring
    return np.vstack([kept, kept[:1]])


def find_regions(
    probability_map: np.ndarray,
    rows: int,
    columns: int,
    *,
    pixel_threshold: float = PIXEL_THRESHOLD,
    min_fraction: float = MIN_REGION_FRACTION,
) -> Regions:
    """The regions of the map at or above `pixel_threshold` on a rows x columns grid, the
    largest first; regions under `min_fraction` of the image are left out of both the
    outlines and the mask."""
    above = on_source_grid(probability_map, rows, columns) >= pixel_threshold
    labels, count = ndimage.label(above)  # 4-connected, as the outline is traced
    if count == 0:
        return Regions(mask=np.zeros((rows, columns), dtype=bool), regions=())
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    smallest = max(1, int(np.ceil(min_fraction * rows * columns)))
    kept = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] >= smallest]
    mask = np.isin(labels, kept) if kept else np.zeros((rows, columns), dtype=bool)
    slices = ndimage.find_objects(labels)
    regions = []
    for label in kept:
        box = slices[label - 1]
        region = labels[box] == label
        outline = _outline(region.astype(np.uint8))
        outline[:, 0] += box[1].start  # column
        outline[:, 1] += box[0].start  # row
        regions.append(Region(outline=outline, pixels=int(sizes[label])))
    return Regions(mask=mask, regions=tuple(regions))
