"""Queries over the index, whatever protocol asks them: one request, matched and turned
into SQL once, answered by one encoder per protocol.

The rooms, in the order a query passes through them (each imports only those above it):

    errors       QueryError and its two kinds (information model, unprocessable value)
    model        the Query/Retrieve information model: roots, levels, unique keys
    matching     PS3.4 C.2.2 matching rules on value strings (DA/TM/DT ranges, PN, wildcards)
    keys         a request's keys, the keys the index answers, their VRs
    request      FindRequest (transport-neutral) and the checks every constructor runs
    identifier   FindRequest from a DIMSE identifier + Q/R SOP class; the DIMSE statuses
    parameters   FindRequest from query parameters (QIDO-RS, a command line)
    like         DICOM wildcards as case-sensitive SQL LIKE/GLOB
    sql          PreparedFind: a request as one SQL statement
    encode_dimse response identifiers as pydicom Datasets or bytes (C-FIND)
    selection    the instances a retrieve selects (C-MOVE, C-GET)

Nothing here imports networking; the package imports nothing above storage/. Import
from the module that does the job: `from storage.query.sql import prepare`.
"""
