"""How every pneumonode process logs, and what its logs may say: one line per event, UIDs
but never patient data. Each process (the CLI, a serve process, an analysis worker, a
result process) calls `configure_logging` once at start; nothing else sets up logging.

pydicom warns about invalid values by quoting them (a malformed birth date, a name that
does not decode), and logs them again on its own logger: both are silenced in every
pneumonode process, since the node logs its own line for each refusal. pynetdicom logs a
traceback when a sender breaks an association (an over-long UID in a request, a cut PDU):
the traceback is dropped and the message kept, so a hostile sender costs one line; and
where a process runs an AE, `quiet_pynetdicom` keeps its handlers from logging each
message's identifiers.

Every record is one line: values from the network or from files (UIDs, AE titles, error
comments, names) may hold a newline followed by text shaped like a record, and are logged
by pynetdicom, pydicom and the node alike. `OneLineFormatter` escapes the control
characters of each formatted message (a newline shows as `\\n`), whoever logged it. A
traceback is the node's own text and keeps its lines, but each one is indented, so
that no line of it (an exception message may quote a value too) can pass for a record.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

_PYDICOM_MODULES = r"pydicom(\..*)?$"
# pynetdicom's lines that the node logs better itself: a C-STORE sub-operation of a C-MOVE
# or C-GET that failed is one line of node.dicom.retrieve, naming the instance and why.
_REDUNDANT = frozenset(
    {
        "Received an invalid DIMSE message",
        "C-STORE sub-operation failed.",
        "'Dataset' object has no attribute 'Status'",
        "The association with a peer SCP must be established before sending a C-STORE request",
    }
)


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTINUATION = "    | "


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def one_line(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n`, `\\x1b`)."""
    return _CONTROL.sub(_escape, text)


class OneLineFormatter(logging.Formatter):
    """A record's message on one line; its traceback, if any, indented below it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        if not rest:
            return first
        return "\n".join([first, *(_CONTINUATION + one_line(line) for line in rest)])


def configure_logging(level: str, process_tag: str = "") -> None:
    """Log lines to stderr; `process_tag` names one of several serve processes."""
    tag = f" [{process_tag}]" if process_tag else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter or logging.Formatter()
        if not isinstance(formatter, OneLineFormatter):
            handler.setFormatter(OneLineFormatter(formatter._fmt, formatter.datefmt))
    # highdicom logs each module it copies at INFO and names patients in its warnings:
    # the node logs one line per result itself, with UIDs only.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.captureWarnings(False)
    warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent")
    keep_phi_out_of_logs()


def quiet_pynetdicom() -> None:
    """pynetdicom's own handlers log every message, identifiers included (patient names):
    the node logs its own summary lines instead, which also saves time per instance."""
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _OneLinePerPynetdicomError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        if record.getMessage() in _REDUNDANT:
            return False
        record.exc_info = None
        record.exc_text = None
        return True


def keep_phi_out_of_logs() -> None:
    """Install the policy on the root logger's handlers (after logging is configured)."""
    import pydicom.config  # it sets its logger's level when first imported

    warnings.filterwarnings("ignore", module=_PYDICOM_MODULES)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    # Those warnings are all that pydicom's checks of the values it reads can produce
    # (they raise only in RAISE mode), and they go nowhere: the checks are not run. They
    # cost about a tenth of the CPU of parsing each received header.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # pynetdicom's own copy of each invalid value; the DIMSE layer logs the same text.
    logging.getLogger("pynetdicom.utils").setLevel(logging.CRITICAL)
    # Its transport layer logs a traceback for every connection a sender breaks off; the
    # guarded transport (node.dicom.guarded_transport) logs one line for those.
    logging.getLogger("pynetdicom.dul").setLevel(logging.CRITICAL)
    one_line = _OneLinePerPynetdicomError()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OneLinePerPynetdicomError) for f in handler.filters):
            handler.addFilter(one_line)
