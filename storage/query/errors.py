"""The errors of a query the node will not process, whatever protocol carried it.

Two kinds, because a protocol answers them differently: a request that breaks the
information model (level, hierarchy) and a value the node cannot understand. The DIMSE
statuses they become are in storage.query.identifier; another protocol maps them itself
(QIDO-RS: 400 Bad Request for both).
"""

from __future__ import annotations


class QueryError(Exception):
    """A query the node will not process; `comment` fits a DIMSE ErrorComment (LO), the
    exception's own text is the whole message, `offending` the tags at fault."""

    def __init__(self, comment: str, offending: tuple[int, ...] = ()) -> None:
        super().__init__(comment)
        self.comment = comment[:64]
        self.offending = offending


class IdentifierMismatchError(QueryError):
    """The request breaks the information model (level, hierarchy): DIMSE status 0xA900."""


class UnprocessableQueryError(QueryError):
    """A value the node cannot understand or match (bad date, undecodable): 0xC000."""
