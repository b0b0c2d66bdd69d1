"""The pneumothorax region as a DICOM Segmentation: the object and its reader (`sop`), the
segment's description (`content`) and its codes (`codes`)."""
