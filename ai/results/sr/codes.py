"""Coded concepts used in the finding SR, each checked against pydicom's DICOM code
dictionary (pydicom.sr.codedict, generated from PS3.16) or named with its source.

Keeping them in one place lets the builder and the reader agree on exactly one code per
meaning, and lets tests compare against the same constants.
"""

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Finding type of the measurement group, and the concept of the qualitative evaluation.
PNEUMOTHORAX: Code = codes.SCT.Pneumothorax  # SCT 36118008

# CID 241 "Present-Absent Only". PS3.16 uses SCT 272519000 for Absent (the older
# SCT 2667000 "Absent" is not in the current context group).
PRESENT: Code = codes.SCT.Present  # SCT 52101004
ABSENT: Code = codes.SCT.Absent  # SCT 272519000

# The classifier's output for the pneumothorax class, a number in [0, 1].
PROBABILITY: Code = codes.DCM.Probability  # DCM 122157
UNITLESS: Code = codes.UCUM.NoUnits  # UCUM "1"

# TID 1500 "Procedure reported": SNOMED CT 399208008 "Plain chest X-ray" (procedure); no
# chest radiography code exists in CID 100, which is extensible.
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")

# TID 1002 observer type for the node itself.
DEVICE_OBSERVER: Code = codes.DCM.Device  # DCM 121007

# TID 4019 Algorithm Identification: the family of the algorithm (CID 7162).
ALGORITHM_FAMILY: Code = codes.DCM.AlgorithmFamily  # DCM 111000
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence  # DCM 123110

# TID 1410 rows: the outline of a region on the source image, and (an extension item of the
# group) the segment of the DICOM Segmentation that holds the same region as a mask.
REFERENCED_SEGMENT: Code = codes.DCM.ReferencedSegment  # DCM 121191
