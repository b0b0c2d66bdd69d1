"""A real viewer draws the node's results over the X-ray: OHIF v3 (3.13.2, the built viewer
from the npm registry) in headless Chromium, against Orthanc's DICOMweb plugin (Debian's
orthanc-dicomweb 1.7, which OHIF reads without trouble), both on loopback behind one origin.

The node writes the SR, SEG and SC of a SIIM image for a segmentation map drawn here (two
regions: a disc on the image's right, a rectangle with a hole on its left), as the worker
would; the source and the three results go to Orthanc; the test opens the study in OHIF,
double-clicks the SR and the SEG thumbnails, and checks the viewport's pixels. Screenshots
go to the test's tmp_path and, when $PNEUMONODE_SCREENSHOTS is set, to that folder.

What OHIF 3.13.2 does with the node's objects (seen here, with its console errors):
- The SR: drawn, read-only. Its viewport outlines each region in green over the X-ray,
  labelled with the probability. OHIF cannot hydrate it into editable measurements ("This
  structured report is not compatible with this application."): cornerstone's adapters
  take a POLYLINE of more than 5 points only from a Cornerstone tracking identifier
  ("Cornerstone3DTools@^0.1.0:PlanarFreehandROI"). OHIF merges measurement groups that
  share a Tracking Unique Identifier and draws only the first outline
  (cornerstone-dicom-sr `_getMergedContentSequencesByTrackingUniqueIdentifiers`), so the
  node gives each region its own tracking UID (the largest keeps the finding's, the SEG
  segment's).
- The SEG: drawn in red over the X-ray, both regions (the hole too). Before the node added
  the shared Pixel Measures and Plane Orientation functional groups (a SEG without a Frame
  of Reference needs neither to be valid: dciodvfy reports 0 errors either way) OHIF's SEG
  viewport failed with "TypeError: Cannot destructure property 'SpacingBetweenSlices' of
  'PixelMeasures' as it is undefined" (`_getReferencedDisplaySetMetadata`) and a blank page;
  with Pixel Measures alone, cornerstone's SEG adapter failed next with "Cannot read
  properties of undefined (reading 'ImageOrientationPatient')" (`checkOrientation`).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_result_kinds import analysed, node_context, segmentation_map, siim, stored
from test_results_seg import dciodvfy_errors

from node.testing.ohif import OhifServer, ohif_dist, serve_ohif
from node.testing.orthanc import DICOMWEB_PLUGIN, OrthancProcess, start_orthanc
from storage.jobs import JobQueue

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:The string .* person name:UserWarning",
        "ignore:Invalid value for VR:UserWarning",
    ),
]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
)
LOAD_TIMEOUT = 120  # seconds for OHIF to show what was asked; never a timing assertion


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -c constraints.txt -e '.[test]')"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "chromium or chromedriver not found (apt install chromium chromium-driver)"
    if not (ohif_dist() / "index.html").is_file():
        return f"OHIF's built viewer is not at {ohif_dist()} (run setup.sh)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"{DICOMWEB_PLUGIN} not found (apt install orthanc-dicomweb)"
    return None


@dataclass
class Study:
    uid: str
    files: dict[str, Path]  # source, sr, seg, sc
    orthanc: OrthancProcess
    ohif: OhifServer
    screenshots: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """The node's results for one SIIM image in Orthanc (DICOMweb), and OHIF served."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("viewer")
    context = node_context(root)
    source = siim()
    uid = analysed(context, source, probability=0.93, heatmap=segmentation_map())
    files = {"source": root / "source.dcm"}
    pydicom.dcmwrite(files["source"], source, enforce_file_format=True)
    results = JobQueue(context.engine).results_of(uid)
    for kind in ("sr", "seg", "sc"):
        files[kind] = root / f"{kind}.dcm"
        made = stored(context, results[kind].sop_instance_uid)
        pydicom.dcmwrite(files[kind], made, enforce_file_format=True)
    orthanc = start_orthanc(root / "orthanc", dicomweb=True)
    try:
        for path in files.values():
            assert orthanc.upload(path)["Status"] == "Success", path
        ohif = serve_ohif(ohif_dist(), orthanc.url)
        try:
            yield Study(str(source.StudyInstanceUID), files, orthanc, ohif)
        finally:
            ohif.stop()
    finally:
        orthanc.stop()


@pytest.fixture
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        # WebGL without a GPU: SwiftShader, which Chromium asks to be allowed explicitly.
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


class Viewer:
    """OHIF on one study in a browser: thumbnails, the viewport's pixels, the console."""

    def __init__(self, driver, study: Study, shots: Path) -> None:
        self.driver, self.study, self.shots = driver, study, shots
        self.console: list[str] = []

    def open(self) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(f"{self.study.ohif.url}/viewer?StudyInstanceUIDs={self.study.uid}")
        self.wait(lambda: len(self.thumbnails()) >= 4, "the study's four series")
        self.wait(lambda: self.count(_grey) > 10_000, "the X-ray in the viewport")
        for button in self.driver.find_elements(By.XPATH, "//*[text()='Skip all']"):
            button.click()  # the first-visit tour would cover the viewport

    def thumbnails(self) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(
            By.CSS_SELECTOR, '[data-cy^="study-browser-thumbnail"]'
        )

    def show(self, modality: str, series_number: int) -> None:
        """Double-click the thumbnail of that series: OHIF loads it into the viewport."""
        from selenium.webdriver.common.action_chains import ActionChains

        for thumbnail in self.thumbnails():
            words = thumbnail.text.split()
            if modality in words and f"S:{series_number}" in words:
                ActionChains(self.driver).double_click(thumbnail).perform()
                return
        texts = [t.text for t in self.thumbnails()]
        raise AssertionError(f"no {modality} thumbnail of series {series_number}: {texts}")

    def click_text(self, text: str) -> bool:
        from selenium.webdriver.common.by import By

        buttons = self.driver.find_elements(By.XPATH, f"//button[normalize-space()='{text}']")
        for button in buttons:
            button.click()
        return bool(buttons)

    def viewport(self) -> np.ndarray:
        """The viewport's pixels (RGB) as the page shows them."""
        from PIL import Image
        from selenium.webdriver.common.by import By

        pane = self.driver.find_element(By.CSS_SELECTOR, '[data-cy="viewport-pane"]')
        picture = Image.open(io.BytesIO(pane.screenshot_as_png)).convert("RGB")
        return np.asarray(picture).astype(np.int16)

    def count(self, colour: Callable[[np.ndarray], np.ndarray]) -> int:
        try:
            return int(colour(self.viewport()).sum())
        except Exception:  # noqa: BLE001 - the pane is not there yet (or the page died)
            return 0

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT
        while time.monotonic() < deadline:
            self.read_console()
            if self.console:  # OHIF reported an error: it will not show it
                break
            if condition():
                return
            time.sleep(1)
        self.screenshot("not-shown")
        raise AssertionError(f"OHIF did not show {what}; console errors: {self.errors()}")

    def read_console(self) -> None:
        for entry in self.driver.get_log("browser"):
            if entry["level"] == "SEVERE":
                self.console.append(entry["message"])

    def errors(self) -> list[str]:
        self.read_console()
        return list(self.console)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"ohif-{name}.png"
        self.driver.save_screenshot(str(path))
        self.study.screenshots.append(path)
        if os.environ.get("PNEUMONODE_SCREENSHOTS"):
            folder = Path(os.environ["PNEUMONODE_SCREENSHOTS"])
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name)
        return path


def _grey(rgb: np.ndarray) -> np.ndarray:
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return (spread < 8) & (rgb.mean(axis=2) > 40)


def _yellow(rgb: np.ndarray) -> np.ndarray:
    """OHIF's colour for the SR's other measurements: rgb(255, 255, 0)."""
    r, g, b = rgb[..., 0].astype(int), rgb[..., 1].astype(int), rgb[..., 2].astype(int)
    return (r > 150) & (g > 150) & (r - b > 80) & (g - b > 80)


def _green(rgb: np.ndarray) -> np.ndarray:
    """OHIF's colour for the SR's active measurement: rgb(0, 255, 0)."""
    r, g, b = rgb[..., 0].astype(int), rgb[..., 1].astype(int), rgb[..., 2].astype(int)
    return (g > 150) & (g - r > 80) & (g - b > 80)


def _red(rgb: np.ndarray) -> np.ndarray:
    """A segment's fill over grey: red clearly above green and blue."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - g > 40) & (r - b > 40)


@pytest.fixture
def viewer(browser, study: Study, tmp_path: Path) -> Viewer:
    opened = Viewer(browser, study, tmp_path)
    opened.open()
    return opened


def test_ohif_outlines_the_sr_region_over_the_xray(viewer: Viewer) -> None:
    before = viewer.viewport()
    viewer.screenshot("source")
    assert _green(before).sum() == 0

    viewer.show("SR", 9002)
    viewer.wait(lambda: viewer.count(_green) > 200, "the SR's region outline")
    viewer.screenshot("sr-region")
    after = viewer.viewport()
    # Both regions outlined, each its own measurement: the largest (the disc, right of
    # centre) active in green, the rectangle left of it in yellow.
    middle = after.shape[1] / 2
    assert (np.nonzero(_green(after))[1] > middle).sum() > 100
    assert (np.nonzero(_yellow(after))[1] < middle).sum() > 100
    assert _grey(after).sum() > 10_000  # still over the X-ray
    assert viewer.errors() == []


def _shows_the_mask(viewer: Viewer, series_number: int, name: str) -> None:
    before = viewer.count(_red)
    viewer.show("SEG", series_number)
    viewer.wait(lambda: viewer.count(_red) > before + 5_000, "the SEG's mask (a preview)")
    # OHIF asks whether to open (hydrate) the segmentation: yes, and it stays drawn.
    viewer.wait(lambda: viewer.click_text("Yes"), "the question whether to open the SEG")
    viewer.wait(lambda: not viewer.click_text("Yes") and viewer.count(_red) > before + 5_000,
                "the SEG's mask, opened")
    viewer.screenshot(name)
    mask = _red(viewer.viewport())
    columns = np.nonzero(mask)[1]
    # Both regions: the disc right of centre and the rectangle left of it.
    assert (columns > mask.shape[1] / 2).sum() > 1_000
    assert (columns < mask.shape[1] / 2).sum() > 1_000
    assert viewer.errors() == []


def test_ohif_draws_the_nodes_seg_mask_over_the_xray(viewer: Viewer) -> None:
    assert dciodvfy_errors(viewer.study.files["seg"]) == []
    _shows_the_mask(viewer, 9003, "seg-mask")
