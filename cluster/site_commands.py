"""Commands that set up a hub and plant sites: hub-config, site-config, site-init,
and site-remove to stop copying a site's events."""

from __future__ import annotations

import argparse
import asyncio
import math

from cluster.job import connect_nats
from cluster.sites import LeafTls, hub_server_config, site_server_config
from pipeline.site_streams import (
    MAX_SITE_MAX_AGE_S,
    MIN_SITE_MAX_AGE_S,
    SITE_BUFFER_MAX_AGE_S,
    ensure_site_stream,
    remove_site_source,
    site_stream_name,
)
from pipeline.subjects import EVENTS_STREAM

__all__ = ["add_parser"]


def _tls(args: argparse.Namespace) -> LeafTls | None:
    tls = LeafTls(args.tls_cert, args.tls_key, args.tls_ca)
    return None if tls == LeafTls() else tls


def _hub_config(args: argparse.Namespace) -> int:
    print(
        hub_server_config(
            store_dir=args.store_dir,
            listen=args.listen,
            leaf_listen=args.leaf_listen,
            tls=_tls(args),
        ),
        end="",
    )
    return 0


def _site_config(args: argparse.Namespace) -> int:
    print(
        site_server_config(
            args.plant,
            store_dir=args.store_dir,
            listen=args.listen,
            hub_leaf_url=args.hub_leaf_url,
            tls=_tls(args),
        ),
        end="",
    )
    return 0


def _add_tls_arguments(parser: argparse.ArgumentParser, *, side: str) -> None:
    group = parser.add_argument_group(
        "TLS of the leaf connection",
        "PEM files; the paths go into the config as absolute paths, so write it on "
        "the host that runs the server",
    )
    if side == "hub":
        group.add_argument("--tls-cert", help="the hub's certificate")
        group.add_argument("--tls-key", help="the private key of --tls-cert")
        group.add_argument(
            "--tls-ca",
            help="CA that signed the sites' certificates; the hub then accepts only "
            "sites that present one",
        )
    else:
        group.add_argument(
            "--tls-ca",
            help="CA that signed the hub's certificate (default: the system's roots)",
        )
        group.add_argument(
            "--tls-cert", help="the site's certificate, for a hub that verifies sites"
        )
        group.add_argument("--tls-key", help="the private key of --tls-cert")


def _buffer_max_age(text: str) -> float:
    """Parse --max-age-s: 0 for no limit, else at least MIN_SITE_MAX_AGE_S seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 (no limit) or a positive number of seconds, got {text}"
        )
    if value > MAX_SITE_MAX_AGE_S:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SITE_MAX_AGE_S:,.0f} s (about 292 years), the "
            f"longest nats-server takes, got {text}; use 0 for no limit"
        )
    # A value so small that it reads as 0, such as 1e-400, is a typo, not "no limit".
    if 0 < value < MIN_SITE_MAX_AGE_S or (
        value == 0 and any(c in text for c in "123456789")
    ):
        raise argparse.ArgumentTypeError(
            f"must be 0 (no limit) or at least {MIN_SITE_MAX_AGE_S:g} s, got {text}: "
            "a site keeps events to ride out an outage of the hub link, so it should "
            "keep them longer than the longest outage expected"
        )
    return value


def _site_init(args: argparse.Namespace) -> int:
    async def create() -> None:
        nc = await connect_nats(args.nats_url)
        try:
            await ensure_site_stream(
                nc.jetstream(),
                args.plant,
                args.max_age_s,
                allow_shorter=args.allow_shorter,
            )
        finally:
            await nc.close()

    asyncio.run(create())
    print(f"stream {site_stream_name(args.plant)} is ready on {args.nats_url}")
    return 0


def _site_remove(args: argparse.Namespace) -> int:
    async def remove() -> None:
        nc = await connect_nats(args.nats_url)
        try:
            await remove_site_source(nc.jetstream(), args.plant)
        finally:
            await nc.close()

    asyncio.run(remove())
    print(
        f"{EVENTS_STREAM} on {args.nats_url} no longer copies "
        f"{site_stream_name(args.plant)}. Take {args.plant} out of PLANTSTREAM_SITES "
        "too, or the next start copies it again"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    hub = commands.add_parser(
        "hub-config",
        help="print the nats-server config of the hub that plant sites connect to",
    )
    hub.add_argument("--store-dir", required=True, help="JetStream store folder")
    hub.add_argument(
        "--listen", default="0.0.0.0:4222", help="client address (default: %(default)s)"
    )
    hub.add_argument(
        "--leaf-listen",
        default="0.0.0.0:7422",
        help="address plant sites connect to as leaf nodes (default: %(default)s)",
    )
    _add_tls_arguments(hub, side="hub")
    hub.set_defaults(handler=_hub_config)

    site = commands.add_parser(
        "site-config",
        help="print the nats-server config of a plant site's leaf node",
    )
    site.add_argument("--plant", required=True, help="plant id of the site")
    site.add_argument(
        "--store-dir", required=True, help="JetStream store folder at the site"
    )
    site.add_argument("--hub-leaf-url", required=True, help="the hub's leaf node URL")
    site.add_argument(
        "--listen", default="0.0.0.0:4222", help="client address (default: %(default)s)"
    )
    _add_tls_arguments(site, side="site")
    site.set_defaults(handler=_site_config)

    init = commands.add_parser(
        "site-init",
        help="create a site's buffer stream SITE_<plant> on the site's nats-server",
    )
    init.add_argument("--plant", required=True, help="plant id of the site")
    init.add_argument("--nats-url", required=True, help="the site's nats-server")
    init.add_argument(
        "--max-age-s",
        type=_buffer_max_age,
        default=SITE_BUFFER_MAX_AGE_S,
        help="seconds the site keeps events, the longest outage it rides out; 0 keeps "
        "them until the disk is full (default: %(default)s)",
    )
    init.add_argument(
        "--allow-shorter",
        action="store_true",
        help="shorten the retention of a stream that contains events, which "
        "deletes the older ones at once",
    )
    init.set_defaults(handler=_site_init)

    remove = commands.add_parser(
        "site-remove",
        help="stop PLANT_EVENTS on the hub copying a site's buffer stream",
        description="A start without the plant in PLANTSTREAM_SITES keeps copying "
        "the site, so that a missing variable cannot cut a site off; this command is "
        "how a site is taken out. Events the hub has not copied stay in the site's "
        "stream.",
    )
    remove.add_argument("--plant", required=True, help="plant id of the site")
    remove.add_argument("--nats-url", required=True, help="the hub's nats-server")
    remove.set_defaults(handler=_site_remove)
