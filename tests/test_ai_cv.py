"""Cross-validation, the decoded-image cache, the mask head, TTA and bring-your-own weights,
on synthetic data and the tiny recipes (seconds on a CPU)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sklearn.metrics import roc_auc_score
from support import require_siim, siim_file

from ai.analysis.infer import Analyzer
from ai.data.imagecache import ImageCache, entry_key
from ai.data.labelled import NEGATIVE, POSITIVE, load_items
from ai.model.architectures import ArchSpec, build_model
from ai.model.artifact import describe, in_memory, load_artifact, save_artifact
from ai.model.segmodel import ClassifySegment
from ai.model.weights import load_init_weights
from ai.train.folds import assign_folds, bootstrap_auc, mean_interval, rank_auc
from ai.train.recipes import get_recipe

SIZE = 64


def test_folds_are_disjoint_stratified_and_grouped_by_patient():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(150)]  # three images per patient
    labels = [POSITIVE if rng.random() < 0.3 else NEGATIVE for _ in patients]
    folds = assign_folds(labels, patients, 5, seed=1)
    assert folds.shape == (150,) and set(folds) == {0, 1, 2, 3, 4}  # each image in one fold
    table = pd.DataFrame({"patient": patients, "label": labels, "fold": folds})
    assert table.groupby("patient")["fold"].nunique().max() == 1  # no patient on two sides
    share = table["label"].eq(POSITIVE).mean()
    for _, fold in table.groupby("fold"):
        assert abs(fold["label"].eq(POSITIVE).mean() - share) < 0.15
    np.testing.assert_array_equal(folds, assign_folds(labels, patients, 5, seed=1))


def test_folds_refuse_too_few_images_of_a_class():
    with pytest.raises(ValueError, match="at least 5 images"):
        assign_folds([POSITIVE] * 3 + [NEGATIVE] * 20, [str(i) for i in range(23)], 5, 0)


def test_interval_contains_the_fold_mean_and_skips_undefined_folds():
    summary = mean_interval([0.6, 0.7, None, 0.8, float("nan"), 0.75])
    assert summary["n"] == 4
    assert summary["low"] <= summary["mean"] <= summary["high"]
    assert summary["mean"] == pytest.approx(np.mean([0.6, 0.7, 0.8, 0.75]))
    assert mean_interval([0.99, 0.2, 0.98])["high"] <= 1.0  # rates stay in 0..1
    assert mean_interval([None])["mean"] is None


def test_rank_auc_is_sklearns_and_the_bootstrap_brackets_it():
    rng = np.random.default_rng(3)
    truth = rng.random(80) < 0.3
    scores = np.round(rng.random(80) + truth * 0.4, 1)  # ties included
    assert rank_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores))
    pooled = bootstrap_auc(truth, scores, rounds=300)
    assert pooled["low"] <= pooled["auc"] <= pooled["high"]


def _write_dicom(path: Path, pixels: np.ndarray, patient: str, uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.PatientID, ds.Modality = patient, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _rle(mask: np.ndarray) -> str:
    """Kaggle's relative run-length code of a mask (column-major)."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    values, previous = [], 0
    for start, end in zip(edges[0::2], edges[1::2], strict=True):
        values += [int(start - previous), int(end - start)]
        previous = end
    return " ".join(map(str, values))


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """A Kaggle SIIM layout (dicom-images-train/<study>/<series>/<uid>.dcm, train-rle.csv)
    with 240 small images of 160 patients; positives carry a bright square and its mask."""
    root = tmp_path_factory.mktemp("kaggle")
    rng = np.random.default_rng(7)
    rows = []
    for index in range(240):
        uid = generate_uid()
        positive = index % 3 == 0
        pixels = rng.integers(0, 120, (96, 96), dtype=np.uint8)
        mask = np.zeros((96, 96), dtype=bool)
        if positive:
            y, x = rng.integers(8, 60, 2)
            mask[y:y + 24, x:x + 24] = True
            pixels[mask] = 230
        study, series = generate_uid(), generate_uid()
        _write_dicom(root / "dicom-images-train" / study / series / f"{uid}.dcm", pixels,
                     f"patient{index % 160}", uid)
        rows.append((uid, _rle(mask) if positive else "-1"))
    table = pd.DataFrame(rows, columns=["ImageId", " EncodedPixels"])
    with gzip.open(root / "train-rle.csv.gz", "wt") as handle:
        table.to_csv(handle, index=False)
    return root


def test_kaggle_layout_is_read_and_cached_in_parallel(kaggle, tmp_path):
    items = load_items(kaggle)
    assert len(items) == 240 and items["label"].eq(POSITIVE).sum() == 80
    from ai.train.workflow import mask_codes

    masks = mask_codes(kaggle)
    assert len(masks) == 80
    cache = ImageCache(tmp_path / "cache", 32, workers=2, process_threshold=0)
    paths = list(items["path"])
    assert cache.fill(paths, masks) == 240
    assert cache.fill(paths, masks) == 0  # a second run decodes nothing
    entries = cache.load(paths)
    first = entries[paths[0]]
    assert first.image.shape == (32, 32) and first.image.dtype == np.uint8
    assert first.patient_id.startswith("patient") and first.sop_instance_uid == Path(paths[0]).stem
    with_mask = [p for p, label in zip(paths, items["label"], strict=True) if label == POSITIVE]
    assert all(entries[p].mask is not None and entries[p].mask.sum() > 0 for p in with_mask)
    assert all(entries[p].mask is None for p in set(paths) - set(with_mask))
    # the cached pixels are the node's: read_grey8 + resize_grey8
    from ai.data.preprocess import read_grey8, resize_grey8

    expected = resize_grey8([read_grey8(paths[0])], 32)[0].numpy()
    np.testing.assert_array_equal(np.asarray(first.image), expected)
    assert first.shape == (96, 96)
    key = entry_key(paths[0], 32)
    Path(paths[0]).touch()  # a changed file misses the cache
    assert entry_key(paths[0], 32) != key


def test_kaggle_layout_cross_validates_with_the_tiny_mask_recipe(kaggle, tmp_path):
    from ai.train.workflow import train

    config = get_recipe("tiny-mask").with_overrides(max_items=48, size=32, lr=3e-3)
    result = train(config, kaggle, tmp_path / "model", device="cpu",
                   cache_dir=tmp_path / "cache", workers=2)
    metrics = result.metrics
    assert metrics["cross_validated"] is True and metrics["n_folds"] == 3
    meta = load_artifact(result.model_dir, device="cpu").meta
    assert meta["heatmap"] == "segmentation" and "card" in meta["training"]
    fold_files = meta["training"]["folds"]
    union = [name for files in fold_files.values() for name in files]
    assert sorted(union) == sorted(meta["training"]["train_files"]) and len(union) == 48
    for figure in ("roc_auc", "segmentation_peak_in_mask", "gradcam_peak_in_mask"):
        value = metrics["figures"][figure]
        assert value["low"] <= value["mean"] <= value["high"], figure
    assert metrics["export_check"]["max_abs_probability_diff"] < 1e-5
    assert metrics["export_check"]["max_abs_map_diff"] < 1e-5
    table = pd.read_csv(result.model_dir / "reports" / "cv_predictions.csv")
    assert len(table) == 48 and table["file"].is_unique
    assert (result.model_dir / "reports" / "localisation.csv").is_file()


def _tiny_mask_model(seed: int = 0) -> tuple[ClassifySegment, dict]:
    config = get_recipe("tiny-mask")
    torch.manual_seed(seed)
    model = build_model(config.arch, config.size).eval()
    description = dict(arch=config.arch, input_size=config.size,
                       classes=[NEGATIVE, POSITIVE], positive_class=POSITIVE)
    return model, description


def test_mask_model_exports_reloads_and_reproduces_probabilities_and_maps(tmp_path):
    model, description = _tiny_mask_model()
    assert isinstance(model, ClassifySegment)
    save_artifact(tmp_path / "model", model, **description)
    loaded = load_artifact(tmp_path / "model", device="cpu")
    assert loaded.has_mask_head and loaded.heatmap_method == "segmentation"
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (90, 70), dtype=np.uint8) for _ in range(3)]
    before = Analyzer(in_memory(model, describe(model, **description)), precision="fp32")
    after = Analyzer(loaded, precision="fp32")
    for method in ("segmentation", "gradcam"):
        first, second = before.explain(images, method=method), after.explain(images, method=method)
        for a, b in zip(first, second, strict=True):
            assert a.method == b.method == method
            assert a.probability == pytest.approx(b.probability, abs=1e-6)
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6)
            assert a.heatmap.shape == (64, 64) and 0 <= a.heatmap.min() <= a.heatmap.max() <= 1
    x = torch.rand(2, 1, 64, 64)
    logits, mask = model.forward_both(x)
    assert mask.shape == (2, 1, 64, 64)
    torch.testing.assert_close(logits, model(x))  # one encoder, the same class logits


def test_heatmap_setting_resolves_per_model(tmp_path):
    model, description = _tiny_mask_model()
    with_head = Analyzer(in_memory(model, describe(model, **description)))
    assert with_head.resolve_method("auto") == "segmentation"
    assert with_head.resolve_method("gradcam") == "gradcam"
    config = get_recipe("tiny")
    plain_model = build_model(config.arch)
    plain = Analyzer(in_memory(plain_model, describe(
        plain_model, arch=config.arch, input_size=64, classes=[NEGATIVE, POSITIVE],
        positive_class=POSITIVE)))
    assert plain.resolve_method("auto") == "gradcam"
    assert plain.resolve_method("segmentation") == "gradcam"  # falls back, with a warning
    with pytest.raises(ValueError, match="mask head"):
        plain.explain([np.zeros((64, 64), np.uint8)], method="segmentation")


def test_tta_averages_the_image_and_its_mirror():
    config = get_recipe("tiny")
    torch.manual_seed(4)
    model = build_model(config.arch).eval()
    args = dict(arch=config.arch, input_size=64, classes=[NEGATIVE, POSITIVE],
                positive_class=POSITIVE)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(3)]
    plain = Analyzer(in_memory(model, describe(model, **args)), precision="fp32")
    tta = Analyzer(in_memory(model, describe(model, tta=True, **args)), precision="fp32")
    mirrored = plain.predict([image[:, ::-1].copy() for image in images])
    expected = (np.asarray(plain.predict(images)) + np.asarray(mirrored)) / 2
    np.testing.assert_allclose(tta.predict(images), expected, atol=1e-6)
    assert len(tta.explain(images)) == 3


def test_init_weights_from_torchvision_resnet_adapts_the_first_convolution(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)  # RGB, 1000 ImageNet classes
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
               path)
    model = build_model(ArchSpec(name="resnet18", act="relu", sa=False))
    report = load_init_weights(model, path)
    torch.testing.assert_close(model.conv1.weight,
                               reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert report.adapted == ["conv1.weight"]
    assert set(report.skipped) == {"fc.weight", "fc.bias"}  # 1000 outputs, ours are 2
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_init_weights_from_densenet_and_from_our_xresnet_into_the_mask_encoder(tmp_path):
    import torchvision

    dense = torchvision.models.densenet121(weights=None)
    torch.save(dense.state_dict(), tmp_path / "densenet.pt")
    model = build_model(ArchSpec(name="densenet121", act="relu", sa=False))
    report = load_init_weights(model, tmp_path / "densenet.pt")
    assert report.adapted == ["features.conv0.weight"] and report.loaded > 300

    config = get_recipe("tiny")
    torch.manual_seed(9)
    ours = build_model(config.arch)
    save_artifact(tmp_path / "ours", ours, arch=config.arch, input_size=64,
                  classes=[NEGATIVE, POSITIVE], positive_class=POSITIVE)
    masked, _ = _tiny_mask_model(seed=1)
    report = load_init_weights(masked, tmp_path / "ours")  # a model directory
    encoder_first = masked.unet.layers[0][0][0].weight
    torch.testing.assert_close(encoder_first, ours[0][0].weight)
    torch.testing.assert_close(masked.head[-1].weight, ours[-1].weight)
    assert report.loaded >= len(ours.state_dict())


def test_sc_and_sr_say_which_method_made_the_map():
    from ai.results.sc.picture import render_picture
    from ai.results.sc.sop import build_heatmap_sc
    from ai.results.sr.sop import build_finding_sr, read_finding

    source = pydicom.dcmread(siim_file("train/Pneumothorax/000001.dcm"))
    grey = np.zeros((64, 64), dtype=np.uint8)
    picture = render_picture(grey, np.zeros((8, 8), np.float32), 0.8, POSITIVE, threshold=0.5,
                             method="segmentation mask")
    common = dict(series_number=9001, instance_number=1)
    sc = build_heatmap_sc(source, picture.rgb, series_instance_uid=generate_uid(),
                          sop_instance_uid=generate_uid(), manufacturer="pneumonode project",
                          model_name="pneumonode", software_version="0.1.0",
                          heatmap_method="segmentation mask", **common)
    assert sc.DerivationDescription.startswith("Segmentation map")
    default = build_heatmap_sc(source, picture.rgb, series_instance_uid=generate_uid(),
                               sop_instance_uid=generate_uid(), manufacturer="pneumonode project",
                               model_name="pneumonode", software_version="0.1.0", **common)
    assert "(GradCAM)" in default.DerivationDescription
    sr = build_finding_sr(source, probability=0.8, present=True, threshold=0.5,
                          algorithm_name="pneumonode", algorithm_version="1",
                          device_observer_name="pneumonode",
                          device_observer_uid="1.2.826.0.1.3680043.8.498.1",
                          device_observer_manufacturer="pneumonode project",
                          series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                          series_number=9002, instance_number=1,
                          heatmap_method="segmentation mask")
    texts = []
    sr.walk(lambda _ds, elem: texts.append(str(elem.value)) if elem.keyword == "TextValue"
            else None)
    assert "heatmap method=segmentation mask" in texts and "decision threshold=0.5" in texts
    assert read_finding(sr).heatmap_method == "segmentation mask"


def test_lr_find_sets_the_rate_and_init_weights_reach_the_fit(tmp_path):
    from ai.train.fit import fit_model
    from ai.train.workflow import prepare

    config = get_recipe("tiny").with_overrides(lr_find=True)
    items, entries, _masks, _root = prepare(config, require_siim(), tmp_path / "cache", workers=1)
    torch.manual_seed(0)
    start = build_model(config.arch)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    fitted = fit_model(items, config, torch.device("cpu"), entries, [0, 1, 2, 3], tmp_path,
                       init_weights=tmp_path / "start.pt", reports=tmp_path / "reports")
    assert fitted.lr == fitted.lr_find["valley"] and fitted.lr != config.lr
    assert (tmp_path / "reports" / "lr_find.png").is_file()
    assert fitted.init["loaded"] == len(start.state_dict()) and not fitted.init["skipped"]


def test_the_colour_scale_says_what_a_mask_map_means() -> None:
    from ai.analysis.methods import METHOD_TITLES
    from ai.results.sc.picture import SEGMENTATION_TITLE, colour_scale

    assert METHOD_TITLES["segmentation"] == SEGMENTATION_TITLE
    assert "probability per pixel" in colour_scale(method=SEGMENTATION_TITLE).title
    assert "relative to this image's maximum" in colour_scale(method="GradCAM").title


def test_the_model_carries_the_cv_chosen_threshold_and_nested_cv_reports(kaggle, tmp_path):
    import json

    from ai.train.crossval import choose_threshold
    from ai.train.workflow import train

    config = get_recipe("tiny").with_overrides(max_items=24, size=32, lr=3e-3)
    result = train(config, kaggle, tmp_path / "model", device="cpu",
                   cache_dir=tmp_path / "cache", workers=1, nested=True)
    metrics, meta = result.metrics, load_artifact(result.model_dir, device="cpu").meta
    table = pd.read_csv(result.model_dir / "reports" / "cv_predictions.csv")
    expected = choose_threshold(table["label"].eq(POSITIVE).to_numpy(),
                                table["probability"].to_numpy(), fallback=0.5)
    assert meta["threshold"] == pytest.approx(expected.threshold) == metrics["threshold"]
    assert metrics["threshold_choice"]["rule"] == expected.rule
    assert "optimistic" in metrics["threshold_choice"]["rates_note"]
    assert meta["training"]["card"]["decision_threshold"]["value"] == meta["threshold"]
    assert metrics["figures_threshold"] == 0.5 and "sensitivity" in metrics["figures"]
    assert meta["training"]["config"]["threshold_rule"] == "youden"

    nested = json.loads((result.model_dir / "reports" / "nested.json").read_text())
    assert nested == json.loads(json.dumps(result.nested, default=str))
    assert nested["complete"] and nested["n_outer_folds"] == 3 and nested["n_inner_folds"] == 2
    assert nested["inner_models_trained"] == 3  # C(3, 2): each serves two outer folds
    pooled = nested["pooled"]
    for key in ("roc_auc_refit", "roc_auc_ensemble"):
        assert set(pooled[key]) == {"auc", "low", "high"}
    assert set(pooled["roc_auc_difference"]) >= {"difference", "low", "high"}
    for model in ("refit", "ensemble"):
        assert set(pooled[f"{model}_at_nested_threshold"]) == {"sensitivity", "specificity"}
    assert pooled["n"] == 24 and len(nested["per_fold"]) == 3
    for row in nested["per_fold"]:
        assert {"roc_auc_refit", "roc_auc_ensemble", "threshold", "sensitivity_refit",
                "specificity_refit", "sensitivity_ensemble", "specificity_ensemble"} <= set(row)
    assert set(nested["per_fold_summary"]["roc_auc_difference"]) >= {"mean", "low", "high"}
    assert nested["same_data_threshold"]["threshold"] == pytest.approx(meta["threshold"])
    per_image = pd.read_csv(result.model_dir / "reports" / "nested_predictions.csv")
    assert sorted(per_image["file"]) == sorted(table["file"])
    # the refit column is the ordinary cross-validation's fold model, not a new one
    merged = per_image.merge(table, on="file")
    np.testing.assert_allclose(merged["probability_refit"], merged["probability"])
    np.testing.assert_allclose(merged["probability_ensemble"],
                               merged[["probability_inner0", "probability_inner1"]].mean(axis=1))
    assert metrics["nested"]["file"] == "reports/nested.json"


def test_a_given_threshold_is_kept_fixed(kaggle, tmp_path, capsys):
    import argparse

    from ai.cli.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--data", str(kaggle), "--out", str(tmp_path / "m"),
                              "--recipe", "tiny", "--max-items", "12", "--size", "32",
                              "--threshold", "0.37", "--device", "cpu",
                              "--cache-dir", str(tmp_path / "cache"), "--workers", "1"])
    assert args.func(args) == 0
    meta = load_artifact(tmp_path / "m", device="cpu").meta
    assert meta["threshold"] == 0.37
    assert meta["training"]["config"]["threshold_rule"] == "fixed"
    assert meta["metrics"]["threshold_choice"]["rule"] == "fixed"
    assert "decision threshold: 0.3700 (fixed" in capsys.readouterr().out
