"""Cohort overview: the source's `DataFrame.from_dicoms(..., px_summ=True)` and its plots.

Writes one row per file (every top-level tag plus img_min, img_max, img_mean, img_std,
img_pct_window) as CSV (and Parquet when pyarrow is installed; otherwise it says so), and
PNGs: age histogram, sex counts, view position counts, and the label balance when labels
are known.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ai.cli.console import progress  # noqa: E402

log = logging.getLogger(__name__)

PARQUET_MISSING = (
    "cohort.parquet not written: Parquet needs pyarrow, which is not installed "
    "(install the node's parquet extra: pip install -e '.[parquet]' in its folder); "
    "cohort.csv holds the same table"
)


@dataclass
class CohortReport:
    tables: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not written, and why


def dicom_files(sources: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, *.dcm) and keep files as given, sorted and unique."""
    files: set[Path] = set()
    for source in map(Path, sources):
        if source.is_dir():
            files.update(source.rglob("*.dcm"))
        elif source.is_file():
            files.add(source)
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
    return sorted(files)


def _from_dicoms(files: list[Path], n_workers: int) -> pd.DataFrame:
    """fastai's `from_dicoms` on some files. fastai prints a file's whole header (patient
    name included) when its pixels fail; that goes to the log as the file's name instead."""
    import fastai.medical.imaging  # noqa: F401  (adds DataFrame.from_dicoms)

    with contextlib.redirect_stdout(io.StringIO()):
        table = pd.DataFrame.from_dicoms(files, px_summ=True, n_workers=n_workers)
    if "img_pct_window" in table:
        for name in table.loc[table["img_pct_window"].isna(), "fname"]:
            log.warning("%s: pixel statistics failed (set to 0)", name)
    return table


def cohort_table(files: list[Path], n_workers: int = 0) -> pd.DataFrame:
    """fastai's `DataFrame.from_dicoms` with pixel statistics, with progress shown: one file
    at a time, or `4 * n_workers` at a time with that many worker processes."""
    size = max(1, 4 * n_workers)
    chunks = [files[start : start + size] for start in range(0, len(files), size)]
    unit = "file" if size == 1 else f"batch of {size} file"
    frames = [_from_dicoms(chunk, n_workers) for chunk in progress(chunks, desc="stats", unit=unit)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def attach_labels(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Add a `label` column from `labels.csv` / train-rle.csv under `root`, when present."""
    from ai.data.labelled import load_items

    try:
        items = load_items(root)
    except FileNotFoundError:
        return table
    by_path = dict(
        zip((str(Path(p).resolve()) for p in items["path"]), items["label"], strict=True)
    )
    labelled = table.copy()
    labelled["label"] = [by_path.get(str(Path(name).resolve())) for name in table["fname"]]
    return labelled


def age_years(values: pd.Series) -> pd.Series:
    """DICOM AS ('062Y', '62', '006M') to years as floats; unparseable -> NaN."""
    text = values.astype(str).str.strip().str.upper()
    number = pd.to_numeric(text.str.extract(r"^(\d+)")[0], errors="coerce")
    unit = text.str.extract(r"([DWMY])$")[0].fillna("Y")
    divisor = unit.map({"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0})
    return number / divisor


def _bar(series: pd.Series, title: str, path: Path) -> None:
    counts = series.fillna("(missing)").astype(str).value_counts().sort_index()
    figure, axis = plt.subplots(figsize=(5, 4))
    counts.plot.bar(ax=axis, color="steelblue")
    axis.set_title(title)
    axis.set_ylabel("images")
    for index, value in enumerate(counts):
        axis.text(index, value, str(value), ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def cohort_plots(table: pd.DataFrame, out: Path) -> list[Path]:
    written = []
    if "PatientAge" in table:
        ages = age_years(table["PatientAge"]).dropna()
        if len(ages):
            figure, axis = plt.subplots(figsize=(5, 4))
            axis.hist(ages, bins=20, color="steelblue")
            axis.set_title("Patient age")
            axis.set_xlabel("years")
            axis.set_ylabel("images")
            figure.tight_layout()
            figure.savefig(out / "age_histogram.png", dpi=100)
            plt.close(figure)
            written.append(out / "age_histogram.png")
    for column, name, title in (
        ("PatientSex", "sex_counts.png", "Patient sex"),
        ("ViewPosition", "view_position_counts.png", "View position"),
        ("label", "label_balance.png", "Label"),
    ):
        if column in table and table[column].notna().any():
            _bar(table[column], title, out / name)
            written.append(out / name)
    return written


def write_cohort_report(
    sources: list[str | Path], out: str | Path, n_workers: int = 0
) -> CohortReport:
    """Build the table for all DICOMs in `sources`, write CSV/Parquet and the plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = dicom_files(sources)
    if not files:
        raise FileNotFoundError("no DICOM files found")
    table = cohort_table(files, n_workers=n_workers)
    for source in map(Path, sources):
        if source.is_dir():
            table = attach_labels(table, source)
            break
    report = CohortReport(tables=[out / "cohort.csv"])
    table.to_csv(report.tables[0], index=False)
    if parquet_available():
        table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(
            out / "cohort.parquet", index=False
        )
        report.tables.append(out / "cohort.parquet")
    else:
        report.notes.append(PARQUET_MISSING)
    report.plots = cohort_plots(table, out)
    log.info("cohort report for %d files written to %s", len(files), out)
    return report
