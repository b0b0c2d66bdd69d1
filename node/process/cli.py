"""The `pneumonode` command: serve, worker, import, status, retry, verify, config-check, and
the classifier's commands (stats, train, predict, cam, localise).

Every subcommand takes `--config PATH` (default ./config.toml, or the embedded defaults when
that file does not exist) and `--log-level`. A configuration error is one line naming the
key, and exit status 2, before anything starts. A valid file that cannot start on this host
(a certificate that does not load, a port in use, an address not this host's, a storage
folder that is a file, a database that does not answer) is one line naming the key and the
cause, and exit status 5, from `config-check` and from `serve` alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from node.config import Config, ConfigError, effective_toml, load_config
from node.dicom.pynetdicom_internals import UnsupportedPynetdicom
from node.process.logs import configure_logging
from node.process.start_checks import StartError, check_start
from storage.migrations import IndexVersionError

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
EXIT_WRONG_DEPENDENCY = 3
EXIT_INDEX_TOO_NEW = 4
EXIT_START_FAILED = 5  # as node.process.serve_processes.EXIT_START_FAILED

# Subcommand handlers take the parsed arguments and return the exit status.
Command = Callable[[argparse.Namespace], int]


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    """Apply the `serve` command-line overrides to the loaded configuration."""
    node = config.node
    storage = config.storage
    if args.port is not None:
        node = dataclasses.replace(node, port=args.port)
    if args.bind is not None:
        node = dataclasses.replace(node, bind_address=args.bind)
    if args.storage is not None:
        folder = Path(args.storage).resolve()
        database_url = storage.database_url
        if database_url == f"sqlite:///{storage.folder / 'index.sqlite'}":
            database_url = f"sqlite:///{folder / 'index.sqlite'}"
        storage = dataclasses.replace(storage, folder=folder, database_url=database_url)
    return dataclasses.replace(config, node=node, storage=storage)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.dicom.pynetdicom_internals import check_pynetdicom
    from node.process.serve_processes import serve
    from node.process.services import node_services

    config = _with_overrides(_load(args), args)
    check_pynetdicom()
    return serve(config, node_services(config))


def cmd_worker(args: argparse.Namespace) -> int:
    from node.dicom.pynetdicom_internals import check_pynetdicom
    from node.process.services import run_worker

    config = _load(args)
    check_pynetdicom()  # the worker's result sender uses the same adaptations
    return run_worker(config)


def cmd_status(args: argparse.Namespace) -> int:
    from storage.database import create_index_engine
    from storage.report import format_report, queue_report, report_data

    config = _load(args)
    engine = create_index_engine(config.storage.database_url)
    try:
        report = queue_report(engine, last=args.last)
    finally:
        engine.dispose()
    if args.json:
        data = {**report_data(report), "analysis_model": analysis_model_line(config)}
        print(json.dumps(data, indent=2))
        return 0
    print(format_report(report))
    print(analysis_model_line(config))
    return 0


def analysis_model_line(config: Config) -> str:
    """Which model analyses arriving images, as `status` says it (the demo is named)."""
    from ai.model.choice import choose_model

    analysis = config.analysis
    if not analysis.enabled:
        return "analysis: off (analysis.enabled = false)"
    choice = choose_model(analysis.model, analysis.demo_model)
    if choice is None:
        return f"analysis model: none yet at {analysis.model}; analysis waits for one"
    return f"analysis model: {choice.describe()}"


def cmd_retry(args: argparse.Namespace) -> int:
    from storage.database import create_index_engine
    from storage.deliveries import DeliveryQueue
    from storage.jobs import JobQueue

    config = _load(args)
    engine = create_index_engine(config.storage.database_url)
    try:
        jobs = JobQueue(engine).requeue_failed()
        settings = config.delivery
        deliveries = DeliveryQueue(
            engine,
            retry_initial_seconds=settings.retry_initial_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            max_attempts=settings.max_attempts,
        ).requeue_failed()
    finally:
        engine.dispose()
    print(f"requeued {jobs} failed analysis jobs and {deliveries} failed deliveries")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from node.context import build_context
    from storage.importer import import_folder

    config = _load(args)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"pneumonode import: {folder} is not a folder", file=sys.stderr)
        return 1
    context = build_context(config)
    try:
        summary = import_folder(context.archive, folder, progress=not args.no_progress)
    finally:
        context.engine.dispose()
    for line in summary.lines():
        print(line)
    if args.list_skipped:
        for path, reason in summary.skipped:
            print(f"skipped {path}: {reason}")
    # A script or a user must see that files were left behind without reading the counts.
    refused = len(summary.refused)
    if refused:
        hint = "" if args.list_skipped else " (--list-skipped names them)"
        print(f"pneumonode import: {refused} file(s) refused{hint}", file=sys.stderr)
        return 1
    if not summary.instances:
        print(f"pneumonode import: no DICOM instance in {folder}", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from storage.consistency import verify
    from storage.database import create_index_engine
    from storage.filestore import FileStore

    config = _load(args)
    engine = create_index_engine(config.storage.database_url)
    try:
        report = verify(FileStore(config.storage.folder), engine, checksums=not args.quick)
    finally:
        engine.dispose()
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    if not args.file_only:
        # StartError: one line, exit status 5 (main). A port in use is only a warning here:
        # checking the file of a node that is running (its listener holds the port) is
        # what an operator does before a restart; `serve` refuses it.
        check_start(config, busy_port=lambda why: print(
            f"warning: {why} (a running node? serve cannot start while it is)", file=sys.stderr
        ))
    print(f"{config.source}: OK")
    if args.show:
        # A file leaves most keys to the defaults: --show says what the node will run with.
        print(effective_toml(config), end="")
        return 0
    print(f"  AE title {config.node.ae_title} on {config.node.bind_address}:{config.node.port}")
    print(f"  storage {config.storage.folder}")
    print(f"  index {config.storage.database_url}")
    print(f"  peers: {', '.join(p.ae_title for p in config.peers) or 'none'}")
    metrics = config.metrics
    where = f"http://{metrics.address}:{metrics.port}" if metrics.enabled else "off"
    print(f"  metrics {where}")
    return 0


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="configuration file (default ./config.toml; embedded defaults if absent)",
    )
    common.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging level (default INFO)",
    )
    return common


def _register_ai_commands(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """The classifier's subcommands (stats, train, predict, ...), when ai/ is present.

    `ai.cli.commands` must not import torch at import time, so `serve` starts fast; it gets the
    shared --config/--log-level options as `parents` when its register accepts them.
    """
    if importlib.util.find_spec("ai.cli.commands") is None:
        return
    register = importlib.import_module("ai.cli.commands").register
    if "parents" in inspect.signature(register).parameters:
        register(subparsers, parents=[common])
    else:
        register(subparsers)


NODE_COMMANDS = ("serve", "worker", "import", "status", "retry", "verify", "config-check")


def build_parser(with_ai_commands: bool = True) -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="pneumonode",
        description="DICOM node: Storage SCP, SQL index, C-FIND and pneumothorax analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = subparsers.add_parser("serve", parents=[common], help="run the DICOM node")
    serve.add_argument("--port", type=int, help="override node.port")
    serve.add_argument("--bind", metavar="ADDRESS", help="override node.bind_address")
    serve.add_argument("--storage", metavar="FOLDER", help="override storage.folder")
    serve.set_defaults(func=cmd_serve)

    importer = subparsers.add_parser(
        "import",
        parents=[common],
        help="archive and index a folder of DICOM files",
        description="Archive and index every DICOM file below DIR by the rules of C-STORE. "
        "Exit status 0 when every DICOM instance found was archived; 1 when any file was "
        "refused (a DICOM file the archive would not take, or an unreadable file) or DIR "
        "holds no DICOM instance. Files without the DICM prefix and DICOMDIRs are skipped, "
        "not refused. The summary counts both.",
    )
    importer.add_argument("folder", metavar="DIR", help="folder to import (recursively)")
    importer.add_argument("--no-progress", action="store_true", help="no progress bar")
    importer.add_argument(
        "--list-skipped", action="store_true", help="print each skipped file and why"
    )
    importer.set_defaults(func=cmd_import)

    worker = subparsers.add_parser(
        "worker",
        parents=[common],
        help="run the analysis worker alone, against the node's database and storage",
    )
    worker.set_defaults(func=cmd_worker)

    status = subparsers.add_parser(
        "status", parents=[common], help="analysis jobs and deliveries by state, last errors"
    )
    status.add_argument("--last", type=int, default=5, help="how many errors to list")
    status.add_argument(
        "--json", action="store_true", help="the same figures as one JSON object, for scripts"
    )
    status.set_defaults(func=cmd_status)

    retry = subparsers.add_parser(
        "retry", parents=[common], help="queue failed analysis jobs and deliveries again"
    )
    retry.set_defaults(func=cmd_retry)

    verify = subparsers.add_parser(
        "verify",
        parents=[common],
        help="check every indexed instance against its file; exit 1 if anything is wrong",
    )
    verify.add_argument(
        "--quick", action="store_true", help="check existence and size only, not checksums"
    )
    verify.set_defaults(func=cmd_verify)

    check = subparsers.add_parser(
        "config-check", parents=[common], help="validate the configuration and exit"
    )
    check.add_argument(
        "--show",
        action="store_true",
        help="print the effective configuration as TOML (every key, defaults filled in)",
    )
    check.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone, not whether it starts on this host (certificates, "
        "port, address, storage folder, database)",
    )
    check.set_defaults(func=cmd_config_check)

    if with_ai_commands:
        _register_ai_commands(subparsers, common)
    parser.set_defaults(config=None, log_level="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The classifier's commands load fastai and torch (seconds): not for the node's own.
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(with_ai_commands=command not in NODE_COMMANDS).parse_args(argv)
    configure_logging(args.log_level)
    func: Command = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"pneumonode: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except UnsupportedPynetdicom as exc:
        print(f"pneumonode: {exc}", file=sys.stderr)
        return EXIT_WRONG_DEPENDENCY
    except IndexVersionError as exc:  # a newer pneumonode's index: left as it is
        print(f"pneumonode: {exc}", file=sys.stderr)
        return EXIT_INDEX_TOO_NEW
    except StartError as exc:
        print(f"pneumonode: cannot start: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
