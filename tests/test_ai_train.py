"""The tiny configuration end to end through the commands: train 1 epoch on 16 files at
64 px, export, reload, predict the same numbers; then predict, cam, localise and stats."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ai.artifact import load_artifact
from ai.commands import register
from ai.infer import Analyzer
from ai.preprocess import read_grey8

SIIM = Path(
    os.environ.get(
        "PNEUMONODE_SIIM_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim_small",
    )
)
pytestmark = pytest.mark.skipif(not SIIM.is_dir(), reason="siim_small data not available")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pneumonode")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("train") / "model"
    assert (
        run("train", "--data", str(SIIM), "--out", str(out), "--recipe", "tiny", "--device", "cpu")
        == 0
    )
    return out


def test_training_writes_artifact_and_reports(trained):
    assert (trained / "model.safetensors").is_file() and (trained / "model.json").is_file()
    meta = json.loads((trained / "model.json").read_text())
    training = meta["training"]
    assert training["n_items"] == 16 and len(training["validation_files"]) == 4
    assert set(training["validation_files"]).isdisjoint(training["train_files"])
    assert len(training["data_fingerprint"]) == 64
    assert training["config"]["name"] == "tiny"
    metrics = json.loads((trained / "reports" / "metrics.json").read_text())
    for key in (
        "accuracy",
        "roc_auc",
        "sensitivity",
        "specificity",
        "confusion_matrix",
        "n_per_class",
    ):
        assert key in metrics
    assert sum(metrics["confusion_matrix"].values()) == 4
    assert metrics["export_check_max_abs_diff"] < 1e-5
    for name in ("loss.png", "confusion_matrix.png", "roc.png", "top_losses.png", "results.png"):
        assert (trained / "reports" / name).stat().st_size > 1000, name


def test_reloaded_model_predicts_the_learners_numbers(trained):
    table = pd.read_csv(trained / "reports" / "validation_predictions.csv")
    analyzer = Analyzer(load_artifact(trained, device="cpu"), precision="fp32")
    images = [read_grey8(SIIM / name) for name in table["file"]]
    np.testing.assert_allclose(analyzer.predict(images), table["probability"], atol=1e-5)


def test_predict_command_prints_table_and_csv(trained, tmp_path, capsys):
    files = sorted((SIIM / "train" / "Pneumothorax").glob("*.dcm"))[:3]
    csv_path = tmp_path / "predictions.csv"
    assert (
        run(
            "predict",
            str(trained),
            *map(str, files),
            "--csv",
            str(csv_path),
            "--batch-size",
            "2",
            "--device",
            "cpu",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "sop_instance_uid" in printed and "1.2.276.0.7230010" in printed
    table = pd.read_csv(csv_path)
    assert list(table.columns) == ["file", "sop_instance_uid", "probability", "label"]
    assert len(table) == 3 and table["probability"].between(0, 1).all()


def test_predict_reports_unreadable_files(trained, tmp_path, capsys):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"nope")
    assert run("predict", str(trained), str(bad), "--device", "cpu") == 1
    assert "error" in capsys.readouterr().out


def test_cam_command_writes_picture(trained, tmp_path):
    source = sorted((SIIM / "train" / "Pneumothorax").glob("*.dcm"))[0]
    out = tmp_path / "cam.png"
    assert (
        run(
            "cam",
            str(trained),
            str(source),
            "--method",
            "gradcam",
            "--out",
            str(out),
            "--device",
            "cpu",
        )
        == 0
    )
    assert out.stat().st_size > 10_000
    assert (
        run(
            "cam",
            str(trained),
            str(source),
            "--method",
            "cam",
            "--target",
            "No Pneumothorax",
            "--out",
            str(tmp_path / "cam2.png"),
            "--device",
            "cpu",
        )
        == 0
    )


def test_localise_command(trained, tmp_path):
    assert (
        run(
            "localise", str(trained), "--data", str(SIIM), "--out", str(tmp_path), "--device", "cpu"
        )
        == 0
    )
    summary = json.loads((tmp_path / "localisation.json").read_text())
    assert summary["n_images"] >= 1
    assert 0.0 <= summary["peak_in_mask_rate"] <= 1.0
    assert 0.0 <= summary["mean_energy_in_mask"] <= 1.0


def test_stats_command(tmp_path):
    files = sorted((SIIM / "train" / "No Pneumothorax").glob("*.dcm"))[:3]
    assert run("stats", *map(str, files), "--out", str(tmp_path)) == 0
    table = pd.read_csv(tmp_path / "cohort.csv")
    assert len(table) == 3
    for column in (
        "SOPInstanceUID",
        "PatientAge",
        "img_min",
        "img_max",
        "img_mean",
        "img_std",
        "img_pct_window",
    ):
        assert column in table.columns
    assert (tmp_path / "age_histogram.png").is_file()
    assert (tmp_path / "sex_counts.png").is_file()
