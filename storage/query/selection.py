"""The instances a retrieve selects (C-MOVE, C-GET; a WADO-RS study or series later):
what a find at the request's level matches, then every instance under each match."""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword
from sqlalchemy import Connection, select

from storage.models import Instance, Series, Study
from storage.query.errors import IdentifierMismatchError
from storage.query.matching import has_wildcard, is_universal
from storage.query.model import UNIQUE_KEYS, Level
from storage.query.request import FindRequest
from storage.query.sql import LEVEL_TABLE, from_clause, prepare


def retrieve_instances(conn: Connection, request: FindRequest) -> list:
    """The instances `request` selects, in study, series and instance order. Rows have
    sop_instance_uid, sop_class_uid, transfer_syntax_uid and file_path.

    The unique key of the level itself must hold a value or a list of UIDs (PS3.4
    C.4.2.2.1), so that a retrieve never means "everything": IdentifierMismatchError
    otherwise. A relational retrieve (PS3.4 C.4.2.2.1.2) is a request built as relational.
    """
    prepared = prepare(request)
    keyword = UNIQUE_KEYS[request.level]
    key = request.key(keyword)
    values = list(key.values) if key is not None else []
    if is_universal(values) or any(has_wildcard(value) for value in values):
        raise IdentifierMismatchError(
            f"a retrieve needs a {keyword} value", (tag_for_keyword(keyword),)
        )
    instance, series, study = Instance.__table__, Series.__table__, Study.__table__
    level_table = LEVEL_TABLE[request.level]
    matched = prepared.statement.with_only_columns(level_table.c.id).order_by(None)
    statement = (
        select(
            instance.c.sop_instance_uid,
            instance.c.sop_class_uid,
            instance.c.transfer_syntax_uid,
            instance.c.file_path,
        )
        .select_from(from_clause(Level.IMAGE))
        .where(level_table.c.id.in_(matched))
        .order_by(study.c.id, series.c.id, instance.c.instance_number, instance.c.id)
    )
    return list(conn.execute(statement).all())
