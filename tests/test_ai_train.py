"""The tiny configuration end to end through the commands: cross-validate (3 folds) and
train 1 epoch on 16 files at 64 px (as a user would, with its output going to a log file),
export, reload, predict the same numbers; then predict, cam, localise and stats."""

from __future__ import annotations

import argparse
import json
import logging
import stat
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ai.analysis.infer import Analyzer
from ai.cli.commands import register
from ai.data.preprocess import read_grey8
from ai.model.artifact import load_artifact
from node.testing.node_process import node_command, node_env
from node.testing.samples import siim_dir, siim_missing_reason

SIIM = siim_dir()
pytestmark = pytest.mark.skipif(
    siim_missing_reason() is not None, reason=siim_missing_reason() or ""
)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pneumonode")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`pneumonode train` with stdout and stderr in a log file, not a terminal."""
    out = tmp_path_factory.mktemp("train") / "model"
    log_path = out.parent / "train.log"
    with log_path.open("wb") as log:
        result = subprocess.run(
            node_command(
                Path("unused.toml"),
                "train",
                "--data",
                str(SIIM),
                "--out",
                str(out),
                "--recipe",
                "tiny",
                "--device",
                "cpu",
                "--cache-dir",
                str(out.parent / "cache"),
            ),
            env={**node_env(), "OMP_NUM_THREADS": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    assert result.returncode == 0, log_path.read_text()[-3000:]
    return out


def test_training_log_is_readable_when_not_on_a_terminal(trained):
    text = (trained.parent / "train.log").read_text()
    assert "\r" not in text, "progress-bar fragments in the log"
    assert "Warning" not in text, "library warnings on the console"
    assert "epoch 1/1: train_loss " in text and "valid_loss " in text and "accuracy " in text
    assert "fold 3/3" in text and "roc_auc: " in text
    assert len(text) < 16000, text


def test_training_writes_artifact_and_reports(trained):
    assert (trained / "model.safetensors").is_file() and (trained / "model.json").is_file()
    meta = json.loads((trained / "model.json").read_text())
    training = meta["training"]
    assert training["n_items"] == 16 and len(training["train_files"]) == 16
    folds = training["folds"]
    assert sorted(name for files in folds.values() for name in files) == sorted(
        training["train_files"]
    )  # every image in exactly one validation fold
    assert len(training["data_fingerprint"]) == 64
    assert training["config"]["name"] == "tiny"
    assert training["card"]["intended_use"].count("Not for diagnosis") == 1
    assert training["card"]["data"]["n_images"] == 16
    metrics = json.loads((trained / "reports" / "metrics.json").read_text())
    assert metrics["cross_validated"] is True and metrics["evaluation"].startswith("3-fold")
    assert meta["metrics"]["cross_validated"] is True
    for key in ("roc_auc", "sensitivity", "specificity", "gradcam_peak_in_mask"):
        figure = metrics["figures"][key]
        assert figure["low"] <= figure["mean"] <= figure["high"], key
    assert len(metrics["per_fold"]) == 3
    assert metrics["export_check"]["max_abs_probability_diff"] < 1e-5
    table = pd.read_csv(trained / "reports" / "cv_predictions.csv")
    assert len(table) == 16 and set(table["fold"]) == {0, 1, 2}
    for name in ("loss.png", "confusion_matrix.png", "roc.png", "top_losses.png", "results.png"):
        assert (trained / "reports" / name).stat().st_size > 1000, name
    for name in ("model.json", "model.safetensors"):
        assert stat.S_IMODE((trained / name).stat().st_mode) == 0o644, name


def test_training_runs_no_lr_find_unless_asked(trained):
    text = (trained.parent / "train.log").read_text()
    assert "lr_find: valley" not in text
    assert not (trained / "reports" / "lr_find.png").exists()
    training = json.loads((trained / "model.json").read_text())["training"]
    assert training["lr_find"] is None and training["lr"] == training["config"]["lr"]


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
    assert "error" not in printed  # the column shows only when a file failed
    threshold = load_artifact(trained, device="cpu").threshold
    header, *rows = printed.splitlines()
    assert header.split()[2:5] == ["probability", "threshold", "label"]
    assert [row.split()[3] for row in rows] == [f"{threshold:.4f}"] * 3  # beside each
    table = pd.read_csv(csv_path, keep_default_na=False)
    assert list(table.columns) == [
        "file", "sop_instance_uid", "probability", "threshold", "label", "error"
    ]
    assert len(table) == 3 and table["probability"].between(0, 1).all()
    assert (table["threshold"] == threshold).all()
    # The label follows from the probability and the threshold beside it.
    positive = table["probability"] >= table["threshold"]
    assert list(table["label"]) == ["Pneumothorax" if p else "No Pneumothorax" for p in positive]
    # Every digit the model gave, as the SR carries it (not rounded to 4 decimals); the same
    # batches, since a convolution's last bit can depend on the batch it runs in.
    analyzer = Analyzer(load_artifact(trained, device="cpu"), precision="fp32", batch_size=2)
    expected = analyzer.predict([read_grey8(path) for path in files])
    assert list(table["probability"]) == expected
    assert table["error"].eq("").all()


def test_predict_reports_unreadable_files_in_an_error_column(trained, tmp_path, capsys):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"nope")
    good = sorted((SIIM / "train" / "Pneumothorax").glob("*.dcm"))[0]
    csv_path = tmp_path / "predictions.csv"
    argv = ["predict", str(trained), str(bad), str(good), "--csv", str(csv_path)]
    assert run(*argv, "--device", "cpu") == 1
    assert "not a readable DICOM file" in capsys.readouterr().out
    table = pd.read_csv(csv_path, keep_default_na=False)
    assert list(table["file"]) == [str(bad), str(good)]  # the order given
    failed, read = table.iloc[0], table.iloc[1]
    assert (failed["probability"], failed["threshold"], failed["label"]) == ("", "", "")
    assert failed["error"].startswith("not a readable DICOM file")
    assert read["error"] == "" and read["label"] in ("Pneumothorax", "No Pneumothorax")


def test_cam_command_writes_picture(trained, tmp_path, capsys):
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
    # The path, then the probability beside the threshold and the label with its side of it.
    threshold = load_artifact(trained, device="cpu").threshold
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"{out}: P(Pneumothorax) = ")
    assert f"(threshold {threshold:.4f}) -> " in printed
    assert printed.count("threshold") == 2 and (
        "-> Pneumothorax (at or above threshold)" in printed
        or "-> No Pneumothorax (below threshold)" in printed
    )
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


def test_localise_command(trained, tmp_path, capsys):
    # The final model saw every image: the validation scope is refused with the reason,
    # naming the cross-validated file train wrote.
    train_file = trained / "reports" / "localisation.csv"
    assert run("localise", str(trained), "--data", str(SIIM), "--device", "cpu") == 2
    assert str(train_file) in capsys.readouterr().err
    assert (
        run(
            "localise", str(trained), "--data", str(SIIM), "--out", str(tmp_path), "--device",
            "cpu", "--scope", "all",
        )
        == 0
    )
    summary = json.loads((tmp_path / "localisation-all.json").read_text())
    assert summary["n_images"] == 60 and summary["method"] == "gradcam"
    assert 0.0 <= summary["peak_in_mask_rate"] <= 1.0
    assert 0.0 <= summary["mean_energy_in_mask"] <= 1.0
    assert len(pd.read_csv(tmp_path / "localisation-all.csv")) == 60


def test_localise_never_replaces_the_localisation_train_wrote(trained, capsys):
    reports = trained / "reports"
    written_by_train = (reports / "localisation.csv").read_bytes()
    args = ("localise", str(trained), "--data", str(SIIM), "--device", "cpu", "--scope", "all")
    assert run(*args) == 0  # into <model>/reports, its default
    assert (reports / "localisation.csv").read_bytes() == written_by_train
    assert (reports / "localisation-all.csv").is_file()
    assert "localisation-all.json" in capsys.readouterr().out


def test_stats_command(tmp_path, capsys, caplog, monkeypatch):
    import ai.data.stats

    monkeypatch.setattr(ai.data.stats, "parquet_available", lambda: False)
    files = sorted((SIIM / "train" / "No Pneumothorax").glob("*.dcm"))[:3]
    with caplog.at_level(logging.INFO, logger="ai.cli.console"):
        assert run("stats", *map(str, files), "--out", str(tmp_path)) == 0
    assert "stats: 3/3 files done" in caplog.text  # progress, as log lines off a terminal
    err = capsys.readouterr().err
    assert "pyarrow" in err  # says why there is no Parquet file
    assert "pip install -e '.[parquet]'" in err  # and how to get it, as the README says
    assert not (tmp_path / "cohort.parquet").exists()
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
