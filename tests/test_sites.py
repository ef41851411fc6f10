"""A plant site as a leaf node: events stored while the hub is down get through."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import duckdb
import nats
import pytest

from cluster.job import JobConfig, run_job
from cluster.nats_server import EmbeddedNatsServer
from cluster.sites import hub_server_config, site_server_config
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.site_streams import ensure_site_stream, site_domain, site_stream_name
from pipeline.sources.generated import StreamSpec, generate
from pipeline.subjects import EVENTS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_configs_name_domain_and_remote() -> None:
    site = site_server_config(
        "P01",
        store_dir="/data/js",
        listen="0.0.0.0:4222",
        hub_leaf_url="nats-leaf://hub:7422",
    )
    assert 'domain: "site-P01"' in site
    assert 'url: "nats-leaf://hub:7422"' in site
    assert 'deny_exports: ["plant.events.>"]' in site
    hub = hub_server_config(
        store_dir="/data/js", listen="0.0.0.0:4222", leaf_listen="0.0.0.0:7422"
    )
    assert "domain: hub" in hub
    with pytest.raises(ValueError, match="quote"):
        hub_server_config(store_dir='/a"b', listen="x", leaf_listen="y")


def test_backlog_from_offline_site(tmp_path: Path) -> None:
    messages, expected = generate(StreamSpec(plants=1, orders_per_plant=20, seed=3))
    plant = messages[0].subject.split(".")[2]
    leaf_port = free_port()
    site = EmbeddedNatsServer(
        store_dir=tmp_path / "site",
        config=site_server_config(
            plant,
            store_dir=str(tmp_path / "site"),
            listen="127.0.0.1:4222",
            hub_leaf_url=f"nats-leaf://127.0.0.1:{leaf_port}",
        ),
    ).start()
    hub = EmbeddedNatsServer(
        store_dir=tmp_path / "hub",
        config=hub_server_config(
            store_dir=str(tmp_path / "hub"),
            listen="127.0.0.1:4222",
            leaf_listen=f"127.0.0.1:{leaf_port}",
        ),
    )
    settings = PipelineSettings(sites=plant, fetch_batch=500)
    try:

        async def publish_while_hub_down() -> int:
            nc = await nats.connect(site.url)
            try:
                js = nc.jetstream()
                await ensure_site_stream(js, plant)
                stored, _ = await publish_all(
                    nc, ((m.subject, m.data, None) for m in messages)
                )
                return stored
            finally:
                await nc.close()

        assert asyncio.run(publish_while_hub_down()) == len(messages)
        hub.start()

        async def wait_for_backlog() -> int:
            from pipeline.streams import ensure_streams

            nc = await nats.connect(hub.url)
            try:
                # Sources created before the leaf connection is up start only on
                # JetStream's retry schedule (about 40 s seen here), so wait for the
                # link.
                site_api = nc.jetstream(domain=site_domain(plant))
                for _ in range(100):
                    try:
                        await site_api.stream_info(site_stream_name(plant))
                        break
                    except (nats.errors.Error, nats.js.errors.Error):
                        await asyncio.sleep(0.1)
                js = nc.jetstream()
                await ensure_streams(js, settings)
                for _ in range(200):
                    info = await js.stream_info(EVENTS_STREAM)
                    if info.state.messages >= len(messages):
                        break
                    await asyncio.sleep(0.1)
                return info.state.messages
            finally:
                await nc.close()

        assert asyncio.run(wait_for_backlog()) == len(messages)
        config = JobConfig(
            db=tmp_path / "hub.duckdb", nats_url=hub.url, pipeline=settings
        )
        result = asyncio.run(run_job(config, None))
    finally:
        hub.stop()
        site.stop()

    assert result.totals["applied"] == expected.events
    with duckdb.connect(str(tmp_path / "hub.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT plant, material, movement_type, sum(quantity) FROM postings "
            "WHERE posting_type = 'goods_movement' GROUP BY ALL"
        ).fetchall()
    assert {(p, m, t): q for p, m, t, q in rows} == expected.movements
    assert site_stream_name(plant) == f"SITE_{plant}"
