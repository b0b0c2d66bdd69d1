"""Pictures of a heatmap over an X-ray: the seed's side-by-side figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_cam_figure(path: str | Path, grey8: np.ndarray, heatmap: np.ndarray,
                    title: str = "", alpha: float = 0.6, cmap: str = "magma") -> Path:
    """The X-ray alone, and the X-ray with the map in `magma` at alpha 0.6, bilinear.

    `heatmap` may have any resolution: matplotlib stretches it over the image (the seed's
    `imshow(..., extent=...)`), so it is resampled once, here.
    """
    rows, columns = grey8.shape
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 5.4))
    for axis in (left, right):
        axis.imshow(grey8, cmap="gray", vmin=0, vmax=255)
        axis.axis("off")
    right.imshow(heatmap, cmap=cmap, alpha=alpha, extent=(0, columns, rows, 0),
                 interpolation="bilinear", vmin=0.0, vmax=1.0)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
