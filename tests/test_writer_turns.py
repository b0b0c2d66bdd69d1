"""The archive's writers of one SQLite index take turns on an flock across processes
(storage.database.WriterTurns); other databases need no turn."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from storage.database import WRITER_TURNS_SUFFIX, WriterTurns


def _lock_is_free(fd: int) -> str:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "taken"
    return "free"


def _try_turn_elsewhere(path: str, answers: multiprocessing.Queue) -> None:
    """In another process: whether the writers' lock is free right now."""
    fd = os.open(path, os.O_RDWR)
    try:
        answers.put(_lock_is_free(fd))
    finally:
        os.close(fd)


def _own_turn_in_child(turns: WriterTurns, answers: multiprocessing.Queue) -> None:
    """In a forked child: the turn object inherited from the parent opens its own file,
    so it does not share the parent's lock."""
    answers.put(_lock_is_free(turns._own_fd()))


def _ask(target, *args) -> str:
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    process = context.Process(target=target, args=(*args, answers))
    process.start()
    answer = answers.get(timeout=30)
    process.join(timeout=30)
    return answer


def test_a_turn_excludes_writers_of_other_processes(tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite"
    turns = WriterTurns(create_engine(f"sqlite:///{index}"))
    assert turns.path == Path(str(index) + WRITER_TURNS_SUFFIX)
    with turns.turn():
        assert _ask(_try_turn_elsewhere, str(turns.path)) == "taken"
    assert _ask(_try_turn_elsewhere, str(turns.path)) == "free"
    turns.close()


def test_a_forked_child_takes_its_own_turn(tmp_path: Path) -> None:
    turns = WriterTurns(create_engine(f"sqlite:///{tmp_path / 'index.sqlite'}"))
    with turns.turn():  # the parent's lock file is open and held
        assert _ask(_own_turn_in_child, turns) == "taken"
    turns.close()


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///:memory:", "postgresql+psycopg://user:pw@127.0.0.1/index"],
)
def test_other_databases_take_no_turn(url: str) -> None:
    turns = WriterTurns(create_engine(url))
    assert turns.path is None
    with turns.turn():
        pass
