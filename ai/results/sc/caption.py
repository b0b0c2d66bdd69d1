"""The caption band of the Secondary Capture: the result, the model, the warning and the
colour scale, in a band of its own above the X-ray.

Nothing is drawn over the anatomy, and nothing is ever clipped: the font is sized from the
picture's width, and a line too long for its column is wrapped at word boundaries (inside a
word only when one word alone is too long). The colour scale is the same for every picture of
a width, so it is drawn once and pasted: only the result's lines are drawn per picture.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]  # left, top, right (exclusive), bottom (exclusive)

TEXT_COLOUR: Colour = (255, 255, 255)
DETAIL_COLOUR: Colour = (200, 200, 200)
WARNING_COLOUR: Colour = (255, 210, 0)
BAND_COLOUR: Colour = (0, 0, 0)
RULE_COLOUR: Colour = (110, 110, 110)

MIN_FONT_PX = 14
WIDTH_PER_FONT_PX = 56  # font size = picture width / 56: about 2 % of the width
SCALE_COLUMN_SHARE = 0.35
SCALE_MIN_FONTS = 10  # a colour scale narrower than 10 font sizes goes below the text


@dataclass(frozen=True)
class CaptionLine:
    text: str
    colour: Colour
    box: Box  # where its ink lies, in band coordinates


@dataclass(frozen=True)
class ColourScale:
    """What the scale shows: `colours` maps values in [0, 1] to RGB uint8, labelled `ticks`."""

    title: str
    colours: Callable[[np.ndarray], np.ndarray]
    ticks: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Band:
    pixels: np.ndarray  # (rows, width, 3) uint8
    lines: list[CaptionLine]
    scale_box: Box  # the colour bar itself
    tick_labels: list[CaptionLine]


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), loaded once per size."""
    return ImageFont.load_default(size=size)


def font_size_for(width: int) -> int:
    return max(MIN_FONT_PX, round(width / WIDTH_PER_FONT_PX))


def _text_width(text: str, face) -> int:
    return int(np.ceil(face.getlength(text)))


def _split_word(word: str, face, width: int) -> list[str]:
    pieces, current = [], ""
    for character in word:
        if current and _text_width(current + character, face) > width:
            pieces.append(current)
            current = character
        else:
            current += character
    return [*pieces, current] if current else pieces


def wrap(text: str, face, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; every character of `text` ends up on a line."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, face) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        pieces = _split_word(word, face, width) if _text_width(word, face) > width else [word]
        lines.extend(pieces[:-1])
        current = pieces[-1]
    if current:
        lines.append(current)
    return lines


def _line_height(face) -> int:
    ascent, descent = face.getmetrics()
    return ascent + descent


def _column_height(lines: list[str], face, gap: int) -> int:
    return len(lines) * _line_height(face) + max(0, len(lines) - 1) * gap


def caption_band(width: int, texts: list[tuple[str, Colour]], scale: ColourScale) -> Band:
    """Lay out and draw the band for a picture `width` pixels wide.

    The text lines go on the left and the colour scale on the right when the width allows
    both legibly; otherwise the scale goes under the text.
    """
    size = font_size_for(width)
    small_size = max(MIN_FONT_PX - 2, round(size * 0.85))
    face = font(size)
    margin, gap = max(6, size // 2), max(2, size // 4)
    usable = width - 2 * margin
    scale_width = min(int(usable * SCALE_COLUMN_SHARE), 18 * size)
    side_by_side = scale_width >= SCALE_MIN_FONTS * size
    text_width = usable - scale_width - 2 * margin if side_by_side else usable
    scale_width = scale_width if side_by_side else min(usable, 18 * size)

    wrapped = [(line, colour) for text, colour in texts for line in wrap(text, face, text_width)]
    text_height = _column_height([t for t, _ in wrapped], face, gap)
    block = _scale_block(scale, small_size, scale_width, gap, size, margin)
    scale_height = block.height
    if side_by_side:
        content = max(text_height, scale_height)
        scale_left, scale_top = width - margin - scale_width, margin
    else:
        content = text_height + 2 * gap + scale_height
        scale_left, scale_top = margin, margin + text_height + 2 * gap
    rule = max(1, size // 10)
    rows = margin + content + margin + rule

    image = Image.new("RGB", (width, rows), BAND_COLOUR)
    draw = ImageDraw.Draw(image)
    lines: list[CaptionLine] = []
    y = margin
    for text, colour in wrapped:
        draw.text((margin, y), text, font=face, fill=colour, anchor="la")
        lines.append(CaptionLine(text, colour, _box(draw, (margin, y), text, face)))
        y += _line_height(face) + gap
    image.paste(block.image, (scale_left - margin, scale_top - _PAD))
    lines.extend(_moved(line, scale_left, scale_top) for line in block.lines)
    ticks = [_moved(label, scale_left, scale_top) for label in block.tick_labels]
    left, top, right, bottom = block.bar_box
    bar_box = (left + scale_left, top + scale_top, right + scale_left, bottom + scale_top)
    draw.rectangle((0, rows - rule, width - 1, rows - 1), fill=RULE_COLOUR)
    return Band(np.asarray(image), lines, bar_box, ticks)


_PAD = 1  # the bar's outline lies a pixel above the scale's column (and a margin aside)


@dataclass(frozen=True)
class _ScaleBlock:
    image: Image.Image  # the column drawn on the band's colour, with a margin each side
    height: int  # of the column itself
    lines: list[CaptionLine]  # title lines, boxes relative to the column's top left
    bar_box: Box
    tick_labels: list[CaptionLine]


def _moved(line: CaptionLine, dx: int, dy: int) -> CaptionLine:
    left, top, right, bottom = line.box
    return CaptionLine(line.text, line.colour, (left + dx, top + dy, right + dx, bottom + dy))


@lru_cache(maxsize=64)
def _scale_block(scale: ColourScale, small_size: int, width: int, gap: int,
                 bar_height: int, margin: int) -> _ScaleBlock:
    """The colour scale's column (title, bar, ticks), drawn once per size: it takes most of
    the band's drawing time and is the same for every picture of a width. Drawn on the
    band's colour, so pasting it whole gives the pixels drawing it in place would."""
    small = font(small_size)
    title = wrap(scale.title, small, width)
    mark = max(1, bar_height // 4)
    tick_height = mark + gap // 2 + _line_height(small)
    height = _column_height(title, small, gap) + gap + bar_height + tick_height
    image = Image.new("RGB", (width + 2 * margin, height + 2 * _PAD), BAND_COLOUR)
    draw = ImageDraw.Draw(image)
    lines: list[CaptionLine] = []
    y = _PAD
    for text in title:
        draw.text((margin, y), text, font=small, fill=DETAIL_COLOUR, anchor="la")
        lines.append(CaptionLine(text, DETAIL_COLOUR, _box(draw, (margin, y), text, small)))
        y += _line_height(small) + gap
    bar_box = (margin, y, margin + width, y + bar_height)
    ticks = _draw_bar(image, draw, bar_box, scale, small, mark, gap)
    left, top, right, bottom = bar_box
    return _ScaleBlock(
        image=image,
        height=height,
        lines=[_moved(line, -margin, -_PAD) for line in lines],
        bar_box=(left - margin, top - _PAD, right - margin, bottom - _PAD),
        tick_labels=[_moved(label, -margin, -_PAD) for label in ticks],
    )


def _box(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, face) -> Box:
    left, top, right, bottom = draw.textbbox(xy, text, font=face, anchor="la")
    return int(left), int(top), int(right), int(bottom)


def _draw_bar(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    box: Box,
    scale: ColourScale,
    face,
    mark: int,
    gap: int,
) -> list[CaptionLine]:
    """The bar (the scale's colours from 0 at the left to 1 at the right), its tick marks and
    their values; the end labels are aligned inside the bar's ends so none sticks out."""
    left, top, right, bottom = box
    values = (np.arange(right - left, dtype=np.float64) + 0.5) / (right - left)
    row = np.asarray(scale.colours(values), dtype=np.uint8).reshape(1, -1, 3)
    image.paste(Image.fromarray(np.repeat(row, bottom - top, axis=0)), (left, top))
    draw.rectangle((left - 1, top - 1, right, bottom), outline=RULE_COLOUR)
    labels: list[CaptionLine] = []
    for index, tick in enumerate(scale.ticks):
        x = left + round(tick * (right - left - 1))
        draw.line((x, bottom, x, bottom + mark), fill=DETAIL_COLOUR)
        text = f"{tick:g}"
        anchor = "la" if index == 0 else "ra" if index == len(scale.ticks) - 1 else "ma"
        xy = (x, bottom + mark + gap // 2)
        draw.text(xy, text, font=face, fill=DETAIL_COLOUR, anchor=anchor)
        bbox = draw.textbbox(xy, text, font=face, anchor=anchor)
        labels.append(CaptionLine(text, DETAIL_COLOUR, tuple(int(v) for v in bbox)))
    return labels
