"""The `plantstream` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from contracts.codec import encode

logger = logging.getLogger(__name__)

__all__ = ["main"]


def _input_messages(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    if args.input:
        return list(_iter_file_messages(args.input))
    from pipeline.sources.generated import StreamSpec, generate

    spec = StreamSpec(plants=args.plants, orders_per_plant=args.orders, seed=args.seed)
    messages, _ = generate(spec)
    return [(m.subject, m.data) for m in messages]


def _iter_file_messages(paths: Sequence[Path]) -> Iterator[tuple[str, bytes]]:
    from pipeline.sources import read_events
    from pipeline.subjects import event_subject

    for path in paths:
        if not path.exists():
            raise SystemExit(f"plantstream: input {path} does not exist")
        for event in read_events(path):
            tag = event.__struct_config__.tag
            yield event_subject(event.plant, str(tag)), encode(event)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        default=Path("out/plantstream.duckdb"),
        help="DuckDB file for the snapshots (default: %(default)s)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=2,
        help="number of partition actors (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-url",
        help="NATS server to use instead of starting an embedded one",
    )
    parser.add_argument(
        "--ray-address",
        help='Ray cluster to join ("auto" or host:port) instead of starting Ray locally',
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from cluster.job import JobConfig, run_job_sync
    from cluster.summary import format_summary
    from pipeline.settings import PipelineSettings
    from actors.settings import StateSettings

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


def _cmd_schema(args: argparse.Namespace) -> int:
    from contracts.schema import event_schema, posting_schema

    schema = event_schema() if args.kind == "events" else posting_schema()
    json.dump(schema, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantstream",
        description="Plant events from NATS JetStream through Ray actors to ERP postings "
        "and DuckDB.",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (default: %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the main job on an embedded nats-server and local Ray",
        description="Publish the input, process until the streams are drained, write the "
        "DuckDB file and print a summary. With no --input, a generated multi-plant stream "
        "with duplicates, out-of-order and bad messages is used.",
    )
    demo.add_argument(
        "--input",
        type=Path,
        nargs="+",
        help="data files or folders: AI4I 2020 CSV, SECOM labels, B2MML XML",
    )
    demo.add_argument(
        "--plants",
        type=int,
        default=3,
        help="generated stream: plants (default: %(default)s)",
    )
    demo.add_argument(
        "--orders",
        type=int,
        default=200,
        help="generated stream: orders per plant (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=7,
        help="generated stream: random seed (default: %(default)s)",
    )
    _add_job_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    schema = commands.add_parser(
        "schema", help="print the JSON Schema of the contracts"
    )
    schema.add_argument("kind", choices=["events", "postings"])
    schema.set_defaults(handler=_cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
