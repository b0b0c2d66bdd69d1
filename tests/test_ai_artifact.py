"""The model artifact: deterministic tiny build, round trip, and refusal of bad files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support import PROBABILITY_TOLERANCE

from ai.analysis.infer import Analyzer
from ai.model.artifact import META_FILE, WEIGHTS_FILE, ArtifactError, load_artifact, read_meta
from ai.train.tiny_artifact import build_tiny_artifact


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_artifact(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (80, 70), dtype=np.uint8) for _ in range(4)]


def test_loaded_model_describes_itself(tiny):
    loaded = load_artifact(tiny, device="cpu")
    assert not loaded.model.training
    assert loaded.classes == ["No Pneumothorax", "Pneumothorax"]
    assert loaded.positive_class == "Pneumothorax" and loaded.positive_index == 1
    assert loaded.threshold == 0.5 and loaded.input_size == 64
    assert loaded.device.type == "cpu"
    assert loaded.name and len(loaded.name) <= 64
    assert loaded.version and len(loaded.version) <= 64
    assert loaded.meta["weights"]["sha256"][:12] in loaded.version
    for key in ("architecture", "input", "versions", "created", "training", "metrics"):
        assert key in loaded.meta


def test_same_seed_same_model(tiny, tmp_path, images):
    again = build_tiny_artifact(tmp_path / "again", seed=0)
    other = build_tiny_artifact(tmp_path / "other", seed=1)
    assert (again / WEIGHTS_FILE).read_bytes() == (tiny / WEIGHTS_FILE).read_bytes()
    assert (other / WEIGHTS_FILE).read_bytes() != (tiny / WEIGHTS_FILE).read_bytes()
    first = Analyzer(tiny, device="cpu").predict(images)
    second = Analyzer(again, device="cpu").predict(images)
    assert first == second
    assert all(0.0 <= p <= 1.0 for p in first)


def test_batch_size_does_not_change_results(tiny, images):
    one = Analyzer(tiny, device="cpu", batch_size=1).predict(images)
    all_at_once = Analyzer(tiny, device="cpu", batch_size=8).predict(images)
    # Equal to float32 precision, not to the bit: a convolution's last bits may depend on
    # the batch it runs in.
    np.testing.assert_allclose(one, all_at_once, atol=PROBABILITY_TOLERANCE, rtol=0)


def test_corrupt_weights_are_refused(tiny, tmp_path):
    broken = shutil.copytree(tiny, tmp_path / "broken")
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(broken, device="cpu")


def test_truncated_weights_with_matching_checksum_are_refused(tiny, tmp_path):
    broken = shutil.copytree(tiny, tmp_path / "truncated")
    (broken / WEIGHTS_FILE).write_bytes((broken / WEIGHTS_FILE).read_bytes()[:100])
    meta = json.loads((broken / META_FILE).read_text())
    import hashlib

    meta["weights"]["sha256"] = hashlib.sha256((broken / WEIGHTS_FILE).read_bytes()).hexdigest()
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        load_artifact(broken, device="cpu")


def test_corrupt_json_is_refused(tiny, tmp_path):
    broken = shutil.copytree(tiny, tmp_path / "badjson")
    (broken / META_FILE).write_text("{ not json")
    with pytest.raises(ArtifactError, match="corrupt JSON"):
        load_artifact(broken, device="cpu")


def test_mismatched_architecture_is_refused(tiny, tmp_path):
    broken = shutil.copytree(tiny, tmp_path / "mismatch")
    meta = json.loads((broken / META_FILE).read_text())
    meta["architecture"]["widen"] = 0.5
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="do not match the architecture"):
        load_artifact(broken, device="cpu")


def test_unknown_architecture_and_missing_files_are_refused(tiny, tmp_path):
    broken = shutil.copytree(tiny, tmp_path / "unknown")
    meta = json.loads((broken / META_FILE).read_text())
    meta["architecture"]["name"] = "vgg_from_the_future"
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="cannot build architecture"):
        load_artifact(broken, device="cpu")
    with pytest.raises(ArtifactError, match="no model.json"):
        load_artifact(tmp_path / "nowhere", device="cpu")
    (broken / WEIGHTS_FILE).unlink()
    meta["architecture"]["name"] = "xresnet18"
    (broken / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(broken, device="cpu")


def test_read_meta_checks_format(tiny, tmp_path):
    assert read_meta(tiny)["format"] == "pneumonode-classifier"
    other = tmp_path / "other"
    other.mkdir()
    (other / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a pneumonode-classifier"):
        read_meta(other)
