"""The heatmap picture as a reader sees it: the whole X-ray at its own brightness under a
caption band, colour only where the map is hot, a colour scale with its values, and a caption
that is never clipped, from a 10 px to a 3,000 px source."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from support import siim_file

from ai.data.preprocess import read_grey8
from ai.results.sc.caption import BAND_COLOUR, RULE_COLOUR
from ai.results.sc.picture import (
    DEFAULT_ALPHA,
    HEAT_FLOOR,
    MIN_PICTURE_WIDTH,
    NOT_FOR_DIAGNOSTIC_USE,
    colour_scale,
    heat_opacity,
    render_picture,
    upsample_bilinear,
)

POSITIVE = "train/Pneumothorax/000153.dcm"
MODEL = "pneumonode pneumothorax seed xresnet50 (0.1.0+8c445d94fa8b)"


def gaussian_heatmap(size: int = 14, centre: tuple[float, float] = (5.0, 9.0)) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 8.0)


def gradient(rows: int, columns: int) -> np.ndarray:
    """A grey X-ray stand-in whose every pixel differs from its neighbours' sum pattern."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    return ((xx * 7 + yy * 3) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    return read_grey8(siim_file(POSITIVE))


def test_the_xray_is_whole_and_unchanged_below_a_band_of_its_own(xray: np.ndarray) -> None:
    picture = render_picture(xray, np.zeros((7, 7)), 0.42, "No Pneumothorax", model=MODEL)
    top = picture.image_top
    assert picture.scale == 1 and picture.image_size == xray.shape
    assert picture.rgb.shape == (top + xray.shape[0], xray.shape[1], 3)
    # With a cold map every X-ray pixel is in the picture, at its windowed value.
    assert np.array_equal(picture.rgb[top:], np.repeat(xray[..., None], 3, axis=2))
    # The band's pixels belong to the band, not to the X-ray: another X-ray, the same band.
    other = render_picture(255 - xray, np.zeros((7, 7)), 0.42, "No Pneumothorax", model=MODEL)
    assert np.array_equal(other.rgb[:top], picture.rgb[:top])
    assert top < 0.15 * xray.shape[0]


def test_cold_regions_equal_the_windowed_source_and_hot_ones_are_coloured(
    xray: np.ndarray,
) -> None:
    heatmap = gaussian_heatmap()
    picture = render_picture(xray, heatmap, 0.83, "Pneumothorax", model=MODEL)
    image = picture.rgb[picture.image_top :].astype(int)
    heat = upsample_bilinear(heatmap, *xray.shape)
    cold = heat < HEAT_FLOOR - 1 / 256
    assert cold.mean() > 0.5
    assert np.array_equal(image[cold], np.repeat(xray[cold][:, None], 3, axis=1))
    hot = heat > 0.9
    assert hot.any()
    assert (image[hot][:, 0] > image[hot][:, 2]).mean() > 0.9  # magma's hot end is warm
    assert not np.array_equal(image[hot][:, 0], xray[hot])


def test_opacity_grows_with_the_heat_up_to_alpha_at_the_hottest_point(xray: np.ndarray) -> None:
    heatmap = gaussian_heatmap()
    picture = render_picture(xray, heatmap, 0.83, "Pneumothorax")
    image = picture.rgb[picture.image_top :].astype(float)
    rows, columns = xray.shape
    # Independent reference: bilinear upsampling with pixel-centre alignment, matplotlib's
    # magma colour, and an opacity rising linearly from the floor to 0.6 at heat 1.
    for row, column in [(400, 650), (700, 300), (402, 694), (300, 760), (520, 560)]:
        y = (row + 0.5) * heatmap.shape[0] / rows - 0.5
        x = (column + 0.5) * heatmap.shape[1] / columns - 0.5
        y0, x0 = int(np.clip(np.floor(y), 0, 12)), int(np.clip(np.floor(x), 0, 12))
        fy, fx = np.clip(y - y0, 0, 1), np.clip(x - x0, 0, 1)
        value = (
            heatmap[y0, x0] * (1 - fy) * (1 - fx)
            + heatmap[y0, x0 + 1] * (1 - fy) * fx
            + heatmap[y0 + 1, x0] * fy * (1 - fx)
            + heatmap[y0 + 1, x0 + 1] * fy * fx
        )
        opacity = float(heat_opacity(value))
        colour = np.array(matplotlib.colormaps["magma"](value)[:3]) * 255
        expected = (1 - opacity) * float(xray[row, column]) + opacity * colour
        assert np.abs(image[row, column] - expected).max() <= 3.0, (row, column, value)
    assert heat_opacity(1.0) == pytest.approx(DEFAULT_ALPHA)
    assert heat_opacity(HEAT_FLOOR) == 0.0


def test_the_colour_scale_shows_the_heat_colours_with_their_values(xray: np.ndarray) -> None:
    picture = render_picture(xray, gaussian_heatmap(), 0.83, "Pneumothorax", model=MODEL)
    left, top, right, bottom = picture.band.scale_box
    assert bottom <= picture.image_top and right <= picture.rgb.shape[1]
    assert right - left >= 10 * (bottom - top) > 0
    bar = picture.rgb[(top + bottom) // 2, left:right].astype(int)
    values = (np.arange(right - left) + 0.5) / (right - left)
    assert np.array_equal(bar, colour_scale().colours(values))
    assert len(set(bar[0])) == 1  # no heat: grey, as the X-ray is left
    assert bar[-1][0] > bar[-1][2] + 20  # the hottest colour is warm
    ticks = [label.text for label in picture.band.tick_labels]
    assert ticks == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    title = " ".join(line.text for line in picture.band.lines)
    assert "GradCAM heat" in title and f"not drawn below {HEAT_FLOOR:g}" in title


def _assert_caption_inside(picture, expected_lines: list[str]) -> None:
    width, top = picture.rgb.shape[1], picture.image_top
    boxes = [line.box for line in picture.band.lines + picture.band.tick_labels]
    for left, upper, right, lower in boxes:
        assert left >= 0 and upper >= 0 and right <= width and lower <= top, (boxes, width, top)
    # Every character of every line is drawn, in order (long lines wrap, nothing is cut).
    drawn = "".join("".join(line.text.split()) for line in picture.band.lines)
    position = 0
    for expected in expected_lines:
        position = drawn.find("".join(expected.split()), position)
        assert position >= 0, (expected, drawn)
    # No ink reaches the picture's edges: the outermost columns of the band are empty.
    band = picture.rgb[:top]
    band = band[~np.all(band == RULE_COLOUR, axis=(1, 2))]  # without the rule under it
    for edge in (band[:, :2], band[:, -2:]):
        assert np.all(edge == BAND_COLOUR)


@pytest.mark.parametrize(("rows", "columns"), [(128, 128), (3000, 3000), (10, 10), (45, 10)])
def test_the_whole_caption_is_inside_the_picture(rows: int, columns: int) -> None:
    grey = gradient(rows, columns)
    picture = render_picture(grey, gaussian_heatmap(), 0.5, "Pneumothorax", model=MODEL)
    _assert_caption_inside(
        picture,
        [
            "AI result: Pneumothorax",
            "Pneumothorax probability: 50.0%",
            f"Model: {MODEL}",
            NOT_FOR_DIAGNOSTIC_USE,
        ],
    )
    assert picture.rgb.shape[1] >= MIN_PICTURE_WIDTH
    # A small source is enlarged by a whole factor, its pixels unchanged in square blocks.
    k = picture.scale
    assert picture.image_size == (rows * k, columns * k)
    if k > 1:
        cold = render_picture(grey, np.zeros((4, 4)), 0.5, "Pneumothorax", model=MODEL)
        image = cold.rgb[cold.image_top :, : columns * k, 0]
        assert np.array_equal(image, np.kron(grey, np.ones((k, k), np.uint8)))


def test_a_3000_px_caption_is_sized_from_the_image() -> None:
    small = render_picture(gradient(128, 128), np.zeros((4, 4)), 0.5, "Pneumothorax")
    large = render_picture(gradient(3000, 3000), np.zeros((4, 4)), 0.5, "Pneumothorax")
    height = [line.box[3] - line.box[1] for line in (small.band.lines[0], large.band.lines[0])]
    assert height[1] > 3 * height[0]  # legible at 3,000 px, not 12 px high
    assert large.image_top < 0.15 * 3000


def test_a_long_model_name_wraps_instead_of_being_cut() -> None:
    model = "a very long model name " * 6 + "(0.1.0+" + "f" * 40 + ")"
    picture = render_picture(
        gradient(128, 128), np.zeros((4, 4)), 0.5, "Pneumothorax", model=model[:256]
    )
    _assert_caption_inside(picture, [f"Model: {model[:256]}", NOT_FOR_DIAGNOSTIC_USE])


def test_the_warning_is_amber_and_the_rule_separates_band_and_image(xray: np.ndarray) -> None:
    picture = render_picture(xray, np.zeros((7, 7)), 0.125, "No Pneumothorax")
    (warning,) = [line for line in picture.band.lines if line.text == NOT_FOR_DIAGNOSTIC_USE]
    left, top, right, bottom = warning.box
    ink = picture.rgb[top:bottom, left:right].reshape(-1, 3).astype(int)
    amber = (ink[:, 0] > 200) & (ink[:, 1] > 150) & (ink[:, 2] < 80)
    assert amber.any()
    assert np.all(picture.rgb[picture.image_top - 1] == RULE_COLOUR)


def test_the_picture_can_be_saved_and_read_back_as_png(tmp_path: Path) -> None:
    picture = render_picture(gradient(300, 520), gaussian_heatmap(7, (3.0, 3.0)), 0.5, "P")
    assert picture.image_size == (300, 520) and picture.scale == 1
    Image.fromarray(picture.rgb).save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), picture.rgb)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"heatmap": np.zeros((4, 4, 3))}, "heatmap"),
        ({"heatmap": np.zeros((0, 4))}, "heatmap"),
        ({"heatmap": np.full((4, 4), 1.5)}, "heatmap"),
        ({"heatmap": np.full((4, 4), np.nan)}, "heatmap"),
        ({"heatmap": np.ones((4, 4), np.uint8)}, "heatmap"),
        ({"grey8": np.zeros((64, 64), np.float32)}, "grey8"),
        ({"grey8": np.zeros((64, 64, 3), np.uint8)}, "grey8"),
        ({"grey8": np.zeros((0, 64), np.uint8)}, "grey8"),
        ({"probability": 1.5}, "probability"),
        ({"probability": -0.01}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"label": ""}, "label"),
        ({"model": " "}, "model"),
    ],
)
def test_picture_rejects_invalid_inputs(change: dict, argument: str) -> None:
    arguments = dict(
        grey8=np.zeros((64, 64), np.uint8),
        heatmap=np.zeros((4, 4)),
        probability=0.5,
        label="Pneumothorax",
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=argument):
        render_picture(**arguments)
