"""Prometheus metrics, health endpoints and `status --json`, against a real node.

The node runs two serve processes, its analysis worker and result processes (each counts in
prometheus_client's multi-process files); dcmtk's storescu sends, a dcmtk storescp receives
the results, `promtool check metrics` (Debian's prometheus) checks the output, and a real
Prometheus server on loopback scrapes the node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest
from analysis_support import analysed, analysing_and_delivering, delivered, wait_for
from dicom_data import chunked_sending, write_raw_file
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian
from support import siim_files

from node.config import parse_config
from node.metrics.http import READ_TIMEOUT_SECONDS, MetricsHttpServer
from node.testing.dcmtk import StoreSCP, echo
from node.testing.index import job_counts
from node.testing.node_process import node_command, node_env, storescu
from node.testing.ports import free_port

DESTINATION = "STORESCP"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "pneumonode.json"
UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a /metrics text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def send_unreadable(node, folder: Path) -> int:
    """One C-STORE whose dataset is cut inside an element: the node refuses it (0xC210)."""
    uid = "1.2.826.0.1.3680043.8.498.99"
    path = write_raw_file(
        folder / "unreadable.dcm",
        b"\x10\x00\x10\x00PN\x20\x00cut",  # PatientName says 32 bytes, 3 follow
        sop_class=DX,
        sop_instance=uid,
        transfer_syntax=ExplicitVRLittleEndian,
    )
    from dicom_data import association

    with chunked_sending(), association(
        node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])]
    ) as assoc:
        return int(assoc.send_c_store(path).Status)


def identifying_values(files: list[Path]) -> set[str]:
    values: set[str] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in (
            "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
            "PatientName", "AccessionNumber",
        ):
            text = str(ds.get(keyword, "") or "").strip()
            if text:
                values.add(text)
    return values


@pytest.mark.slow
def test_metrics_count_intake_analysis_and_delivery(
    tmp_path: Path, node_factory, tiny_model: Path
) -> None:
    scp = StoreSCP(tmp_path / "received")
    scp.start()
    try:
        overrides = analysing_and_delivering(tiny_model, DESTINATION, scp.port)
        overrides["node"] = {"processes": 2}
        node = node_factory(overrides)
        url = node.metrics_url()
        assert url.startswith("http://127.0.0.1:")

        assert not echo(node.host, node.port, "NOT-THIS-NODE")  # rejected: called AE title
        files = siim_files()[:4]
        assert storescu(node, files).returncode == 0
        assert send_unreadable(node, tmp_path) == 0xC210
        wait_for(analysed(node, 4), 180, "4 images analysed")
        wait_for(delivered(node, 8), 120, "8 results delivered")

        def settled() -> bool:
            text = get(f"{url}/metrics")[1]
            return value(text, "pneumonode_result_seconds_count") >= 4

        wait_for(settled, 30, "result_seconds to count 4 images")
        code, text = get(f"{url}/metrics")
        assert code == 200
        stores = "pneumonode_dimse_requests_total"
        assert value(text, stores, command="C-STORE", status="0x0000") == 4
        assert value(text, stores, command="C-STORE", status="0xC210") == 1
        assert value(text, stores, command="C-ECHO", status="0x0000") >= 1  # start-up's echo
        rejected = "pneumonode_associations_rejected_total"
        assert value(text, rejected, reason="called_ae_title") == 1
        assert value(text, "pneumonode_inference_seconds_count") == 4
        assert value(text, "pneumonode_probability_count") == 4
        predictions = [
            v for (name, _), v in samples(text).items() if name == "pneumonode_predictions_total"
        ]
        assert sum(predictions) == 4
        for state in ("queued", "claimed"):
            assert value(text, "pneumonode_jobs", state=state) == 0
        assert value(text, "pneumonode_jobs", state="done") == 4
        assert value(text, "pneumonode_deliveries_total", outcome="delivered") == 8
        stored = sum(
            v for (name, labels), v in samples(text).items()
            if name == "pneumonode_results_total" and ("outcome", "stored") in labels
        )
        assert stored == 8
        assert value(text, "pneumonode_received_bytes_total") > sum(
            p.stat().st_size for p in files
        ) * 0.9
        assert value(text, "pneumonode_store_seconds_count") == 5
        assert value(text, "pneumonode_model_loaded") == 1
        assert value(text, "pneumonode_associations_active") == 0
        build = [labels for (name, labels), _ in samples(text).items()
                 if name == "pneumonode_build_info"]
        assert len(build) == 1 and dict(build[0])["model"]

        # promtool accepts it (lint problems are printed and fail too).
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr

        # No identifier in any label.
        secret = identifying_values(files)
        for (_, labels), _ in samples(text).items():
            for _, label_value in labels:
                assert label_value not in secret
                assert not UID_LIKE.match(label_value), label_value

        assert get(f"{url}/health/live") == (200, '{"status": "live"}\n')
        code, body = get(f"{url}/health/ready")
        assert (code, json.loads(body)) == (200, {"status": "ready"})
        assert get(f"{url}/nothing")[0] == 404

        # The destination stops: the next result's delivery fails, and is counted.
        scp.stop()
        assert storescu(node, siim_files()[4:5]).returncode == 0

        def failed_delivery() -> bool:
            text = get(f"{url}/metrics")[1]
            return value(text, "pneumonode_deliveries_total", outcome="failed") >= 1

        wait_for(failed_delivery, 120, "a failed delivery to be counted")
        scrape_with_prometheus(tmp_path, url)
    finally:
        scp.stop()


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_dashboard_shows_every_metric() -> None:
    text = " ".join(dashboard_queries())
    for name in (
        "dimse_requests_total", "associations_active", "associations_rejected_total",
        "received_bytes_total", "store_seconds", "jobs", "inference_seconds", "result_seconds",
        "results_total", "deliveries_total", "predictions_total", "probability", "build_info",
    ):
        assert f"pneumonode_{name}" in text


def scrape_with_prometheus(tmp_path: Path, url: str) -> None:
    """A real Prometheus server scrapes the node; its HTTP API returns the node's counts."""
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed")
    target = urllib.parse.urlparse(url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: pneumonode\n"
        f"    static_configs:\n      - targets: ['{target}']\n",
        encoding="utf-8",
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    query = urllib.parse.quote('pneumonode_dimse_requests_total{command="C-STORE",status="0x0000"}')
    api = f"http://127.0.0.1:{port}/api/v1/query?query={query}"
    try:
        def scraped() -> bool:
            try:
                code, body = get(api, timeout=2)
            except OSError:
                return False
            result = json.loads(body).get("data", {}).get("result", []) if code == 200 else []
            return bool(result) and float(result[0]["value"][1]) == 5

        wait_for(scraped, 60, "Prometheus to scrape 5 stored images", step=0.5)
        query = urllib.parse.quote("pneumonode_inference_seconds_count")
        code, body = get(f"http://127.0.0.1:{port}/api/v1/query?query={query}")
        assert code == 200 and float(json.loads(body)["data"]["result"][0]["value"][1]) >= 4
        # Every query of the Grafana dashboard is one this Prometheus accepts.
        for expr in dashboard_queries():
            query = urllib.parse.quote(expr.replace("$job", ".*"))
            code, body = get(f"http://127.0.0.1:{port}/api/v1/query?query={query}")
            assert code == 200, f"{expr}: {body}"
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.mark.slow
def test_status_json(tmp_path: Path, node_factory) -> None:
    node = node_factory()
    assert storescu(node, siim_files()[:1]).returncode == 0
    result = subprocess.run(
        node_command(node.config_path, "status", "--json"),
        env=node_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["instances"] == 1
    assert data["jobs"] == job_counts(node)
    assert data["analysis_model"].startswith("analysis")
    assert {"deliveries", "result_objects", "job_errors", "delivery_errors"} <= set(data)


def test_metrics_section_is_checked() -> None:
    config = parse_config({"metrics": {"port": 0, "address": "::1"}}, Path("."), "test")
    assert (config.metrics.enabled, config.metrics.address, config.metrics.port) == (
        True, "::1", 0,
    )
    from node.config import ConfigError

    with pytest.raises(ConfigError, match="metrics.port"):
        parse_config({"metrics": {"port": 70000}}, Path("."), "test")
    with pytest.raises(ConfigError, match="metrics.colour"):
        parse_config({"metrics": {"colour": 1}}, Path("."), "test")


def test_a_silent_http_client_does_not_hold_up_the_next() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("pneumonode_test_things", "Things.", registry=registry).inc(3)
    server = MetricsHttpServer(("127.0.0.1", 0), lambda: registry, lambda: ["index not writable"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        silent = socket.create_connection(("127.0.0.1", port))  # sends nothing
        started = time.monotonic()
        code, text = get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert time.monotonic() - started < READ_TIMEOUT_SECONDS
        assert code == 200 and "pneumonode_test_things_total 3.0" in text
        code, body = get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
        assert (code, json.loads(body)) == (
            503, {"status": "not ready", "problems": ["index not writable"]}
        )
        silent.close()
    finally:
        server.shutdown()
        server.server_close()


def test_start_checks_name_the_metrics_keys(tmp_path: Path) -> None:
    from node.process.start_checks import StartError, check_metrics

    config = parse_config({"metrics": {"address": "192.0.2.1"}}, tmp_path, "test")
    with pytest.raises(StartError, match="metrics.address: 192.0.2.1 is not an address"):
        check_metrics(config)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = parse_config({"metrics": {"port": port}}, tmp_path, "test")
        warnings: list[str] = []
        check_metrics(config, warnings.append)
        assert warnings and f"metrics.port: port {port} on 127.0.0.1 is in use" in warnings[0]
        check_metrics(config)  # serve: no refusal, the listener logs it


@pytest.mark.slow
def test_a_metrics_port_in_use_leaves_dicom_serving(node_factory) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        node = node_factory({"metrics": {"port": port}})
        assert echo(node.host, node.port, node.ae_title)
        deadline = time.monotonic() + 10
        while "metrics: cannot listen" not in node.run_log():
            assert time.monotonic() < deadline, node.run_log()
            time.sleep(0.05)
        assert "metrics on http" not in node.run_log()


def test_the_metrics_folder_of_a_killed_node_goes_at_the_next_start(monkeypatch) -> None:
    from node.metrics import multiprocess

    monkeypatch.delenv(multiprocess.ENVIRONMENT, raising=False)
    child = subprocess.Popen(["true"])  # a pid that is gone
    child.wait()
    first = multiprocess.start_folder()
    stale = first.parent / f"serve-{child.pid}-x"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    multiprocess.remove_folder(first)
    second = multiprocess.start_folder()
    try:
        assert second.is_dir() and not stale.exists()
        assert os.environ[multiprocess.ENVIRONMENT] == str(second)
    finally:
        multiprocess.remove_folder(second)
    assert multiprocess.ENVIRONMENT not in os.environ and not second.exists()
    from prometheus_client import values

    assert values.ValueClass is values.MutexValue


@pytest.mark.slow
def test_ready_names_what_is_not_ready(tmp_path: Path, node_factory) -> None:
    node = node_factory(
        {"analysis": {"enabled": True, "model": str(tmp_path / "no-model"), "demo_model": False,
                      "device": "cpu"}}
    )
    url = node.metrics_url()
    code, body = get(f"{url}/health/ready")
    assert (code, json.loads(body)) == (
        503, {"status": "not ready", "problems": ["analysis model not loaded"]}
    )
    assert get(f"{url}/health/live")[0] == 200
