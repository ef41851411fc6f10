"""A plant site as a leaf node: events stored while the hub is down get through."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import Iterable
from pathlib import Path

import duckdb
import nats
import pytest

from cluster import reconcile
from cluster.job import JobConfig, run_job
from cluster.nats_server import EmbeddedNatsServer
from cluster.sites import LeafTls, hub_server_config, site_server_config
from pipeline.checkpoints import read_manifest
from pipeline.publish import publish_all
from pipeline.settings import PipelineSettings
from pipeline.site_streams import (
    RetentionCutError,
    SiteSequences,
    ensure_site_stream,
    remove_site_source,
    site_domain,
    site_stream_name,
    source_position,
)
from pipeline.sources.generated import GeneratedMessage, StreamSpec, generate
from pipeline.streams import CHECKPOINT_BUCKET, ensure_streams
from pipeline.subjects import EVENTS_STREAM

pytestmark = pytest.mark.usefixtures("ray_local")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _hub(
    folder: Path, leaf_port: int, tls: LeafTls | None = None
) -> EmbeddedNatsServer:
    """Return an unstarted hub server on loopback with its leaf listener on
    `leaf_port`."""
    return EmbeddedNatsServer(
        store_dir=folder / "hub",
        config=hub_server_config(
            store_dir=str(folder / "hub"),
            listen="127.0.0.1:4222",
            leaf_listen=f"127.0.0.1:{leaf_port}",
            tls=tls,
        ),
    )


def _site(
    folder: Path, plant: str, hub_leaf_url: str, tls: LeafTls | None = None
) -> EmbeddedNatsServer:
    """Return an unstarted site server of `plant` on loopback, a leaf node of the hub
    at `hub_leaf_url`."""
    return EmbeddedNatsServer(
        store_dir=folder / "site",
        config=site_server_config(
            plant,
            store_dir=str(folder / "site"),
            listen="127.0.0.1:4222",
            hub_leaf_url=hub_leaf_url,
            tls=tls,
        ),
    )


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
    assert 'deny_imports: ["plant.events.>"]' in site
    hub = hub_server_config(
        store_dir="/data/js", listen="0.0.0.0:4222", leaf_listen="0.0.0.0:7422"
    )
    assert "domain: hub" in hub
    assert "no_advertise: true" in hub
    with pytest.raises(ValueError, match="quote"):
        hub_server_config(store_dir='/a"b', listen="x", leaf_listen="y")


def test_backlog_from_offline_site(tmp_path: Path) -> None:
    messages, expected = generate(StreamSpec(plants=1, orders_per_plant=20, seed=3))
    plant = messages[0].subject.split(".")[2]
    leaf_port = free_port()
    site = _site(tmp_path, plant, f"nats-leaf://127.0.0.1:{leaf_port}").start()
    hub = _hub(tmp_path, leaf_port)
    settings = PipelineSettings(sites=plant, fetch_batch=500)
    try:
        stored = asyncio.run(_publish_at_site(site.url, plant, messages))
        assert stored == len(messages)
        hub.start()

        assert asyncio.run(
            _source_sites(hub.url, plant, settings, len(messages))
        ) == len(messages)
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


def test_source_position_reads_the_copy_header() -> None:
    header = "SITE_P01:q4xzB5QQ 17 > > plant.events.P01.x CJ07GdsS"
    assert source_position({"Nats-Stream-Source": header}) == ("SITE_P01", 17)
    assert source_position({"Nats-Msg-Id": "x"}) is None
    assert source_position(None) is None
    assert source_position({"Nats-Stream-Source": "SITE_P01 soon"}) is None


def test_site_sequences_count_gaps() -> None:
    sequences = SiteSequences()
    assert sequences.missing_before("SITE_P01", 40) == 0
    assert sequences.missing_before("SITE_P01", 41) == 0
    assert sequences.missing_before("SITE_P01", 45) == 3
    assert sequences.missing_before("SITE_P01", 44) == 0
    assert sequences.missing_before("SITE_P01", 46) == 0
    assert sequences.missing_before("SITE_P02", 9) == 0
    # A restart goes on from the checkpoint's sequences.
    restored = SiteSequences(sequences.highest)
    assert restored.missing_before("SITE_P01", 50) == 3
    # The site stream created again: its numbering starts over, and so do the gaps.
    assert restored.missing_before("SITE_P01", 1) == 0
    assert restored.missing_before("SITE_P01", 2) == 0
    assert restored.missing_before("SITE_P01", 5) == 2


def test_messages_a_site_dropped_become_a_dead_letter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages, _ = generate(StreamSpec(plants=1, orders_per_plant=10, seed=5))
    plant = messages[0].subject.split(".")[2]
    leaf_port = free_port()
    site = _site(tmp_path, plant, f"nats-leaf://127.0.0.1:{leaf_port}").start()
    hub = _hub(tmp_path, leaf_port)
    settings = PipelineSettings(sites=plant, fetch_batch=100)
    dropped = range(20, 25)
    try:
        # As the site's max age would during an outage of the hub.
        asyncio.run(_publish_at_site(site.url, plant, messages, drop=dropped))
        hub.start()
        asyncio.run(_source_sites(hub.url, plant, settings, len(messages) - 5))
        config = JobConfig(
            db=tmp_path / "hub.duckdb", nats_url=hub.url, pipeline=settings
        )
        result = asyncio.run(run_job(config, None))

        async def committed_site_seqs() -> dict[str, int]:
            nc = await nats.connect(hub.url)
            try:
                store = await nc.jetstream().object_store(CHECKPOINT_BUCKET)
                manifest = await read_manifest(store)
                assert manifest is not None
                return manifest.site_seqs
            finally:
                await nc.close()

        site_seqs = asyncio.run(committed_site_seqs())
    finally:
        hub.stop()
        site.stop()

    assert result.totals["dead_letter:lost_at_site"] == 1
    assert result.totals["events_in"] == len(messages) - 5
    assert site_seqs == {site_stream_name(plant): len(messages)}
    with duckdb.connect(str(tmp_path / "hub.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT stream_seq, detail, data FROM dead_letters "
            "WHERE reason = 'lost_at_site'"
        ).fetchall()
    [(stream_seq, detail, data)] = rows
    assert stream_seq == 20
    assert f"SITE_{plant} lost sequences 20 to 24 (5 messages)" in detail
    assert "site-init --max-age-s" in detail
    assert data == b""
    parser = argparse.ArgumentParser()
    reconcile.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reconcile", "--db", str(tmp_path / "hub.duckdb")])
    # The postings agree, but the exit code still reports the loss to a script.
    assert args.handler(args) == 3
    output = capsys.readouterr().out
    assert "WARNING: 1 of them report messages a plant site dropped" in output
    assert "but a plant site lost messages before the hub copied them" in output


async def _publish_at_site(
    url: str, plant: str, messages: list[GeneratedMessage], drop: Iterable[int] = ()
) -> int:
    """Create the site stream, publish `messages` to it, then delete the sequences in
    `drop`; return how many messages it stored."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_site_stream(js, plant)
        stored, _ = await publish_all(nc, ((m.subject, m.data, None) for m in messages))
        for seq in drop:
            await js.delete_msg(site_stream_name(plant), seq)
        return stored
    finally:
        await nc.close()


async def _wait_for_link(nc: nats.NATS, plant: str) -> None:
    """Wait until the hub connection `nc` reaches the site's stream, for 100 tries.

    Sources created before the leaf connection is up start only on JetStream's retry
    schedule (about 40 s seen here), so the tests create them after the link is up.
    """
    site_api = nc.jetstream(domain=site_domain(plant))
    for _ in range(100):
        try:
            await site_api.stream_info(site_stream_name(plant))
            return
        except (nats.errors.Error, nats.js.errors.Error):
            await asyncio.sleep(0.1)


async def _source_sites(
    hub_url: str, plant: str, settings: PipelineSettings, expected: int
) -> int:
    """Create the hub's streams once the site's link is up, and wait until
    PLANT_EVENTS has `expected` messages; return its message count."""
    nc = await nats.connect(hub_url)
    try:
        await _wait_for_link(nc, plant)
        js = nc.jetstream()
        await ensure_streams(js, settings)
        for _ in range(200):
            info = await js.stream_info(EVENTS_STREAM)
            if info.state.messages >= expected:
                break
            await asyncio.sleep(0.1)
        return info.state.messages
    finally:
        await nc.close()


def _write_certificates(folder: Path) -> dict[str, str]:
    """Write a CA, a hub certificate for 127.0.0.1 and a site certificate, all signed
    by the CA, and return their PEM paths by name."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    paths: dict[str, str] = {}

    def save(name: str, data: bytes) -> None:
        path = folder / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("plantstream test CA"))
        .issuer_name(name("plantstream test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    save("ca", ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (
        ("hub", ExtendedKeyUsageOID.SERVER_AUTH),
        ("site", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name(f"{role}.plantstream.test"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        save(role, certificate.public_bytes(serialization.Encoding.PEM))
        save(f"{role}-key", key_pem(key))
    return paths


def test_tls_configs_reject_incomplete_files(tmp_path: Path) -> None:
    pem = tmp_path / "hub.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nnot parsed here\n")
    with pytest.raises(ValueError, match="without its key file"):
        hub_server_config(
            store_dir="/js", listen="x", leaf_listen="y", tls=LeafTls(cert=str(pem))
        )
    with pytest.raises(ValueError, match="needs its own certificate"):
        hub_server_config(
            store_dir="/js", listen="x", leaf_listen="y", tls=LeafTls(ca=str(pem))
        )
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=f"TLS ca file {missing} of the site"):
        site_server_config(
            "P01",
            store_dir="/js",
            listen="x",
            hub_leaf_url="tls://hub:7422",
            tls=LeafTls(ca=str(missing)),
        )
    site = site_server_config(
        "P01",
        store_dir="/js",
        listen="x",
        hub_leaf_url="tls://hub:7422",
        tls=LeafTls(ca=str(pem)),
    )
    assert f'tls {{ ca_file: "{pem.resolve()}" }}' in site
    assert "verify" not in site


def test_tls_key_given_as_cert_rejected(tmp_path: Path) -> None:
    certificates = _write_certificates(tmp_path)
    swapped = LeafTls(certificates["hub-key"], certificates["hub"], certificates["ca"])
    with pytest.raises(
        ValueError, match="TLS cert file .* contains no PEM certificate"
    ):
        hub_server_config(store_dir="/js", listen="x", leaf_listen="y", tls=swapped)


def test_tls_key_of_another_certificate_rejected(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    certificates = _write_certificates(tmp_path)
    rsa_key = tmp_path / "rsa-key.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # Another EC key, and a key of another type than the certificate's.
    for key in (certificates["site-key"], str(rsa_key)):
        mismatched = LeafTls(certificates["hub"], key)
        with pytest.raises(ValueError, match="is not the private key of certificate"):
            hub_server_config(
                store_dir="/js", listen="x", leaf_listen="y", tls=mismatched
            )


def test_tls_encrypted_key_rejected(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    certificates = _write_certificates(tmp_path)
    key = serialization.load_pem_private_key(
        Path(certificates["site-key"]).read_bytes(), password=None
    )
    encrypted = tmp_path / "site-key-encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ValueError, match="is encrypted, and nats-server reads"):
        site_server_config(
            "P01",
            store_dir="/js",
            listen="x",
            hub_leaf_url="tls://hub:7422",
            tls=LeafTls(certificates["site"], str(encrypted), certificates["ca"]),
        )


def _site_seen_from_hub(
    tmp_path: Path, certificates: dict[str, str], site_tls: LeafTls
) -> bool:
    """Start a hub that verifies sites and a site with `site_tls`; return whether the
    hub reaches the site's JetStream over the leaf connection."""
    plant = "P01"
    leaf_port = free_port()
    hub_tls = LeafTls(certificates["hub"], certificates["hub-key"], certificates["ca"])
    hub = _hub(tmp_path, leaf_port, hub_tls).start()
    site = _site(tmp_path, plant, f"tls://127.0.0.1:{leaf_port}", site_tls).start()

    async def look() -> bool:
        local = await nats.connect(site.url)
        try:
            await ensure_site_stream(local.jetstream(), plant)
        finally:
            await local.close()
        nc = await nats.connect(hub.url)
        try:
            site_api = nc.jetstream(domain=site_domain(plant), timeout=0.5)
            # On loopback the link came up within a second in these tests; six
            # seconds leave room for a loaded machine.
            for _ in range(12):
                try:
                    await site_api.stream_info(site_stream_name(plant))
                    return True
                except (nats.errors.Error, nats.js.errors.Error):
                    await asyncio.sleep(0.5)
            return False
        finally:
            await nc.close()

    try:
        return asyncio.run(look())
    finally:
        site.stop()
        hub.stop()


def test_tls_leaf_connection_with_site_certificate(tmp_path: Path) -> None:
    certificates = _write_certificates(tmp_path)
    site_tls = LeafTls(
        certificates["site"], certificates["site-key"], certificates["ca"]
    )
    assert _site_seen_from_hub(tmp_path, certificates, site_tls)


def test_tls_hub_rejects_site_without_certificate(tmp_path: Path) -> None:
    certificates = _write_certificates(tmp_path)
    assert not _site_seen_from_hub(
        tmp_path, certificates, LeafTls(ca=certificates["ca"])
    )


def test_start_without_sites_keeps_sources(
    nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.streams")

    async def sources_after_each_step() -> list[list[str]]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            steps = []
            for settings in (PipelineSettings(sites="P01,P02"), PipelineSettings()):
                await ensure_streams(js, settings)
                info = await js.stream_info(EVENTS_STREAM)
                steps.append(sorted(str(s.name) for s in info.config.sources or []))
            await remove_site_source(js, "P01")
            info = await js.stream_info(EVENTS_STREAM)
            steps.append(sorted(str(s.name) for s in info.config.sources or []))
            with pytest.raises(ValueError, match="does not copy SITE_P01"):
                await remove_site_source(js, "P01")
            # A hub URL given to site-init by mistake.
            with pytest.raises(ValueError, match="looks like the hub"):
                await ensure_site_stream(js, "P01")
            return steps
        finally:
            await nc.close()

    steps = asyncio.run(sources_after_each_step())

    assert steps == [["SITE_P01", "SITE_P02"], ["SITE_P01", "SITE_P02"], ["SITE_P02"]]
    assert "PLANT_EVENTS now copies SITE_P01, SITE_P02" in caplog.text
    assert caplog.text.count("keeps copying SITE_P01, SITE_P02") == 1


def test_site_init_refuses_to_cut_retention(nats_server: EmbeddedNatsServer) -> None:
    async def shorten() -> float | None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await ensure_site_stream(js, "P01", 3600)
            await js.publish("plant.events.P01.x", b"{}")
            # Longer is always allowed.
            await ensure_site_stream(js, "P01", 7200)
            with pytest.raises(
                RetentionCutError, match="stores 1 message, kept 7200 s"
            ):
                await ensure_site_stream(js, "P01", 60)
            await ensure_site_stream(js, "P01", 60, allow_shorter=True)
            # A site URL given to site-remove by mistake.
            with pytest.raises(ValueError, match="it is not the hub"):
                await remove_site_source(js, "P01")
            return (await js.stream_info(site_stream_name("P01"))).config.max_age
        finally:
            await nc.close()

    assert asyncio.run(shorten()) == 60


def test_hub_publish_of_site_plant_stored_once(tmp_path: Path) -> None:
    # A dead letter retried at the hub, for a plant that runs as a site.
    plant = "P01"
    leaf_port = free_port()
    hub = _hub(tmp_path, leaf_port).start()
    site = _site(tmp_path, plant, f"nats-leaf://127.0.0.1:{leaf_port}").start()

    async def publish_at_hub() -> tuple[int, int]:
        local = await nats.connect(site.url)
        nc = await nats.connect(hub.url)
        try:
            await ensure_site_stream(local.jetstream(), plant)
            await _wait_for_link(nc, plant)
            js = nc.jetstream()
            await ensure_streams(js, PipelineSettings(sites=plant))
            await js.publish(f"plant.events.{plant}.x", b"{}")
            # Long enough for a forwarded copy to reach the site stream.
            await asyncio.sleep(1.0)
            at_site = await local.jetstream().stream_info(site_stream_name(plant))
            at_hub = await js.stream_info(EVENTS_STREAM)
            return at_site.state.messages, at_hub.state.messages
        finally:
            await nc.close()
            await local.close()

    try:
        at_site, at_hub = asyncio.run(publish_at_hub())
    finally:
        site.stop()
        hub.stop()

    assert (at_site, at_hub) == (0, 1)
