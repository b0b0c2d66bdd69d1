"""The picture of the Secondary Capture: the X-ray in grey, the class-activation map over it,
and the result written on it.

It reproduces the source's display (imshow of the X-ray, then imshow of the map with the
`magma` colormap at alpha 0.6, bilinear) in numpy and Pillow instead of a matplotlib figure,
so that it is fast, headless and pixel exact at the image's own size.
"""

from functools import lru_cache

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ai.results.validation import require_probability, require_text

DEFAULT_ALPHA = 0.6
DEFAULT_COLORMAP = "magma"
DEFAULT_PROBABILITY_CAPTION = "Pneumothorax probability"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

_TEXT_COLOUR = (255, 255, 255, 255)
_WARNING_COLOUR = (255, 210, 0, 255)
_BOX_COLOUR = (0, 0, 0, 190)


@lru_cache(maxsize=8)
def _colormap_lut(name: str) -> np.ndarray:
    """The colormap as a 256x3 float table: matplotlib itself quantises to 256 colours."""
    cmap = matplotlib.colormaps[name]
    return (cmap(np.arange(256))[:, :3] * 255.0).astype(np.float32)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), loaded once per size."""
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=8)
def _blend_lut(name: str, alpha: float) -> np.ndarray:
    """(grey, map index) -> blended RGB, 256x256x3 uint8: the blend of a 1024x1024 picture
    becomes one table look-up instead of float arithmetic on three million values."""
    grey = np.arange(256, dtype=np.float32)[:, None, None]
    blended = (1.0 - alpha) * grey + alpha * _colormap_lut(name)[None, :, :]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _check_grey(grey8: np.ndarray) -> None:
    if not isinstance(grey8, np.ndarray) or grey8.ndim != 2 or grey8.dtype != np.uint8:
        raise ValueError("grey8 must be a 2-D uint8 array (rows, columns)")
    if min(grey8.shape) < 16:
        raise ValueError(f"grey8 is too small to annotate: {grey8.shape}")


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
    """Bilinear resize with pixel-centre alignment, as imshow with an extent does."""
    image = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))
    resized = image.resize((columns, rows), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def blend_heatmap(
    grey8: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
) -> np.ndarray:
    """Colour the map (values 0..1 mapped to the colormap's ends, not stretched to the map's own
    range, so a weak map looks weak) and alpha-blend it over the grey X-ray."""
    rows, columns = grey8.shape
    upsampled = upsample_bilinear(heatmap, rows, columns)
    # matplotlib's own quantisation of [0, 1] onto its 256 colours: floor(v * 256).
    indices = np.minimum(upsampled * 256.0, 255.0).astype(np.uint16)
    table = _blend_lut(colormap, float(alpha)).reshape(-1, 3)
    return np.take(table, (grey8.astype(np.uint16) << 8) | indices, axis=0)


def _caption_lines(probability: float, label: str, probability_caption: str) -> list[str]:
    return [
        f"AI result: {label}",
        f"{probability_caption}: {probability:.1%}",
        NOT_FOR_DIAGNOSTIC_USE,
    ]


def burn_in_text(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """Write the lines in the top-left corner on a dark translucent box, the last line (the
    warning) in amber. The font scales with the image so it stays legible at any size."""
    rows, columns = rgb.shape[:2]
    font_size = max(12, round(min(rows, columns) / 30))
    font = _font(font_size)
    margin = max(4, font_size // 2)
    line_gap = max(2, font_size // 4)

    base = Image.fromarray(rgb).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    line_height = max(box[3] for box in boxes)
    text_width = max(box[2] for box in boxes)
    box_right = min(columns - 1, 2 * margin + text_width)
    box_bottom = min(rows - 1, 2 * margin + len(lines) * line_height + (len(lines) - 1) * line_gap)
    draw.rectangle((0, 0, box_right, box_bottom), fill=_BOX_COLOUR)

    y = margin
    for index, line in enumerate(lines):
        colour = _WARNING_COLOUR if index == len(lines) - 1 else _TEXT_COLOUR
        draw.text((margin, y), line, font=font, fill=colour)
        y += line_height + line_gap

    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def render_overlay(
    grey8: np.ndarray,
    heatmap: np.ndarray,
    probability: float,
    label: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    probability_caption: str = DEFAULT_PROBABILITY_CAPTION,
) -> np.ndarray:
    """Render the Secondary Capture picture.

    grey8: the X-ray as displayed (VOI window applied, MONOCHROME1 already inverted), HxW uint8.
    heatmap: the class-activation map, any resolution, float values in [0, 1].
    Returns an HxWx3 uint8 RGB array of the X-ray's size.
    """
    _check_grey(grey8)
    _check_heatmap(heatmap)
    probability = require_probability("probability", probability)
    label = require_text("label", label)
    probability_caption = require_text("probability_caption", probability_caption)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if colormap not in matplotlib.colormaps:
        raise ValueError(f"colormap {colormap!r} is not a matplotlib colormap")

    blended = blend_heatmap(grey8, heatmap, alpha=alpha, colormap=colormap)
    return burn_in_text(blended, _caption_lines(probability, label, probability_caption))
