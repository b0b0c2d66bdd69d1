"""TLS contexts for DICOM TLS (PS3.15 annex B.1): the listener's and the sender's.

Both use the same certificate and key (the node is one party, whether it accepts or
calls) and the same CA bundle. TLS 1.2 at least, with the standard library's defaults
for ciphers; the listener asks for a client certificate only with `tls.verify_clients`.
"""

from __future__ import annotations

import ssl

from node.config import TlsSettings


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_bundle is not None:
        context.load_verify_locations(cafile=str(tls.ca_bundle))
    context.verify_mode = ssl.CERT_REQUIRED if tls.verify_clients else ssl.CERT_NONE
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_bundle))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context
