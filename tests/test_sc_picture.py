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
    BELOW_THRESHOLD_STRENGTH,
    DEFAULT_ALPHA,
    HEAT_FLOOR,
    MIN_PICTURE_WIDTH,
    NOT_FOR_DIAGNOSTIC_USE,
    SEGMENTATION_TITLE,
    colour_scale,
    heat_opacity,
    heat_strength,
    percent_pair,
    render_picture,
    upsample_bilinear,
)

POSITIVE = "train/Pneumothorax/000153.dcm"
MODEL = "pneumonode pneumothorax seed xresnet50 (0.1.0+8c445d94fa8b)"
THRESHOLD = 0.9375  # the demo model's: a probability of 84.4 % is a negative result


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
    picture = render_picture(xray, np.zeros((7, 7)), 0.42, "No Pneumothorax", threshold=0.5,
                             model=MODEL)
    top = picture.image_top
    assert picture.scale == 1 and picture.image_size == xray.shape
    assert picture.rgb.shape == (top + xray.shape[0], xray.shape[1], 3)
    # With a cold map every X-ray pixel is in the picture, at its windowed value.
    assert np.array_equal(picture.rgb[top:], np.repeat(xray[..., None], 3, axis=2))
    # The band's pixels belong to the band, not to the X-ray: another X-ray, the same band.
    other = render_picture(255 - xray, np.zeros((7, 7)), 0.42, "No Pneumothorax", threshold=0.5,
                           model=MODEL)
    assert np.array_equal(other.rgb[:top], picture.rgb[:top])
    assert top < 0.15 * xray.shape[0]


def test_cold_regions_equal_the_windowed_source_and_hot_ones_are_coloured(
    xray: np.ndarray,
) -> None:
    heatmap = gaussian_heatmap()
    picture = render_picture(xray, heatmap, 0.83, "Pneumothorax", threshold=0.5, model=MODEL)
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
    picture = render_picture(xray, heatmap, 0.83, "Pneumothorax", threshold=0.5)
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
    picture = render_picture(xray, gaussian_heatmap(), 0.83, "Pneumothorax", threshold=0.5,
                             model=MODEL)
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
    related = ("Structured report: series 9002", "Segmentation: series 9003")
    picture = render_picture(grey, gaussian_heatmap(), 0.5, "Pneumothorax", threshold=0.5,
                             model=MODEL, related_series=related)
    _assert_caption_inside(
        picture,
        [
            "AI result: Pneumothorax (at or above threshold)",
            "Pneumothorax probability: 50.0% (threshold 50.0%)",
            *related,
            f"Model: {MODEL}",
            NOT_FOR_DIAGNOSTIC_USE,
        ],
    )
    assert picture.rgb.shape[1] >= MIN_PICTURE_WIDTH
    # A small source is enlarged by a whole factor, its pixels unchanged in square blocks.
    k = picture.scale
    assert picture.image_size == (rows * k, columns * k)
    if k > 1:
        cold = render_picture(grey, np.zeros((4, 4)), 0.5, "Pneumothorax", threshold=0.5,
                              model=MODEL)
        image = cold.rgb[cold.image_top :, : columns * k, 0]
        assert np.array_equal(image, np.kron(grey, np.ones((k, k), np.uint8)))


def test_the_caption_states_the_threshold_beside_the_probability(xray: np.ndarray) -> None:
    negative = render_picture(xray, gaussian_heatmap(), 0.844, "No Pneumothorax",
                              threshold=THRESHOLD, model=MODEL)
    _assert_caption_inside(
        negative,
        [
            "AI result: No Pneumothorax (below threshold)",
            "Pneumothorax probability: 84.4% (threshold 93.8%)",
            "Heat drawn at 45% strength: probability below threshold",
            f"Model: {MODEL}",
            NOT_FOR_DIAGNOSTIC_USE,
        ],
    )
    # The result comes first: nothing above it can be read as positive.
    assert negative.band.lines[0].text.startswith("AI result: No Pneumothorax")
    positive = render_picture(xray, gaussian_heatmap(), 0.95, "Pneumothorax",
                              threshold=THRESHOLD)
    _assert_caption_inside(
        positive,
        ["AI result: Pneumothorax (at or above threshold)",
         "Pneumothorax probability: 95.0% (threshold 93.8%)"],
    )
    assert not any("strength" in line.text for line in positive.band.lines)


def test_a_probability_next_to_the_threshold_shows_the_digits_that_tell_them_apart() -> None:
    assert percent_pair(0.844, THRESHOLD) == ("84.4%", "93.8%")
    assert percent_pair(0.9372, 0.9374) == ("93.72%", "93.74%")
    assert percent_pair(0.937501, 0.937509) == ("93.750%", "93.751%")
    assert percent_pair(0.93749, THRESHOLD) == ("93.7%", "93.8%")
    assert percent_pair(0.5, 0.5) == ("50.0%", "50.0%")


def _drawn_heat(picture, xray: np.ndarray) -> tuple[int, int]:
    """(pixels coloured, largest change of a channel) of the X-ray part against the X-ray."""
    image = picture.rgb[picture.image_top :].astype(int)
    change = np.abs(image - xray[..., None].astype(int)).max(axis=2)
    return int((change > 0).sum()), int(change.max())


def test_a_negative_image_cannot_look_positive(xray: np.ndarray) -> None:
    heatmap = gaussian_heatmap()  # a GradCAM map: its maximum is 1 whatever the result
    pictures = {
        probability: render_picture(xray, heatmap, probability, label, threshold=THRESHOLD)
        for probability, label in [(0.95, "Pneumothorax"), (0.844, "No Pneumothorax"),
                                   (0.3, "No Pneumothorax")]
    }
    positive_pixels, positive_change = _drawn_heat(pictures[0.95], xray)
    negative_pixels, negative_change = _drawn_heat(pictures[0.844], xray)
    assert positive_pixels > 20_000 and positive_change > 100
    # Just below the threshold: the same map, at most half as hot, on far fewer pixels.
    assert negative_pixels < 0.5 * positive_pixels
    assert negative_change < 0.5 * positive_change
    # Far below it (strength 0.16, under the floor): no heat at all, and the caption says so.
    assert _drawn_heat(pictures[0.3], xray) == (0, 0)
    lines = " ".join(line.text for line in pictures[0.3].band.lines)
    assert "Heat not drawn: probability far below threshold" in lines
    # The rule itself, and where the opacity it allows stops.
    assert heat_strength(0.95, THRESHOLD) == heat_strength(THRESHOLD, THRESHOLD) == 1.0
    assert heat_strength(0.844, THRESHOLD) == pytest.approx(0.5 * 0.844 / THRESHOLD)
    assert heat_strength(0.3, THRESHOLD) < HEAT_FLOOR
    assert heat_opacity(BELOW_THRESHOLD_STRENGTH) < 0.4 * DEFAULT_ALPHA
    assert heat_strength(0.1, 0.0) == 1.0  # a threshold of 0 calls every image positive


def test_a_segmentation_mask_is_drawn_as_its_probability_whatever_the_result(
    xray: np.ndarray,
) -> None:
    mask = 0.9 * gaussian_heatmap()
    negative, positive = (
        render_picture(xray, mask, probability, label, threshold=THRESHOLD,
                       method=SEGMENTATION_TITLE)
        for probability, label in [(0.3, "No Pneumothorax"), (0.95, "Pneumothorax")]
    )
    image = slice(negative.image_top, None)
    assert np.array_equal(negative.rgb[image], positive.rgb[positive.image_top :])
    assert _drawn_heat(negative, xray)[0] > 20_000
    assert not any("strength" in line.text for line in negative.band.lines)
    assert heat_strength(0.0, THRESHOLD, SEGMENTATION_TITLE) == 1.0


def test_the_colour_scale_says_how_the_heat_follows_the_threshold() -> None:
    title = colour_scale().title
    assert "relative to this image's maximum" in title
    assert f"below threshold: x {BELOW_THRESHOLD_STRENGTH:g} x probability/threshold" in title
    mask_title = colour_scale(method=SEGMENTATION_TITLE).title
    assert "probability per pixel, not rescaled" in mask_title


def test_a_3000_px_caption_is_sized_from_the_image() -> None:
    cold = np.zeros((4, 4))
    small = render_picture(gradient(128, 128), cold, 0.5, "Pneumothorax", threshold=0.5)
    large = render_picture(gradient(3000, 3000), cold, 0.5, "Pneumothorax", threshold=0.5)
    height = [line.box[3] - line.box[1] for line in (small.band.lines[0], large.band.lines[0])]
    assert height[1] > 3 * height[0]  # legible at 3,000 px, not 12 px high
    assert large.image_top < 0.15 * 3000


def test_a_long_model_name_wraps_instead_of_being_cut() -> None:
    model = "a very long model name " * 6 + "(0.1.0+" + "f" * 40 + ")"
    picture = render_picture(
        gradient(128, 128), np.zeros((4, 4)), 0.5, "Pneumothorax", threshold=0.5, model=model[:256]
    )
    _assert_caption_inside(picture, [f"Model: {model[:256]}", NOT_FOR_DIAGNOSTIC_USE])


def test_the_warning_is_amber_and_the_rule_separates_band_and_image(xray: np.ndarray) -> None:
    picture = render_picture(xray, np.zeros((7, 7)), 0.125, "No Pneumothorax", threshold=0.5)
    (warning,) = [line for line in picture.band.lines if line.text == NOT_FOR_DIAGNOSTIC_USE]
    left, top, right, bottom = warning.box
    ink = picture.rgb[top:bottom, left:right].reshape(-1, 3).astype(int)
    amber = (ink[:, 0] > 200) & (ink[:, 1] > 150) & (ink[:, 2] < 80)
    assert amber.any()
    assert np.all(picture.rgb[picture.image_top - 1] == RULE_COLOUR)


def test_the_picture_can_be_saved_and_read_back_as_png(tmp_path: Path) -> None:
    picture = render_picture(gradient(300, 520), gaussian_heatmap(7, (3.0, 3.0)), 0.5, "P",
                             threshold=0.5)
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
        ({"threshold": 1.01}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"related_series": "Segmentation: series 9003"}, "related_series"),
        ({"related_series": ["", "x"]}, "related_series"),
    ],
)
def test_picture_rejects_invalid_inputs(change: dict, argument: str) -> None:
    arguments = dict(
        grey8=np.zeros((64, 64), np.uint8),
        heatmap=np.zeros((4, 4)),
        probability=0.5,
        label="Pneumothorax",
        threshold=0.5,
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=argument):
        render_picture(**arguments)
