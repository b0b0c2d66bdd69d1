"""What `serve` needs from its host before it starts, checked by `config-check` and by
`serve` itself: each failure is one line naming the key and the cause.

A configuration file can be valid and still not start on this host: a certificate that is
not PEM, a port another program holds, an address that is not this machine's, a storage
folder that is a file, a database that does not answer. Checked here, in the supervisor,
such a start fails once with its reason instead of as a traceback in every serve process
that is restarted after it. The checks touch nothing they would have to undo: the port is
bound and closed at once, a missing storage folder is not created, a missing SQLite index
file is not created (its folder must be writable instead).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from node.config import Config
from node.dicom.tls import client_context, server_context

# How long the database check waits for a server that does not answer.
DATABASE_CONNECT_TIMEOUT_SECONDS = 5


class StartError(Exception):
    """A reason the node cannot start on this host; str() is the one line to print."""


class PortInUse(StartError):
    """A listener's port is taken: by another program, or by this node already running."""


def check_start(config: Config, *, busy_port: Callable[[str], None] | None = None) -> None:
    """Every check below, in the order a start would meet them; raises StartError.

    With `busy_port`, a port in use is handed to it instead of raised (`config-check` beside
    a running node, whose own listener holds the port, says so and goes on).
    """
    check_tls(config)
    try:
        check_listeners(config)
    except PortInUse as busy:
        if busy_port is None:
            raise
        busy_port(str(busy))
    check_metrics(config, busy_port)
    check_storage_folder(config.storage.folder)
    check_database(config.storage.database_url, config.storage.folder)


def check_metrics(config: Config, busy_port: Callable[[str], None] | None = None) -> None:
    """The metrics address is this host's; its port in use is only a warning: the node
    serves DICOM without /metrics then (node.metrics.service logs it)."""
    metrics = config.metrics
    if not metrics.enabled:
        return
    try:
        check_bind(metrics.address, metrics.port, "metrics.port", address_key="metrics.address")
    except PortInUse as busy:
        if busy_port is not None:  # serve itself logs it when the listener cannot bind
            busy_port(f"{busy} (the node would serve without /metrics)")


def check_tls(config: Config) -> None:
    """The certificate and key load and belong together; the CA bundle loads."""
    tls = config.tls
    if tls.certificate is not None and tls.private_key is not None:
        try:  # the pair alone first, so that a bad CA bundle is named as such
            server_context(dataclasses.replace(tls, ca_bundle=None))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise StartError(
                f"tls.certificate/tls.private_key: {tls.certificate} and {tls.private_key} "
                f"do not load as a PEM certificate and its key ({_ssl_reason(exc)})"
            ) from exc
    if tls.ca_bundle is not None:
        try:
            server_context(tls) if tls.enabled else client_context(tls)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise StartError(
                f"tls.ca_bundle: {tls.ca_bundle} does not load as PEM CA certificates "
                f"({_ssl_reason(exc)})"
            ) from exc


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or str(exc)
    return str(exc)


def listener_ports(config: Config) -> list[tuple[str, int]]:
    """(key, port) of each listener the configuration asks for (as node.process.server)."""
    tls = config.tls
    ports: list[tuple[str, int]] = []
    if not tls.enabled or tls.plain_listener:
        ports.append(("node.port", config.node.port))
    if tls.enabled:
        ports.append(("tls.port", tls.port))
    return ports


def check_listeners(config: Config) -> None:
    """The bind address is this host's, and every listener's port can be bound now."""
    host = config.node.bind_address
    for key, port in listener_ports(config):
        check_bind(host, port, key)


def check_bind(
    host: str, port: int, key: str = "node.port", address_key: str = "node.bind_address"
) -> None:
    """Bind `host`:`port` as the listener would (SO_REUSEADDR) and close it at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise StartError(f"{address_key}: {host!r} does not resolve ({exc})") from exc
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StartError(f"{address_key}: {host} is not an address of this host") from exc
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{key}: port {port} on {host} is in use") from exc
            if exc.errno == errno.EACCES:
                raise StartError(
                    f"{key}: port {port} on {host} needs privileges this process lacks"
                ) from exc
            raise StartError(f"{key}: cannot bind {host}:{port} ({exc.strerror})") from exc


def check_storage_folder(folder: Path) -> None:
    """`folder` is a writable folder, or the nearest existing folder above it is (so that
    `serve` can make it)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise StartError(f"storage.folder: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise StartError(f"storage.folder: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StartError(f"storage.folder: {existing} is not writable by this user")
    if existing == folder:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise StartError(f"storage.folder: cannot write in {folder} ({exc.strerror})") from exc


def check_database(url: str, storage_folder: Path) -> None:
    """The URL parses, its driver is installed, and the database answers a query.

    A SQLite file that does not exist yet is not created here: its folder is checked
    instead (the folder the node will create, when it is below the storage folder)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StartError(f"storage.database_url: {url!r} is not a database URL") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return
        path = Path(database)
        if not path.exists():
            if path.parent.resolve().is_relative_to(storage_folder):
                return  # made with the storage folder, checked above
            check_sqlite_folder(path.parent)
            return
        if not path.is_file():
            raise StartError(f"storage.database_url: {path} is not a file")
    try:
        engine = create_engine(parsed, poolclass=NullPool, **_connect_args(parsed))
    except (NoSuchModuleError, ImportError) as exc:
        raise StartError(
            f"storage.database_url: no driver for {parsed.drivername!r} is installed"
        ) from exc
    except (ArgumentError, TypeError, ValueError) as exc:
        raise StartError(f"storage.database_url: {exc}") from exc
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StartError(
            f"storage.database_url: cannot connect to {parsed.render_as_string()} ({reason})"
        ) from exc
    finally:
        engine.dispose()


def check_sqlite_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise StartError(f"storage.database_url: {folder} (the index's folder) is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StartError(f"storage.database_url: {folder} (the index's folder) is not writable")


def _connect_args(url) -> dict:
    """A bounded wait for a server that does not answer (drivers that take it)."""
    if url.get_backend_name() == "postgresql":
        return {"connect_args": {"connect_timeout": DATABASE_CONNECT_TIMEOUT_SECONDS}}
    return {}
