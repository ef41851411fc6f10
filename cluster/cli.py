"""The `plantstream` command."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import nats.js.errors

logger = logging.getLogger(__name__)

__all__ = ["main"]

OPERATION_MODULES: list[str] = [
    "cluster.site_commands",
    "cluster.operations",
    "cluster.reconcile",
]
"""Modules that each register one or more subcommands through `add_parser(commands)`."""


SNAPSHOT_WRITING_COMMANDS = frozenset({"demo", "run", "replay"})
"""Subcommands that write their --db file, whose path `main` checks first."""


def _validate_shared_options(args: argparse.Namespace) -> None:
    """Raise ValueError for a malformed --nats-url or an unwritable --db path.

    Checked before the command starts Ray or publishes anything, which takes seconds.
    """
    nats_url = getattr(args, "nats_url", None)
    db = (
        getattr(args, "db", None) if args.command in SNAPSHOT_WRITING_COMMANDS else None
    )
    if nats_url is None and db is None:
        return
    # Imported here: the module loads Ray, which the other commands do without.
    from cluster.job import validate_nats_url, validate_snapshot_path

    if nats_url is not None:
        validate_nats_url(nats_url)
    if db is not None:
        validate_snapshot_path(db)


SUPPORTED_INPUTS = "AI4I 2020 CSV, SECOM labels, B2MML XML, JSON Lines of events"

NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024
"""nats-server's max_payload unless its config sets another, as for the embedded one."""


def _input_messages(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    if args.input:
        # A server given with --nats-url may take more; its limit is checked when the
        # messages are published.
        max_bytes = NATS_DEFAULT_MAX_PAYLOAD if args.nats_url is None else None
        return _file_messages(args.input, max_bytes=max_bytes)
    return _generated_messages(args)


def _generated_messages(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    from pipeline.sources.generated import StreamSpec, generate

    spec = StreamSpec(plants=args.plants, orders_per_plant=args.orders, seed=args.seed)
    messages, _ = generate(spec)
    return [(m.subject, m.data) for m in messages]


def _file_messages(
    paths: Sequence[Path], *, max_bytes: int | None = None
) -> list[tuple[str, bytes]]:
    """Read every input file; raise ValueError if they hold no event at all."""
    messages = list(_iter_file_messages(paths, max_bytes=max_bytes))
    if not messages:
        # A folder of files of no known kind, each skipped with a warning.
        raise ValueError(
            f"no events in {', '.join(map(str, paths))}: no file there is of a kind "
            f"plantstream reads ({SUPPORTED_INPUTS})"
        )
    return messages


def _iter_file_messages(
    paths: Sequence[Path], *, max_bytes: int | None = None
) -> Iterator[tuple[str, bytes]]:
    from pipeline.sources import read_messages

    for path in paths:
        if not path.exists():
            raise SystemExit(f"plantstream: input {path} does not exist")
        yield from read_messages(path, max_bytes=max_bytes)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """Parse a command-line count that must be at least 1."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """Parse a command-line count that may be 0, as --limit 0 for no limit."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""Level names that --log-level takes. logging also takes WARN and FATAL, which its
documentation marks as deprecated, and NOTSET, which logs as much as DEBUG."""


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """Add --log-level, which argparse checks, so that a wrong name is a usage error
    and not a ValueError traceback from logging.basicConfig."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"logging level: {', '.join(LOG_LEVELS)} (default: %(default)s)",
    )


def _add_job_options(
    parser: argparse.ArgumentParser, *, nats_url_required: bool = False
) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        default=Path("out/plantstream.duckdb"),
        help="DuckDB file for the snapshots (default: %(default)s)",
    )
    parser.add_argument(
        "--partitions",
        type=positive_int,
        default=2,
        help="number of partition actors; a run with another number than the last "
        "checkpoint's splits that checkpoint among its own (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url",
        required=nats_url_required,
        help=(
            "NATS server whose PLANT_EVENTS stream to consume (plantstream demo "
            "starts an embedded one)"
            if nats_url_required
            else "NATS server to use instead of starting an embedded one"
        ),
    )
    parser.add_argument(
        "--ray-address",
        help='Ray cluster to join ("auto" or host:port) instead of a local Ray',
    )


def _add_generated_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plants",
        type=int,
        default=3,
        help="generated stream: plants (default: %(default)s)",
    )
    parser.add_argument(
        "--orders",
        type=int,
        default=200,
        help="generated stream: orders per plant (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=7,
        help="generated stream: random seed (default: %(default)s). Every seed uses "
        "the same plants, machines and event times, so a second stream on the same "
        "server reports the machines' state changes as far behind their history "
        "and dead-letters them; publish each seed to a fresh server",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from actors.settings import StateSettings
    from cluster.job import JobConfig, run_job_sync
    from cluster.summary import format_summary
    from pipeline.settings import PipelineSettings

    inputs = _input_messages(args)
    config = JobConfig(
        db=args.db,
        partitions=args.partitions,
        nats_url=args.nats_url,
        ray_address=args.ray_address,
        pipeline=PipelineSettings.from_env(),
        state=StateSettings.from_env(),
    )
    result = run_job_sync(config, inputs)
    print(format_summary(result, args.db))
    return 0


@contextlib.contextmanager
def _ray_keeps_signal_handlers() -> Iterator[None]:
    """Keep Ray from replacing this process's SIGTERM handler while it starts.

    Ray's handler raises SystemExit, and a SIGTERM in the seconds of Ray's start then
    ended the run from the middle of it, leaving two of Ray's agent processes running.
    Ray installs it through `ray._private.utils.set_sigterm_handler`, a private
    function, so the patch is skipped if a Ray version lacks it.
    """
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from actors.settings import StateSettings
    from cluster.job import JobConfig, run_job
    from cluster.summary import format_summary
    from pipeline.settings import PipelineSettings

    config = JobConfig(
        db=args.db,
        partitions=args.partitions,
        nats_url=args.nats_url,
        ray_address=args.ray_address,
        pipeline=PipelineSettings.from_env(),
        state=StateSettings.from_env(),
    )

    from cluster.job import connect_ray

    # Ray takes a second or more to start. Until the event loop's handlers take over,
    # a signal is only recorded, and a run that received one stops before it
    # processes anything. Later, a stop ends with a last checkpoint and a summary.
    early = _early_signals
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _record_signal)
    with _ray_keeps_signal_handlers():
        connect_ray(args.ray_address)
    if early:
        print(
            f"plantstream run: received {early[0].name} while starting; stopped "
            "before processing anything",
            file=sys.stderr,
        )
        return 0

    from cluster.lease import LeaseLostError, StoppedWaitingError
    from pipeline.ingest import RecoveriesExhaustedError, StartStoppedError

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            logger.info(
                "received %s: stopping, after a last checkpoint if NATS is reachable",
                signum.name,
            )
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if early:
            on_signal(early[0])
        try:
            result = await run_job(
                config, None, until_drained=args.until_drained, stop=stop
            )
        except (StoppedWaitingError, StartStoppedError) as error:
            print(f"plantstream run: {error}", file=sys.stderr)
            return 0
        except LeaseLostError as error:
            print(f"plantstream run: {error}", file=sys.stderr)
            return 1
        except RecoveriesExhaustedError as error:
            # The message names the last failure and the fix, and the traceback only
            # shows where the ingest gave up, so it is logged at DEBUG.
            logger.error("plantstream run stopped: %s", error)
            logger.debug("the ingest gave up", exc_info=True)
            return 1
        print(format_summary(result, args.db))
        return 0

    return asyncio.run(serve())


def _cmd_publish(args: argparse.Namespace) -> int:
    import asyncio

    from cluster.job import connect_nats
    from pipeline.publish import PublishError, publish_all
    from pipeline.settings import PipelineSettings
    from pipeline.site_streams import SITE_DOMAIN_PREFIX
    from pipeline.streams import ensure_streams
    from pipeline.subjects import EVENTS_PREFIX, EVENTS_STREAM

    if bool(args.paths) == args.generated:
        raise SystemExit(
            "plantstream publish: give either data files or --generated, not "
            f"{'both' if args.generated else 'neither'}"
        )

    events_stream: list[str | None] = []

    async def publish() -> tuple[int, int]:
        nc = await connect_nats(args.nats_url)
        try:
            js = nc.jetstream()
            try:
                holder = await js.find_stream_name_by_subject(f"{EVENTS_PREFIX}.>")
            except nats.js.errors.NotFoundError:
                holder = None
            events_stream.append(holder)
            if holder is None:
                domain = (await js.account_info()).domain or ""
                if domain.startswith(SITE_DOMAIN_PREFIX):
                    raise ValueError(
                        f"{args.nats_url} is the nats-server of plant site {domain} "
                        "and has no buffer stream yet, and the hub's streams do not "
                        "belong there: run plantstream site-init --plant "
                        f"{domain.removeprefix(SITE_DOMAIN_PREFIX)} --nats-url "
                        f"{args.nats_url} first"
                    )
            if holder in (None, EVENTS_STREAM):
                await ensure_streams(js, PipelineSettings.from_env())
            else:
                # A plant site's nats-server keeps the plant's events in a buffer
                # stream of its own, which the hub's streams would overlap.
                logger.info(
                    "stream %s takes plant events on %s; publishing to it",
                    holder,
                    args.nats_url,
                )
            # Every file is read and checked before the first message goes out, so a
            # bad line publishes nothing rather than the files before it.
            messages = (
                _generated_messages(args)
                if args.generated
                else _file_messages(args.paths, max_bytes=nc.max_payload)
            )
            return await publish_all(nc, ((s, d, None) for s, d in messages))
        finally:
            await nc.close()

    try:
        stored, _ = asyncio.run(publish())
    except PublishError as error:
        holder = events_stream[0] if events_stream else None
        site_note = ""
        if holder not in (None, EVENTS_STREAM):
            site_note = (
                f". Stream {holder} takes this server's plant events, as at a plant "
                "site: publish only the events of the site's own plant there, and the "
                "others to their own site or to the hub"
            )
        # Publishing the same input again is safe: the partitions drop the events
        # stored the first time as duplicates of their event ids.
        stored_note = (
            ""
            if error.stored is None
            else f"{error.stored} events were stored before publishing stopped; "
        )
        print(
            f"plantstream publish: {error}{site_note}. {stored_note}after fixing the "
            "cause, publish the same input again: the pipeline drops the repeated "
            "events as duplicates",
            file=sys.stderr,
        )
        return 2
    print(f"published {stored} events to {args.nats_url}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from contracts.schema import event_schema, posting_schema

    schema = event_schema() if args.kind == "events" else posting_schema()
    json.dump(schema, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantstream",
        description="Plant events from NATS JetStream through Ray actors to ERP "
        "postings and DuckDB.",
    )
    add_log_level_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the main job on an embedded nats-server and local Ray",
        description="Publish the input, process until the streams are drained, write "
        "the DuckDB file and print a summary. With no --input, a generated multi-plant "
        "stream with duplicates, out-of-order and bad messages is used.",
    )
    demo.add_argument(
        "--input",
        type=Path,
        nargs="+",
        help="data files or folders: AI4I 2020 CSV, SECOM labels, B2MML XML, or JSON "
        "Lines of your own events (one event object per line)",
    )
    _add_generated_options(demo)
    _add_job_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser(
        "run",
        help="process the plant events stream of a NATS server as a service",
        description="Consume PLANT_EVENTS from --nats-url until SIGINT or SIGTERM (or, "
        "with --until-drained, until nothing is pending), resuming from the last "
        "checkpoint. Streams and the consumer are created if missing.",
    )
    _add_job_options(run, nats_url_required=True)
    run.add_argument(
        "--until-drained",
        action="store_true",
        help="exit once the stream has no pending messages",
    )
    run.set_defaults(handler=_cmd_run)

    publish = commands.add_parser(
        "publish",
        help="publish data files, or the generated stream, to a NATS server",
        description="Publish events to PLANT_EVENTS and exit, without processing "
        "them: a `run` on the same server does that.",
    )
    publish.add_argument(
        "paths",
        type=Path,
        nargs="*",
        help="files or folders to read, of the kinds demo --input takes; all are "
        "checked before the first event is published",
    )
    publish.add_argument(
        "--generated",
        action="store_true",
        help="publish the generated multi-plant stream that `demo` uses, not files",
    )
    _add_generated_options(publish)
    publish.add_argument("--nats-url", required=True, help="NATS server to publish to")
    publish.set_defaults(handler=_cmd_publish)

    schema = commands.add_parser(
        "schema", help="print the JSON Schema of the contracts"
    )
    schema.add_argument("kind", choices=["events", "postings"])
    schema.set_defaults(handler=_cmd_schema)
    for module_name in OPERATION_MODULES:
        importlib.import_module(module_name).add_parser(commands)
    return parser


_early_signals: list[signal.Signals] = []
"""SIGINT and SIGTERM received before a command's own handlers took over."""


def _record_signal(signum: int, frame: object) -> None:
    _early_signals.append(signal.Signals(signum))


def _ray_running() -> bool:
    # Looked up, not imported: commands that never use Ray should not load it.
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def main(argv: Sequence[str] | None = None) -> int:
    # Signals are recorded from the start, because a SIGINT while Ray's modules load
    # ended in a traceback or, in some runs, was lost. Other commands get the default
    # handlers back once the command is known, and any signal recorded by then.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _record_signal)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command != "run":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for signum in _early_signals:
                signal.raise_signal(signum)
        _validate_shared_options(args)
        ray_was_running = _ray_running()
        code = int(args.handler(args))
        if not ray_was_running and _ray_running():
            # Shut down here rather than in Ray's exit hook, where a Ctrl-C during
            # its waits printed a traceback after the command's work was done.
            sys.modules["ray"].shutdown()
        return code
    except BrokenPipeError:
        # The reader of the output (head, less) quit early, which is not a failure.
        # Point stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Ctrl-C before a command's own handlers are in place, such as while the
        # modules load. A traceback of the import machinery would not help the user.
        print(f"plantstream {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ConnectionError) as error:
        logger.debug("command failed", exc_info=True)
        print(f"plantstream: {error}", file=sys.stderr)
        return 2
    except nats.js.errors.ServiceUnavailableError:
        # nats-py's error contains only the code 503, which names neither the cause nor
        # the fix.
        logger.debug("command failed", exc_info=True)
        print(
            "plantstream: JetStream is not available on the NATS server (503). Start "
            "nats-server with -js, or enable jetstream in its configuration, or wait "
            "until a clustered JetStream is ready",
            file=sys.stderr,
        )
        return 2
    except ValueError as error:
        # Unreadable input files and unusable options and settings raise ValueError
        # with the value and the fix. A traceback would only hide that message.
        logger.debug("command failed", exc_info=True)
        print(f"plantstream: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # Imported here: the modules load pyarrow and DuckDB, which `--help` and the
        # config commands do without.
        from pipeline.publish import PublishError
        from pipeline.sink import SinkError

        if not isinstance(error, (PublishError, SinkError)):
            raise
        # Their messages name the subject or the file and the fix.
        logger.debug("command failed", exc_info=True)
        print(f"plantstream: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
