"""Text as the index compares it: person names folded for case-insensitive matching.

Unicode case folding after NFKC normalisation, so `müller^hans` finds `MÜLLER^HANS`,
`straße` finds `STRASSE`, and Greek or Cyrillic names match whatever their case. The
folded form is stored in its own indexed column: a prefix query then uses the index.
"""

from __future__ import annotations

import unicodedata


def fold_case(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()
