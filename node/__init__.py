"""The DICOM network side of pneumonode: the AE, its service handlers, the sender, the CLI."""
