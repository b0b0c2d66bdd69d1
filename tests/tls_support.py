"""A throw-away PKI for the TLS tests: a CA, and certificates it signs for the node and
for its callers, made with the openssl command line (SAN localhost and 127.0.0.1)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EXTENSIONS = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"


@dataclass(frozen=True)
class Party:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    node: Party
    client: Party
    stranger: Party  # signed by another CA


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path]) -> Party:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    extensions = folder / "extensions.cnf"
    extensions.write_text(_EXTENSIONS, encoding="ascii")
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(extensions),
        cwd=folder,
    )
    return Party(cert, key)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    other_ca = _ca(folder, "other-ca")
    return Pki(
        ca=ca[0],
        node=_signed(folder, "localhost", ca),
        client=_signed(folder, "client", ca),
        stranger=_signed(folder, "stranger", other_ca),
    )
