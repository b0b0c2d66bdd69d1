"""Shared fixtures: the SIIM data, config files, and real `pneumonode serve` processes.

`node_factory` starts nodes (each on its own free loopback port and temporary storage
folder) and stops them with SIGTERM at teardown, checking that they exit cleanly.
`siim_node` is one node for the whole session that already holds all 200 SIIM images,
sent with `storescu -xy` over one association, for the query tests to share.

Tiers: a test that starts processes (a node, storescp, Orthanc, a training run, the CLI)
is marked `slow`, so `pytest -m "not slow"` runs the in-process tests alone in a minute
or two; plain `pytest` runs everything.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import require_siim, siim_files

from node.testing.config_files import write_config
from node.testing.index import count_instances
from node.testing.node_process import NodeProcess, start_node, storescu

SIIM_COUNT = 200

StartNode = Callable[..., NodeProcess]

# Fixtures that start a `pneumonode serve`, a dcmtk or Orthanc server, or a training run,
# here or in a test module: a test using one (directly or through another fixture) is slow.
PROCESS_FIXTURES = frozenset(
    {
        "node_factory",
        "node",
        "siim_node",
        "bad_node",  # test_bad_input
        "synthetic_node",  # test_find_scp
        "large_node",  # test_find_scp
        "limited_node",  # test_find_stream
        "open_node",  # test_find_stream
        "shared_node",  # test_store
        "analysed_node",  # test_retrieve_viewers
        "setup",  # test_get_scp, test_move_scp: a node holding the retrieve archive
        "trained",  # test_ai_train: a training run
    }
)
# Modules whose tests start such processes (or the CLI) in their own bodies, with no
# fixture to say so; where the others use a fixture above, the module is listed too.
PROCESS_MODULES = frozenset(
    {
        "test_ai_train.py",  # training runs and the CLI
        "test_e2e_orthanc.py",
        "test_hostile.py",
        "test_import.py",
        "test_move_scp.py",
        "test_sample_data.py",  # the CLI
        "test_scale_out.py",
        "test_serve_processes.py",
        "test_tls.py",
        "test_viewer_ohif.py",  # Orthanc and a headless Chromium
    }
)
# Single tests of otherwise in-process modules that start processes or train a model.
PROCESS_TESTS = frozenset(
    {
        "test_ai_cv.py::test_a_given_threshold_is_kept_fixed",
        "test_ai_cv.py::test_kaggle_layout_cross_validates_with_the_tiny_mask_recipe",
        "test_ai_cv.py::test_kaggle_layout_is_read_and_cached_in_parallel",
        "test_ai_cv.py::test_lr_find_sets_the_rate_and_init_weights_reach_the_fit",
        "test_ai_cv.py::test_the_model_carries_the_cv_chosen_threshold_and_nested_cv_reports",
        "test_config.py::test_an_earlier_release_config_starts_the_node",
        "test_config.py::test_serve_refuses_a_bad_config_before_starting",
        "test_demo_model.py::test_the_model_reproduces_its_recorded_predictions",
        "test_dependencies.py::test_serve_refuses_to_start_on_another_pynetdicom",
        "test_guarded_transport.py::test_woken_requestor_gets_every_response_from_a_fast_peer",
        "test_results_reuse.py::test_a_pool_still_starting_does_not_hold_up_the_worker_stopping",
        "test_results_reuse.py::test_result_processes_store_results_and_give_back_the_job_of_one_that_died",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that starts processes (see PROCESS_FIXTURES and the lists)."""
    for item in items:
        module = item.path.name
        test = f"{module}::{item.originalname}" if isinstance(item, pytest.Function) else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & PROCESS_FIXTURES or module in PROCESS_MODULES or test in PROCESS_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def siim_path() -> Path:
    """Folder holding train/ (the 200 SIIM DICOM files) and labels.csv; its users skip,
    with the reason, where there is none."""
    return require_siim()


@pytest.fixture(scope="session")
def siim_dicom_files(siim_path: Path) -> list[Path]:
    files = siim_files()
    assert len(files) == SIIM_COUNT
    return files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic untrained model artifact, so analysis runs without training."""
    from ai.train.tiny_artifact import build_tiny_artifact

    return build_tiny_artifact(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a config.toml from the shipped defaults with {section: {key: value}} overrides."""

    def make(overrides: dict[str, Any] | None = None, name: str = "config.toml") -> Path:
        return write_config(tmp_path / name, overrides)

    return make


def _stop_all(nodes: list[NodeProcess]) -> None:
    failures = []
    for node in nodes:
        if node.stopped:
            continue
        code = node.stop(signal.SIGTERM)
        if code != 0:
            failures.append(f"port {node.port} exited {code}:\n{node.log_text()[-3000:]}")
    assert not failures, "node did not stop cleanly on SIGTERM: " + "\n".join(failures)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[StartNode]:
    """start(overrides=None, name="node", preexec_fn=None) -> a running NodeProcess."""
    started: list[NodeProcess] = []

    def start(
        overrides: dict[str, Any] | None = None,
        name: str = "node",
        preexec_fn: Callable[[], None] | None = None,
    ) -> NodeProcess:
        node = start_node(tmp_path / name, overrides, preexec_fn=preexec_fn)
        started.append(node)
        return node

    yield start
    _stop_all(started)


@pytest.fixture
def node(node_factory: StartNode) -> NodeProcess:
    """A node with the default configuration (analysis off) on a free port."""
    return node_factory()


@pytest.fixture(scope="session")
def siim_node(tmp_path_factory: pytest.TempPathFactory, siim_path: Path) -> Iterator[NodeProcess]:
    """A node holding all 200 SIIM images, for read-only tests (C-FIND) to share."""
    node = start_node(tmp_path_factory.mktemp("siim_node"))
    try:
        result = storescu(node, [siim_path / "train"])
        assert result.returncode == 0, result.stderr
        assert count_instances(node.db_url) == SIIM_COUNT
        yield node
    finally:
        _stop_all([node])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL test server (PNEUMONODE_TEST_POSTGRES_URL),
    dropped afterwards; the test is skipped without that server."""
    server_url = os.environ.get("PNEUMONODE_TEST_POSTGRES_URL", "")
    if not server_url:
        pytest.skip("PNEUMONODE_TEST_POSTGRES_URL not set")
    name = f"pneumonode_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
