"""The picture of the Secondary Capture: the X-ray at its own brightness, the class-activation
map over it where it is hot, and a caption band above it.

The reader must see the anatomy: where the map is cold (under `HEAT_FLOOR`) the X-ray's
pixels are exactly the windowed source; above it the `magma` colour is blended in with an
opacity that grows with the heat, up to `DEFAULT_ALPHA` at heat 1.

The heat drawn follows the evidence, so a negative image cannot look positive (see
`heat_strength`): a CAM or GradCAM map is scaled to its own image's maximum, which says where
the model looked but not how sure it is, so it is drawn at full strength only when the
probability is at or above the model's threshold, and below it multiplied by
`BELOW_THRESHOLD_STRENGTH` x probability / threshold (faint near the threshold, not drawn at
all far below it). A segmentation mask is already an absolute per-pixel probability and is
drawn as it is. The text and
the colour scale live in a band added above the image (see `ai.results.sc.caption`), never
over it. A source narrower than `MIN_PICTURE_WIDTH` is enlarged by a whole factor (each pixel
a square block, values unchanged) so that the caption has room to be legible.

It is done in numpy, torch and Pillow rather than a matplotlib figure, so that it is fast,
headless and pixel exact; the colours are matplotlib's own colormap table. The X-ray part is
written straight into the picture's buffer by one table look-up per pixel.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

from ai.analysis.methods import METHOD_TITLES
from ai.results.sc.caption import (
    DETAIL_COLOUR,
    TEXT_COLOUR,
    WARNING_COLOUR,
    Band,
    ColourScale,
    caption_band,
)
from ai.results.validation import require_probability, require_text

DEFAULT_ALPHA = 0.6  # opacity at the hottest point
HEAT_FLOOR = 0.2  # heat at or below this is not drawn
DEFAULT_COLORMAP = "magma"
DEFAULT_PROBABILITY_CAPTION = "Pneumothorax probability"
DEFAULT_METHOD = METHOD_TITLES["gradcam"]
SEGMENTATION_TITLE = METHOD_TITLES["segmentation"]
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
MIN_PICTURE_WIDTH = 512
MAX_ENLARGED_ROWS = 8192
SCALE_BACKGROUND = 128  # the colour scale shows the heat as it looks over a mid-grey
# A relative map of an image below the threshold is drawn at most at this strength: its
# hottest point then reaches heat 0.5 (opacity 0.23, a dark red) instead of 1 (0.6, yellow).
BELOW_THRESHOLD_STRENGTH = 0.5


@dataclass(frozen=True)
class Picture:
    """The rendered picture and where its parts are."""

    rgb: np.ndarray  # (rows, columns, 3) uint8
    scale: int  # each source pixel is a scale x scale block
    image_top: int  # first row of the X-ray; the band is rows [0, image_top)
    image_size: tuple[int, int]  # rows, columns of the X-ray in the picture
    band: Band


@lru_cache(maxsize=8)
def _colormap_lut(name: str) -> np.ndarray:
    """The colormap as a 256x3 float table: matplotlib itself quantises to 256 colours."""
    cmap = matplotlib.colormaps[name]
    return (cmap(np.arange(256))[:, :3] * 255.0).astype(np.float32)


def heat_opacity(
    values: np.ndarray, alpha: float = DEFAULT_ALPHA, floor: float = HEAT_FLOOR
) -> np.ndarray:
    """Opacity of the colour at heat `values`: 0 up to `floor`, rising linearly to `alpha`."""
    ramp = (np.asarray(values, dtype=np.float64) - floor) / (1.0 - floor)
    return alpha * np.clip(ramp, 0.0, 1.0)


@lru_cache(maxsize=8)
def _blend_lut(name: str, alpha: float, floor: float) -> np.ndarray:
    """(grey, map index) -> blended RGB, 256x256x3 uint8: the blend of a 1024x1024 picture
    becomes one table look-up instead of float arithmetic on three million values.

    Index i stands for the heat values matplotlib maps to colour i, [i/256, (i+1)/256); its
    opacity is that of their centre. Where it is 0 the result is the grey value exactly.
    """
    opacity = heat_opacity((np.arange(256) + 0.5) / 256.0, alpha, floor)[None, :, None]
    grey = np.arange(256, dtype=np.float64)[:, None, None]
    blended = (1.0 - opacity) * grey + opacity * _colormap_lut(name)[None, :, :]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _heat_indices(values: np.ndarray) -> np.ndarray:
    """matplotlib's own quantisation of [0, 1] onto its 256 colours: floor(v * 256)."""
    return np.minimum(np.asarray(values) * 256.0, 255.0).astype(np.uint16)


def _check_grey(grey8: np.ndarray) -> None:
    if not isinstance(grey8, np.ndarray) or grey8.ndim != 2 or grey8.dtype != np.uint8:
        raise ValueError("grey8 must be a 2-D uint8 array (rows, columns)")
    if grey8.size == 0:
        raise ValueError(f"grey8 is empty: {grey8.shape}")


def _check_heatmap(heatmap: np.ndarray) -> None:
    if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2 or heatmap.size == 0:
        shape = getattr(heatmap, "shape", None)
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {shape}")
    if not np.issubdtype(heatmap.dtype, np.floating):
        raise ValueError(f"heatmap must be a float array in [0, 1], got {heatmap.dtype}")
    if not np.all(np.isfinite(heatmap)):
        raise ValueError("heatmap contains NaN or infinite values")
    low, high = float(heatmap.min()), float(heatmap.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"heatmap values must be in [0, 1], got [{low:.4g}, {high:.4g}]")


def upsample_bilinear(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Bilinear resize with pixel-centre alignment, as imshow with an extent does.

    torch's interpolation gives Pillow's BILINEAR resize to within 1e-5 in half its time;
    the antialiasing filter, which only a reduction needs, doubles its cost.
    """
    values = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))
    reduce = rows < values.shape[0] or columns < values.shape[1]
    resized = F.interpolate(values[None, None], size=(rows, columns), mode="bilinear",
                            align_corners=False, antialias=reduce)
    return resized[0, 0].clamp_(0.0, 1.0).numpy()


def blend_heatmap(
    grey8: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    floor: float = HEAT_FLOOR,
    strength: float = 1.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Colour the map over the grey X-ray at its size (values 0..1 mapped to the colormap's
    ends, not stretched to the map's own range, so a weak map looks weak), each value first
    multiplied by `strength` (see `heat_strength`). With `out` (rows x columns x 3 uint8,
    e.g. a view of the picture) the pixels are written there."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    rows, columns = grey8.shape
    heat = upsample_bilinear(heatmap, rows, columns)  # a fresh array: quantised in place
    np.minimum(np.multiply(heat, 256.0 * strength, out=heat), 255.0, out=heat)  # _heat_indices
    keys = grey8.astype(np.uint16) << 8
    keys |= heat.astype(np.uint16)
    table = _blend_lut(colormap, float(alpha), float(floor)).reshape(-1, 3)
    # Every key is in the table; "clip" spares numpy the buffered copy "raise" makes.
    return np.take(table, keys, axis=0, out=out, mode="clip")


def heat_strength(probability: float, threshold: float, method: str = DEFAULT_METHOD) -> float:
    """The factor the map is drawn at, so that the heat says as much as the evidence.

    A segmentation mask's values are per-pixel probabilities (1). A CAM or GradCAM map is
    relative to its image's maximum: 1 at or above the threshold, and below it
    `BELOW_THRESHOLD_STRENGTH` x probability / threshold, so that a negative image's hottest
    point is at most a dark, half-transparent red and one far below the threshold shows none.
    """
    if method == SEGMENTATION_TITLE or probability >= threshold:
        return 1.0
    return BELOW_THRESHOLD_STRENGTH * probability / threshold


def picture_scale(rows: int, columns: int) -> int:
    """The whole factor that makes a narrow source at least `MIN_PICTURE_WIDTH` wide, unless
    that would make it taller than `MAX_ENLARGED_ROWS`."""
    if columns >= MIN_PICTURE_WIDTH:
        return 1
    wanted = math.ceil(MIN_PICTURE_WIDTH / columns)
    return max(1, min(wanted, MAX_ENLARGED_ROWS // rows))



@lru_cache(maxsize=8)
def colour_scale(
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    floor: float = HEAT_FLOOR,
    method: str = DEFAULT_METHOD,
) -> ColourScale:
    """The key to the colours: heat 0..1 rendered exactly as over a mid-grey X-ray pixel
    (one object per set of options, so the caption draws its scale once)."""
    table = _blend_lut(colormap, float(alpha), float(floor))[SCALE_BACKGROUND]

    def colours(values: np.ndarray) -> np.ndarray:
        return table[_heat_indices(values)]

    # CAM and GradCAM maps are scaled to their own maximum, then by the evidence
    # (`heat_strength`); a mask head's map is its per-pixel probability, not rescaled.
    if method == SEGMENTATION_TITLE:
        title = f"{method}: probability per pixel, not rescaled; not drawn below {floor:g}"
    else:
        title = (  # "x", not the multiplication sign: Pillow's bundled font has none
            f"{method} heat relative to this image's maximum (below threshold: "
            f"x {BELOW_THRESHOLD_STRENGTH:g} x probability/threshold); not drawn below {floor:g}"
        )
    return ColourScale(title=title, colours=colours)


def percent_pair(probability: float, threshold: float) -> tuple[str, str]:
    """The probability and the threshold as percentages with the fewest decimals (1 to 4)
    that tell them apart, so "93.8% (threshold 93.8%)" hardly ever stands for a value below
    it (only within 1e-6, and then the result line still says which side it is)."""
    for decimals in range(1, 5):
        shown = f"{probability:.{decimals}%}", f"{threshold:.{decimals}%}"
        if shown[0] != shown[1]:
            return shown
    return f"{probability:.1%}", f"{threshold:.1%}"


def decision_text(probability: float, threshold: float) -> str:
    """Which side of the threshold the probability is, as the caption's result line says."""
    return "at or above threshold" if probability >= threshold else "below threshold"


def caption_texts(
    probability: float,
    label: str,
    probability_caption: str,
    model: str | None,
    *,
    threshold: float,
    strength: float = 1.0,
    floor: float = HEAT_FLOOR,
    related_series: Sequence[str] = (),
) -> list[tuple[str, tuple[int, int, int]]]:
    """The caption's lines: the result and its side of the threshold first, the probability
    beside the threshold, how strongly the heat is drawn when it is weakened, the other
    result series, the model and the warning."""
    shown, threshold_shown = percent_pair(probability, threshold)
    texts = [
        (f"AI result: {label} ({decision_text(probability, threshold)})", TEXT_COLOUR),
        (f"{probability_caption}: {shown} (threshold {threshold_shown})", TEXT_COLOUR),
    ]
    if strength <= floor:  # even the map's maximum, 1, stays under the floor
        texts.append(("Heat not drawn: probability far below threshold", DETAIL_COLOUR))
    elif strength < 1.0:
        texts.append(
            (f"Heat drawn at {strength:.0%} strength: probability below threshold", DETAIL_COLOUR)
        )
    texts.extend((line, DETAIL_COLOUR) for line in related_series)
    if model:
        texts.append((f"Model: {model}", DETAIL_COLOUR))
    texts.append((NOT_FOR_DIAGNOSTIC_USE, WARNING_COLOUR))
    return texts


def render_picture(
    grey8: np.ndarray,
    heatmap: np.ndarray,
    probability: float,
    label: str,
    *,
    threshold: float,
    model: str | None = None,
    method: str = DEFAULT_METHOD,
    related_series: Sequence[str] = (),
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    floor: float = HEAT_FLOOR,
    probability_caption: str = DEFAULT_PROBABILITY_CAPTION,
) -> Picture:
    """Render the Secondary Capture picture.

    grey8: the X-ray as displayed (VOI window applied, MONOCHROME1 already inverted), HxW uint8.
    heatmap: the map `method` made, any resolution, float values in [0, 1].
    threshold: the model's decision threshold; the caption states it beside the probability,
    and a relative map below it is drawn weaker (`heat_strength`).
    related_series: caption lines naming the other result series of this image, e.g.
    "Structured report: series 9002".
    """
    _check_grey(grey8)
    _check_heatmap(heatmap)
    probability = require_probability("probability", probability)
    threshold = require_probability("threshold", threshold)
    label = require_text("label", label)
    probability_caption = require_text("probability_caption", probability_caption)
    if model is not None:
        model = require_text("model", model, max_length=256)
    if isinstance(related_series, str):
        raise ValueError("related_series must be a sequence of lines, not one string")
    related_series = [
        require_text("related_series", line, max_length=256) for line in related_series
    ]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor!r}")
    if colormap not in matplotlib.colormaps:
        raise ValueError(f"colormap {colormap!r} is not a matplotlib colormap")

    strength = heat_strength(probability, threshold, method)
    scale = picture_scale(*grey8.shape)
    enlarged = np.repeat(np.repeat(grey8, scale, axis=0), scale, axis=1) if scale > 1 else grey8
    rows, columns = enlarged.shape
    width = max(columns, MIN_PICTURE_WIDTH)
    texts = caption_texts(
        probability,
        label,
        probability_caption,
        model,
        threshold=threshold,
        strength=strength,
        floor=floor,
        related_series=related_series,
    )
    band = caption_band(width, texts, colour_scale(alpha, colormap, floor, method))
    top = band.pixels.shape[0]
    rgb = np.empty((top + rows, width, 3), dtype=np.uint8)
    rgb[:top] = band.pixels
    rgb[top:, columns:] = 0
    blend_heatmap(enlarged, heatmap, alpha=alpha, colormap=colormap, floor=floor,
                  strength=strength, out=rgb[top:, :columns])
    return Picture(rgb=rgb, scale=scale, image_top=top, image_size=(rows, columns), band=band)


def render_overlay(
    grey8: np.ndarray,
    heatmap: np.ndarray,
    probability: float,
    label: str,
    *,
    threshold: float,
    **options,
) -> np.ndarray:
    """The picture's pixels only (see `render_picture` for the options)."""
    return render_picture(grey8, heatmap, probability, label, threshold=threshold, **options).rgb
