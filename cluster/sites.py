"""nats-server configs for a hub and for plant sites that run as its leaf nodes.

Each site runs its own nats-server with JetStream in a domain of its own
(`site-<plant>`), connected to the hub's nats-server as a leaf node. Plant systems
publish to the site server, whose stream `SITE_<plant>` stores the plant's events
whether or not the hub is reachable (`pipeline.site_streams`). On the hub, PLANT_EVENTS
sources every site stream, so JetStream copies the backlog over when the link comes
back, in order and without duplicates.

The site config denies exporting `plant.events.>` over the leaf connection. Without
that, a live publish would reach the hub twice, once forwarded and once sourced.
"""

from __future__ import annotations

from pipeline.site_streams import site_domain
from pipeline.subjects import EVENTS_PREFIX

__all__ = ["HUB_DOMAIN", "hub_server_config", "site_server_config"]

HUB_DOMAIN = "hub"


def _quote(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ValueError(
            f"{value!r} cannot appear in a nats-server config: it has a quote"
        )
    return f'"{value}"'


def hub_server_config(*, store_dir: str, listen: str, leaf_listen: str) -> str:
    """Return the nats-server config of the hub: JetStream plus a leaf node listener."""
    return (
        f"listen: {_quote(listen)}\n"
        f"jetstream {{ store_dir: {_quote(store_dir)}, domain: {HUB_DOMAIN} }}\n"
        f"leafnodes {{ listen: {_quote(leaf_listen)} }}\n"
    )


def site_server_config(
    plant: str, *, store_dir: str, listen: str, hub_leaf_url: str
) -> str:
    """Return the nats-server config of a plant site's leaf node."""
    return (
        f"listen: {_quote(listen)}\n"
        f"jetstream {{ store_dir: {_quote(store_dir)}, "
        f"domain: {_quote(site_domain(plant))} }}\n"
        "leafnodes {\n"
        "  remotes: [\n"
        f"    {{ url: {_quote(hub_leaf_url)}, "
        f"deny_exports: [{_quote(EVENTS_PREFIX + '.>')}] }}\n"
        "  ]\n"
        "}\n"
    )
