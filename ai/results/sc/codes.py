"""Coded concepts used in the heatmap Secondary Capture, each checked against pydicom's DICOM
code dictionary (pydicom.sr.codedict, generated from PS3.16)."""

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Purpose of reference of the X-ray in the Secondary Capture's Source Image Sequence
# (CID 7202 "Source Image Purpose of Reference").
SOURCE_FOR_PROCESSING: Code = codes.DCM.SourceImageForImageProcessingOperation  # DCM 121322
