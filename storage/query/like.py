"""DICOM wildcard matching (`*`, `?`) as a case-sensitive SQL LIKE on every backend."""

from __future__ import annotations

from sqlalchemy import Boolean, ColumnElement
from sqlalchemy.ext.compiler import compiles

LIKE_ESCAPE = "!"


class CaseSensitiveLike(ColumnElement[bool]):
    """`column LIKE pattern ESCAPE '!'`, case-sensitive on every backend.

    PostgreSQL's LIKE is case-sensitive already; SQLite's LIKE folds ASCII case, so there
    the same match is written as GLOB, which is case-sensitive and has no `%`/`_`.
    """

    type = Boolean()
    inherit_cache = False
    _is_implicitly_boolean = True  # a condition already: no "= 1" in OR (it hides the index)

    def __init__(self, column: ColumnElement, dicom_pattern: str) -> None:
        self.column = column
        self.dicom_pattern = dicom_pattern


@compiles(CaseSensitiveLike)
def _compile_like(element: CaseSensitiveLike, compiler, **kw) -> str:
    pattern = like_pattern(element.dicom_pattern)
    return compiler.process(element.column.like(pattern, escape=LIKE_ESCAPE), **kw)


@compiles(CaseSensitiveLike, "sqlite")
def _compile_glob(element: CaseSensitiveLike, compiler, **kw) -> str:
    pattern = glob_pattern(element.dicom_pattern)
    return compiler.process(element.column.op("GLOB")(pattern), **kw)


def like_pattern(dicom_pattern: str) -> str:
    """DICOM `*`/`?` as SQL LIKE `%`/`_`; literal `%`, `_` and `!` escaped with `!`."""
    out = []
    for char in dicom_pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def glob_pattern(dicom_pattern: str) -> str:
    """DICOM `*`/`?` kept as GLOB wildcards; a literal `[` becomes the class `[[]`."""
    return dicom_pattern.replace("[", "[[]")
