"""The demo model shipped in the package (ai/demo_model): it loads, it is what its card says,
it reproduces the predictions recorded when it was made, and a node on its embedded defaults
analyses with it and says so in every result."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from analysis_support import analysed, delivered, predict_with_cli, wait_for
from pydicom import dcmread
from pydicom.data import get_testdata_file
from support import PROBABILITY_TOLERANCE, REPO_ROOT

from ai.model.choice import DEMO_MODEL_DIR, choose_model
from node.testing.dcmtk import StoreSCP
from node.testing.node_process import storescu
from node.testing.samples import siim_dir, small_image

CARD = DEMO_MODEL_DIR / "MODEL_CARD.md"
RECORDED = DEMO_MODEL_DIR / "predictions.csv"
MAX_BYTES = 4 * 1024 * 1024  # a shipped demo model stays under 4 MB


def _meta() -> dict:
    return json.loads((DEMO_MODEL_DIR / "model.json").read_text())


def _recorded() -> list[dict[str, str]]:
    with RECORDED.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _source(name: str) -> Path | None:
    """`siim:<path under the sample>` or `pydicom:<test file>`; None when not on this machine."""
    kind, _, rest = name.partition(":")
    if kind == "pydicom":
        return Path(get_testdata_file(rest))
    path = siim_dir() / rest
    return path if path.is_file() else None


def test_the_shipped_model_is_small_and_says_it_is_a_demo() -> None:
    assert DEMO_MODEL_DIR.parent == REPO_ROOT / "ai"
    weights = DEMO_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < MAX_BYTES
    meta = _meta()
    assert "DEMO" in meta["name"] and "not for diagnosis" in meta["name"]
    card = meta["training"]["card"]
    assert "not for diagnosis" in card["intended_use"].lower()
    assert card["evaluation"].startswith("5-fold")


def test_the_model_loads_and_matches_its_card() -> None:
    from ai.model.artifact import load_artifact

    loaded = load_artifact(DEMO_MODEL_DIR, device="cpu")
    meta = _meta()
    assert loaded.name == meta["name"]
    text = CARD.read_text()
    figures = meta["training"]["card"]["cross_validated_figures"]
    for name in ("roc_auc", "sensitivity", "specificity"):
        figure = figures[name]
        assert f"{figure['mean']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]" in text, name
    assert f"{meta['threshold']:.4f}" in text
    assert meta["training"]["card"]["data"]["n_images"] == 200
    assert "pneumonode train" in text and "--name" in text  # how it was made


def test_the_model_reproduces_its_recorded_predictions(tmp_path: Path) -> None:
    rows = [row for row in _recorded() if _source(row["source"]) is not None]
    assert any(row["source"].startswith("pydicom:") for row in rows)
    files = [_source(row["source"]) for row in rows]
    got = predict_with_cli(DEMO_MODEL_DIR, files, tmp_path / "predictions.csv")
    for row in rows:
        assert got[row["sop_instance_uid"]] == pytest.approx(
            float(row["probability"]), abs=PROBABILITY_TOLERANCE
        ), row["source"]


def test_a_users_model_replaces_the_demo(tmp_path: Path) -> None:
    assert choose_model(tmp_path / "none", demo_allowed=True).is_demo
    assert choose_model(tmp_path / "none", demo_allowed=False) is None
    from ai.train.tiny_artifact import build_tiny_artifact

    mine = build_tiny_artifact(tmp_path / "mine", seed=0)
    choice = choose_model(mine, demo_allowed=True)
    assert choice.folder == mine and not choice.is_demo


def test_a_node_on_its_defaults_analyses_with_the_demo_and_says_so(
    tmp_path: Path, node_factory
) -> None:
    """No model at analysis.model and no train step: the demo analyses, the results reach
    the caller's peer, and the SR's algorithm, the SC's caption and status name the demo."""
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS")
    scp.start()
    try:
        node = node_factory(
            {
                "analysis": {"enabled": True, "model": str(tmp_path / "no-model-here"),
                             "device": "cpu"},
                "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}],
            }
        )
        image = tmp_path / "chest.dcm"
        small_image(rows=64, columns=64).save_as(image, enforce_file_format=True)
        assert storescu(node, [image], calling="PACS").returncode == 0
        wait_for(analysed(node, 1), 180, "analysis by the demo model")
        wait_for(delivered(node, 2), 60, "the SC and SR delivered")
        log = node.log_text()
        assert "analysis uses the shipped DEMO model" in log
        received = [dcmread(p) for p in (tmp_path / "pacs").iterdir()]
        sr = next(ds for ds in received if ds.Modality == "SR")
        texts = [str(e.value) for e in sr.iterall() if isinstance(e.value, str)]
        assert any("DEMO" in text for text in texts)  # the algorithm's name
        sc = next(ds for ds in received if ds.Modality != "SR")
        assert "DEMO" in sc.ManufacturerModelName  # and burned into its caption
    finally:
        scp.stop()
