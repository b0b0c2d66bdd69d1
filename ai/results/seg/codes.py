"""Coded concepts of the pneumothorax segmentation, each checked against pydicom's DICOM code
dictionary (pydicom.sr.codedict, generated from PS3.16).

The segment's type is the same concept as the SR's finding, so a viewer can pair the SEG's
segment with the SR's measurement group by code as well as by tracking UID.
"""

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# CID 7150 "Segmentation Property Category": a pneumothorax is air where it does not belong,
# an abnormal structure rather than an anatomical one (the category DCMQI and highdicom's
# examples give lesions and other findings).
CATEGORY: Code = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003

# The segmented property type: the finding itself (in CID 6102/6105 chest findings; CID 7151
# is extensible).
PNEUMOTHORAX: Code = codes.SCT.Pneumothorax  # SCT 36118008

# CID 7162 "Surface Processing Algorithm Families" and the AIR profile: the algorithm family.
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence  # DCM 123110
