"""The DICOM services: one module per DIMSE service (C-STORE, C-FIND, C-MOVE, C-GET), the
one send path for retrieves and results, and the transport, admission and TLS they run on."""
