"""The same node on PostgreSQL: storing, C-FIND and the analysis queue give what SQLite gives.

Runs when PNEUMONODE_TEST_POSTGRES_URL names a PostgreSQL server and a role that may create
databases (`.ci/run` starts one on loopback); each test run gets its own database.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from analysis_support import analysed, analysing_alone, wait_for
from find_data import all_studies, synthetic_instances
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from support import siim_files

from ai.train.tiny_artifact import build_tiny_artifact
from node.testing.index import job_counts
from node.testing.node_process import NodeProcess, c_find, storescu
from storage.models import JobState

SERVER_URL = os.environ.get("PNEUMONODE_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.skipif(not SERVER_URL, reason="PNEUMONODE_TEST_POSTGRES_URL not set")

QUERIES = [
    (
        StudyRootQueryRetrieveInformationModelFind,
        {
            "QueryRetrieveLevel": "STUDY",
            "StudyInstanceUID": "",
            "PatientID": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedInstances": "",
        },
    ),
    (
        StudyRootQueryRetrieveInformationModelFind,
        {
            "QueryRetrieveLevel": "STUDY",
            "StudyInstanceUID": "",
            "PatientID": "1*",
            "StudyDate": "19000101-19020101",
        },
    ),
    (
        StudyRootQueryRetrieveInformationModelFind,
        {
            "QueryRetrieveLevel": "STUDY",
            "StudyInstanceUID": "",
            "PatientName": "*a?b*",
            "PatientSex": "F",
        },
    ),
    # Literal % and _ in the synthetic accession numbers must not act as SQL wildcards.
    (
        StudyRootQueryRetrieveInformationModelFind,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "AccessionNumber": "ACC%*"},
    ),
    (
        StudyRootQueryRetrieveInformationModelFind,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "AccessionNumber": "ACC_?"},
    ),
    (
        PatientRootQueryRetrieveInformationModelFind,
        {
            "QueryRetrieveLevel": "PATIENT",
            "PatientID": "",
            "NumberOfPatientRelatedStudies": "",
            "PatientSex": "M",
        },
    ),
]


def find(node: NodeProcess, model: str, keys: dict[str, str]) -> tuple[int, list[tuple]]:
    final, answers = c_find(node, model, keys, calling="PGTEST")
    matches = [tuple(str(answer.get(k, "")) for k in sorted(keys)) for answer in answers]
    return final, sorted(matches)


def test_postgres_index_answers_like_sqlite(
    tmp_path: Path, node_factory, postgres_url: str, siim_path: Path
) -> None:
    on_sqlite = node_factory(name="sqlite")
    on_postgres = node_factory({"storage": {"database_url": postgres_url}}, name="postgres")
    for node in (on_sqlite, on_postgres):
        assert storescu(node, [siim_path / "train"]).returncode == 0
        ae = AE(ae_title="PGSTORE")
        ae.requested_contexts = StoragePresentationContexts
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert all(assoc.send_c_store(ds).Status == 0 for ds in synthetic_instances())
        assoc.release()
    answers = []
    for model, keys in QUERIES:
        expected = find(on_sqlite, model, keys)
        assert expected[0] == 0x0000
        assert find(on_postgres, model, keys) == expected, keys
        answers.append(len(expected[1]))
    assert answers[0] == 200 + len(all_studies())
    assert all(answers), f"every query matches something: {answers}"
    assert answers[3:5] == [1, 1], "ACC%1 and ACC_2 only, wildcards escaped"


def test_postgres_analysis_queue(tmp_path: Path, node_factory, postgres_url: str) -> None:
    model = build_tiny_artifact(tmp_path / "model")
    node = node_factory({**analysing_alone(model), "storage": {"database_url": postgres_url}})
    files = siim_files()[:5]
    assert storescu(node, files).returncode == 0
    wait_for(analysed(node, len(files)), 180, "analysis on PostgreSQL")
    assert job_counts(node) == {JobState.DONE.value: len(files)}
