"""The finding as a TID 1500 Structured Report: the object (`sop`), the encoded report that
later sources of a kind reuse (`content`), and its coded concepts (`codes`)."""
