"""nats-server configs for a hub and for plant sites that run as its leaf nodes.

Each site runs its own nats-server with JetStream in a domain of its own
(`site-<plant>`), connected to the hub's nats-server as a leaf node. Plant systems
publish to the site server, whose stream `SITE_<plant>` stores the plant's events
whether or not the hub is reachable (`pipeline.site_streams`). On the hub, PLANT_EVENTS
sources every site stream, so JetStream copies the backlog over when the link comes
back, in order and without duplicates.

The site config denies `plant.events.>` over the leaf connection both ways. Without
that, a live publish at the site would reach the hub twice, once forwarded and once
sourced. And a publish at the hub, such as `plantstream dlq retry`, would be stored
at the hub and forwarded into the site stream, from where the hub copies it again.

The hub's leaf listener does not advertise its addresses to the sites, so a site
connects only to the URL its config names, such as a relay or a NAT address, and a
link cut there stays cut.

The leaf connection usually crosses a network the plant does not control, so both
configs can secure it with TLS (`LeafTls`). With a CA on the hub, the hub accepts only
sites that present a certificate signed by it, which is then the sites' credential.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NamedTuple

from pipeline.site_streams import site_domain
from pipeline.subjects import EVENTS_PREFIX

__all__ = ["HUB_DOMAIN", "LeafTls", "hub_server_config", "site_server_config"]

HUB_DOMAIN = "hub"


_PEM_CONTENTS = {
    "cert": (b"-----BEGIN CERTIFICATE-----", "certificate"),
    "key": (b"PRIVATE KEY-----", "private key"),
    "ca": (b"-----BEGIN CERTIFICATE-----", "CA certificate"),
}
"""The text each TLS file must contain, and what it is, by LeafTls field."""


class LeafTls(NamedTuple):
    """PEM files that secure the leaf connection between the hub and a site.

    On the hub, `cert` and `key` are the hub's own and are required; `ca`, when given,
    makes the hub verify each site's certificate against it. At a site, `ca` verifies
    the hub's certificate (the system's roots when None), and `cert` and `key` are the
    site's certificate for a hub that verifies its sites.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def checked(self, side: str) -> LeafTls:
        """Return the files as absolute paths, or raise ValueError naming the file
        that is missing or the option left out.

        `side` is "hub" or "site". The paths go into the config as given here, so the
        config is meant to be written on the host that runs the server.
        """
        if (self.cert is None) != (self.key is None):
            present, missing = ("cert", "key") if self.key is None else ("key", "cert")
            raise ValueError(
                f"the {side}'s TLS {present} file is given without its {missing} file; "
                f"pass both --tls-cert and --tls-key"
            )
        if side == "hub" and self.cert is None:
            raise ValueError(
                "the hub's leaf listener needs its own certificate for TLS; pass "
                "--tls-cert and --tls-key (and --tls-ca to verify the sites)"
            )
        files = {}
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if value is None:
                continue
            path = Path(value).expanduser()
            if path.is_dir():
                raise ValueError(
                    f"TLS {name} file {value} of the {side} is a folder; pass the PEM "
                    "file itself"
                )
            if not path.is_file():
                raise ValueError(
                    f"TLS {name} file {value} of the {side} does not exist; write the "
                    "config on the host that runs the server, where its PEM files are"
                )
            # A swapped cert and key, or a signing request, would fail only when
            # nats-server starts at the site.
            marker, kind = _PEM_CONTENTS[name]
            if marker not in path.read_bytes():
                raise ValueError(
                    f"TLS {name} file {value} of the {side} contains no PEM {kind}; "
                    f"pass the {kind} in PEM form"
                )
            files[name] = str(path.resolve())
        if "cert" in files:
            _check_key_pair(files["cert"], files["key"], side)
        return LeafTls(**files)

    def block(self, *, verify: bool) -> str:
        """Return the nats-server `tls` block with these files."""
        fields = [
            f"{key}: {_quote(value)}"
            for key, value in (
                ("cert_file", self.cert),
                ("key_file", self.key),
                ("ca_file", self.ca),
            )
            if value is not None
        ]
        if verify:
            fields.append("verify: true")
        return f"tls {{ {', '.join(fields)} }}"


class _EncryptedKey(Exception):
    """Raised by `_no_password`: the private key is encrypted."""


def _no_password() -> str:
    raise _EncryptedKey


def _check_key_pair(cert: str, key: str, side: str) -> None:
    """Raise ValueError unless `key` is the unencrypted private key of `cert`.

    nats-server reports either problem only when it starts, which for a site config is
    on a plant's host. Python's ssl module finds both problems when it loads the pair.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ValueError(
            f"TLS key file {key} of the {side} is encrypted, and nats-server reads "
            "only unencrypted keys; write it out without a passphrase, for example "
            f"with: openssl pkey -in {key} -out key.pem"
        ) from None
    except ssl.SSLError as error:
        # OpenSSL reports a key of another type than the certificate's (RSA for an EC
        # certificate) as NO_CERTIFICATE_ASSIGNED.
        if error.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            raise ValueError(
                f"TLS key file {key} of the {side} is not the private key of "
                f"certificate {cert}; pass the key the certificate was issued for"
            ) from None
        raise ValueError(
            f"TLS cert file {cert} and key file {key} of the {side} cannot be loaded "
            f"as a certificate and its key ({error}); check that both are PEM files "
            "written by your CA tooling"
        ) from None


def _quote(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ValueError(
            f"{value!r} cannot appear in a nats-server config: it has a quote"
        )
    return f'"{value}"'


def hub_server_config(
    *, store_dir: str, listen: str, leaf_listen: str, tls: LeafTls | None = None
) -> str:
    """Return the nats-server config of the hub: JetStream plus a leaf node listener,
    over TLS with `tls`."""
    settings = [f"listen: {_quote(leaf_listen)}", "no_advertise: true"]
    if tls is not None:
        settings.append(tls.checked("hub").block(verify=tls.ca is not None))
    leafnodes = "leafnodes {\n" + "".join(f"  {line}\n" for line in settings) + "}\n"
    return (
        f"listen: {_quote(listen)}\n"
        f"jetstream {{ store_dir: {_quote(store_dir)}, domain: {HUB_DOMAIN} }}\n"
        + leafnodes
    )


def site_server_config(
    plant: str,
    *,
    store_dir: str,
    listen: str,
    hub_leaf_url: str,
    tls: LeafTls | None = None,
) -> str:
    """Return the nats-server config of a plant site's leaf node, connecting to the
    hub over TLS with `tls`."""
    remote = [
        f"url: {_quote(hub_leaf_url)}",
        f"deny_exports: [{_quote(EVENTS_PREFIX + '.>')}]",
        f"deny_imports: [{_quote(EVENTS_PREFIX + '.>')}]",
    ]
    if tls is not None:
        remote.append(tls.checked("site").block(verify=False))
    lines = "".join(f"      {line}\n" for line in remote)
    return (
        f"listen: {_quote(listen)}\n"
        f"jetstream {{ store_dir: {_quote(store_dir)}, "
        f"domain: {_quote(site_domain(plant))} }}\n"
        "leafnodes {\n"
        "  remotes: [\n"
        "    {\n"
        f"{lines}"
        "    }\n"
        "  ]\n"
        "}\n"
    )
