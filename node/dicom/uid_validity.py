"""UID checks answered once per UID: pydicom's `UID.is_valid` and pynetdicom's validator.

pydicom answers `UID.is_valid` with `re.match(RE_VALID_UID, uid)` on every call, the
pattern looked up in `re`'s cache each time. pynetdicom asks it several times for every
UID of an association request (abstract syntax, each transfer syntax, again while
negotiating and answering): about 840 checks per association of storescu's 128
presentation contexts, for the same few hundred UIDs every time. With both changes below,
the node's CPU for such an association (one image stored) went from 12.4 to 7.8 ms
(in-process GuardedServer, 4 x 30 associations alternating with and without).

`install` puts the same check, with the pattern compiled once and the answers of the last
8,192 distinct UIDs remembered, in its place; it leaves pydicom's own in place
when pydicom's check is not the one this was written for (tests/test_uid_validity.py
compares the two).

pynetdicom's own check of a UID (`_config.VALIDATORS["UI"]`, its documented hook for
replacing validation) runs `from pynetdicom import _config` on every call, which costs
Python's import machinery more than the check. `validate_ui` is the same check with
`_config` imported once.
"""

from __future__ import annotations

import functools
import inspect
import re

from pydicom import uid as pydicom_uid
from pydicom.uid import UID
from pynetdicom import _config, _validators

# What pydicom's own UID.is_valid does; install() checks that it still does just that.
PYDICOM_CHECK = "if len(self) <= 64 and re.match(RE_VALID_UID, self):"
REMEMBERED_UIDS = 8192

_PATTERN = re.compile(pydicom_uid.RE_VALID_UID)
_pydicom_is_valid = pydicom_uid.UID.is_valid
_pynetdicom_validate_ui = _validators.validate_ui


@functools.lru_cache(maxsize=REMEMBERED_UIDS)
def is_valid_uid(value: str) -> bool:
    """pydicom's answer for `value`: at most 64 characters, matching RE_VALID_UID."""
    return len(value) <= 64 and _PATTERN.match(value) is not None


def _remembered(self: pydicom_uid.UID) -> bool:
    return is_valid_uid(self)


def validate_ui(value: object) -> tuple[bool, str]:
    """pynetdicom's UI validator (`pynetdicom._validators.validate_ui`): (conformant, why
    not), the same answers for the same values and settings."""
    if not isinstance(value, str):
        return False, "must be pydicom.uid.UID"
    if not isinstance(value, UID):
        value = UID(value)
    if _config.ENFORCE_UID_CONFORMANCE:
        return (True, "") if value.is_valid else (False, "UID is non-conformant")
    if not value:
        return False, "must not be an empty str"
    if len(value) >= 65:
        return False, "must not exceed 64 characters"
    return True, ""


def install() -> bool:
    """Have UID.is_valid remember its answers and pynetdicom check UIDs with
    `validate_ui`; False where pydicom's own check is not the regular expression this
    reproduces (then UID.is_valid is left as it is)."""
    if _config.VALIDATORS.get("UI") is _pynetdicom_validate_ui:
        _config.VALIDATORS["UI"] = validate_ui
    current = pydicom_uid.UID.__dict__.get("is_valid")
    if isinstance(current, property) and current.fget is _remembered:
        return True
    try:
        source = inspect.getsource(_pydicom_is_valid.fget)
    except (OSError, TypeError, AttributeError):
        return False
    if PYDICOM_CHECK not in source:
        return False
    pydicom_uid.UID.is_valid = property(_remembered, doc=_pydicom_is_valid.__doc__)
    return True
