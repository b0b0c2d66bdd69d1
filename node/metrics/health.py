"""What /health/ready checks: the index and the storage folder take writes, the DICOM
listener accepts, and the model is loaded (or analysis is off or runs elsewhere)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from sqlalchemy import Engine, text

from node.config import Config

# Takes SQLite's write lock (and PostgreSQL's write path) without changing a row.
_WRITE_PROBE = text("UPDATE analysis_job SET id = id WHERE 1 = 0")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Readiness:
    """Callable () -> the list of what is not ready (empty: ready)."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        listener: Callable[[], str | None],
        model_loaded: Callable[[], bool],
    ) -> None:
        self.config = config
        self.engine = engine
        self.listener = listener
        self.model_loaded = model_loaded

    def __call__(self) -> list[str]:
        problems = []
        try:
            with self.engine.begin() as conn:
                conn.execute(_WRITE_PROBE)
        except Exception as exc:
            problems.append(f"index not writable: {_first_line(exc)}")
        try:
            with tempfile.TemporaryFile(dir=self.config.storage.folder, prefix=".ready-"):
                pass
        except OSError as exc:
            problems.append(f"storage folder not writable: {_first_line(exc)}")
        listener = self.listener()
        if listener is not None:
            problems.append(listener)
        analysis = self.config.analysis
        if analysis.enabled and analysis.run_in_serve and not self.model_loaded():
            problems.append("analysis model not loaded")
        return problems
