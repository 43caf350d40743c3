"""The topology: storage nodes in clouds and regions, and the latency/egress table between them.

A topology is loaded from YAML (the format is documented in ``docs/topology.md`` and shown
by ``skyferry/default_topology.yaml``). ``{home}`` in a URL expands to the data directory.

Example::

    version: 1
    source_cloud: aws
    nodes:
      - {name: aws-node-1, cloud: aws, region: us-east-1, url: "s3://bucket/prefix"}
    links:
      - {from: aws, to: gcp, latency_ms: 35, egress_usd_per_gb: 0.09}
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from datetime import date
from functools import cache
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from skyferry.config import Settings, describe_validation_error, get_settings
from skyferry.errors import NodeUnavailableError, TopologyError
from skyferry.secrets import register_options, scrub
from skyferry.storage import Store

__all__ = [
    "KNOWN_CLOUDS",
    "CREDENTIALS_GROUP",
    "CredentialResolver",
    "Link",
    "LinkCost",
    "NegotiatedEgress",
    "Node",
    "Prices",
    "Topology",
    "credential_resolver",
    "load_topology",
    "location_of",
    "protocol_of",
    "with_timeouts",
]

def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def with_timeouts(protocol: str, options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Bound every backend call so that a hung server is detected, not waited on forever."""
    out = dict(options)
    if protocol in ("s3", "s3a"):
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", timeout_s)
        config.setdefault("read_timeout", timeout_s)
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        out["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        out.setdefault("timeout", timeout_s)
        out.setdefault("retries", 2)
    elif protocol in ("az", "abfs", "abfss"):
        out.setdefault("timeout", int(timeout_s))
        out.setdefault("connection_timeout", int(timeout_s))
        out.setdefault("read_timeout", int(timeout_s))
    return out


# Resolves a node's ``credentials`` reference ("aws-credentials/prod") into fsspec storage
# options. The domain knows no credentials store: a resolver is installed as an entry point
# of the group ``skyferry.credentials``; skyferry's own (blocks/credentials.py) reads saved
# Prefect blocks. It is found when a node first names credentials, in any process.
CredentialResolver = Callable[[str, str], dict[str, Any]]
CREDENTIALS_GROUP = "skyferry.credentials"


@cache
def credential_resolver() -> CredentialResolver:
    """The one resolver installed under :data:`CREDENTIALS_GROUP`."""
    found = list(entry_points(group=CREDENTIALS_GROUP))
    if len(found) != 1:
        names = ", ".join(sorted(e.value for e in found)) or "none"
        raise TopologyError(f"nodes name credentials, and {len(found)} resolvers are "
                            f"installed as {CREDENTIALS_GROUP} entry points ({names}): "
                            "install skyferry (pip install -e .) so that exactly one is",
                            source=CREDENTIALS_GROUP)
    resolver: CredentialResolver = found[0].load()
    return resolver


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Clouds a source URL implies (s3:// is aws, and so on); a topology may name others for its
# nodes, but every cloud it refers to must be one of these or one of its nodes' clouds.
KNOWN_CLOUDS = frozenset({"aws", "gcp", "azure"})
_PROTOCOL_FAMILY = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az",
                    "local": "file"}
_ENDPOINT_OPTIONS = ("endpoint_url", "account_name", "account_url", "project")


def location_of(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Where a node's objects live, normalised so that two spellings of one place compare equal.

    >>> location_of("file:///data/n1/") == location_of("/data/./n1")
    True
    >>> location_of("s3a://bucket//p") == location_of("s3://bucket/p/")
    True

    The endpoint (an S3 ``endpoint_url``, an Azure account or connection string's endpoint)
    is part of the place: one bucket name on two servers is two places. No secret is kept.
    """
    options = storage_options or {}
    protocol = _PROTOCOL_FAMILY.get(protocol_of(url), protocol_of(url))
    path = url.split("://", 1)[1] if "://" in url else url
    if protocol == "file":
        path = posixpath.abspath(posixpath.expanduser(path))
    else:
        path = posixpath.normpath("/" + path).lstrip("/")
    endpoint = ""
    for key in _ENDPOINT_OPTIONS:
        if options.get(key):
            endpoint = str(options[key]).rstrip("/")
            break
    connection = options.get("connection_string")
    if not endpoint and isinstance(connection, str):
        fields = dict(p.split("=", 1) for p in connection.split(";") if "=" in p)
        endpoint = fields.get("BlobEndpoint", "") or fields.get("AccountName", "")
    return protocol, endpoint.rstrip("/"), path.rstrip("/") or "/"


class Node(BaseModel):
    """A storage location in a cloud and region, and the work pool that computes near it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=_NAME_PATTERN, description="Unique node name.")
    cloud: str = Field(..., pattern=_NAME_PATTERN, description="aws, gcp, azure, ...")
    region: str = Field(..., description="Region within the cloud.")
    url: str = Field(..., description="fsspec URL or local folder of the node's root.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options (never logged)."
    )
    credentials: str | None = Field(
        default=None,
        description="A saved credentials block, '<block-type-slug>/<name>', e.g. "
        "'aws-credentials/prod'. Its options are merged over storage_options.",
    )
    timeout_s: float = Field(
        default=5.0, gt=0,
        description="Backend call timeout; a write gets this plus 1 s per 4 MB before its "
        "node is marked down.")
    max_writes: int | None = Field(
        default=None, ge=1,
        description="Replica writes to this node at once; unset, as many as there are chunks "
        "in flight. Set it for an endpoint that does not go faster with more uploads at once.")
    work_pool: str | None = Field(default=None, description="Work pool that computes near it.")
    storage_usd_per_gb_month: float = Field(
        default=0.0, ge=0, description="What a GB kept here costs a month (gc --dry-run "
        "prices what it would free with it); 0: not priced.")
    enabled: bool = Field(default=True, description="false marks the node down.")
    # the settings' durable_writes, set by Topology.bind (not part of the node's definition)
    _durable: bool = PrivateAttr(default=True)

    @property
    def durable_writes(self) -> bool:
        """Whether the node's local writes reach the disk before they count."""
        return self._durable

    def open_store(self, *, own_session: bool = False) -> Store:
        """The node's store. A backend that refuses its options (a malformed connection
        string, a token it cannot read) is a :class:`NodeUnavailableError` naming the node,
        with every secret of the options scrubbed from the message. ``own_session``: a
        filesystem instance of its own (fsspec shares one per set of options), so its calls
        never queue behind data transfers on the shared one's connections."""
        protocol = protocol_of(self.url)
        options = dict(self.storage_options)
        register_options(options)
        if self.credentials:
            options.update(credential_resolver()(self.credentials, self.name))
            register_options(options)
        options = with_timeouts(protocol, options, self.timeout_s)
        if own_session and protocol != "file":
            options["skip_instance_cache"] = True
        try:
            return Store(self.url, options, name=self.name, timeout_s=self.timeout_s,
                         durable=self._durable)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise NodeUnavailableError(
                scrub(f"cannot set up node {self.name} ({self.url}): "
                      f"{type(exc).__name__}: {first}"), node=self.name) from None

    def public_dict(self) -> dict[str, Any]:
        """The node without its credentials, safe to log or put in an artifact."""
        return self.model_dump(exclude={"storage_options"})

    def __repr__(self) -> str:  # never print storage options: they may hold secrets
        return (f"Node(name={self.name!r}, cloud={self.cloud!r}, region={self.region!r}, "
                f"url={self.url!r})")

    __str__ = __repr__


class LinkCost(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(..., ge=0)
    egress_usd_per_gb: float = Field(..., ge=0)


class Link(LinkCost):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    src: str = Field(..., alias="from")
    dst: str = Field(..., alias="to")


class NegotiatedEgress(BaseModel):
    """An egress rate that replaces a link's list price (a negotiated or committed rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    src: str = Field(..., alias="from")
    dst: str = Field(..., alias="to")
    egress_usd_per_gb: float = Field(..., ge=0)


class Prices(BaseModel):
    """The price table's version and date; the links' ``egress_usd_per_gb`` and the nodes'
    ``storage_usd_per_gb_month`` are its list prices. Request prices per cloud, and
    negotiated egress rates that replace the links' for costing (``skyferry plan``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(default="unversioned", description="Names the table.")
    effective: date | None = Field(default=None, description="When its prices took effect; "
                                   "a plan warns when it is more than 90 days old.")
    put_usd_per_1000: dict[str, float] = Field(
        default_factory=dict, description="Per cloud: writes (PUT, a part of an upload).")
    get_usd_per_1000: dict[str, float] = Field(
        default_factory=dict, description="Per cloud: reads (GET, a ranged read).")
    negotiated: list[NegotiatedEgress] = Field(default_factory=list)


class Encryption(BaseModel):
    """Client-side encryption at rest of every chunk a run stores (skyferry/crypto.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    master_keys: str = Field(..., description="Where the master keys are: file:PATH, env:VARIABLE "
                      "or block:NAME (a Prefect Secret block); never the keys themselves.")


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(default=1)
    source_cloud: str = Field(default="aws", description="Cloud of a local source.")
    source_region: str | None = Field(default=None)
    catalog: str | None = Field(default=None, description="Where manifests are committed.")
    nodes: list[Node] = Field(..., min_length=1)
    intra_cloud: LinkCost = Field(default=LinkCost(latency_ms=20, egress_usd_per_gb=0.02))
    links: list[Link] = Field(default_factory=list)
    balance_within: LinkCost = Field(
        default=LinkCost(latency_ms=10, egress_usd_per_gb=0),
        description="Nodes whose cost from the source is within this much of a cheaper "
        "node's share its tier: placement spreads bytes evenly across a tier")
    prices: Prices = Field(default_factory=Prices)
    encryption: Encryption | None = Field(
        default=None, description="Set: every run encrypts what it stores with these keys.")
    _settings: Settings | None = PrivateAttr(default=None)  # see bind()

    @model_validator(mode="after")
    def _check(self) -> Topology:
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate node names: {', '.join(dupes)}")
        if self.version != 1:
            raise ValueError(f"unsupported topology version {self.version}")
        places: dict[tuple[str, ...], str] = {}
        for node in self.nodes:
            place = location_of(node.url, node.storage_options)
            if place in places:
                raise ValueError(
                    f"nodes {places[place]} and {node.name} store in the same place "
                    f"({node.url}): their replicas would be one copy")
            places[place] = node.name
        known = KNOWN_CLOUDS | {n.cloud for n in self.nodes}
        named = [("source_cloud", self.source_cloud)]
        named += [(f"links.{i}.from", link.src) for i, link in enumerate(self.links)]
        named += [(f"links.{i}.to", link.dst) for i, link in enumerate(self.links)]
        for i, rate in enumerate(self.prices.negotiated):
            named += [(f"prices.negotiated.{i}.from", rate.src),
                      (f"prices.negotiated.{i}.to", rate.dst)]
        for where, cloud in named:
            if cloud not in known:
                raise ValueError(f"{where}: unknown cloud {cloud!r}; the known clouds are "
                                 f"{', '.join(sorted(known))}")
        return self

    def bind(self, settings: Settings) -> Topology:
        """Use ``settings`` for what the topology's stores need of the process: durable
        writes, the default catalog and the home (:func:`load_topology` binds them)."""
        self._settings = settings
        for node in self.nodes:
            node._durable = settings.durable_writes
        return self

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise TopologyError("the topology has no settings bound (Topology.bind)")
        return self._settings

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise TopologyError(f"no node named {name!r} in the topology")

    @property
    def clouds(self) -> list[str]:
        return sorted({n.cloud for n in self.nodes})

    def pool_for(self, cloud: str) -> str:
        """The work pool that computes for ``cloud``: its nodes' pool, else ``<cloud>-pool``."""
        for node in self.nodes:
            if node.cloud == cloud and node.work_pool:
                return node.work_pool
        return f"{cloud}-pool"

    def cost(self, src_cloud: str, src_region: str | None, node: Node) -> LinkCost:
        """Latency and egress cost of moving data from (cloud, region) to ``node``."""
        return self.link(src_cloud, src_region, node.cloud, node.region)

    def link(self, src_cloud: str, src_region: str | None, dst_cloud: str,
             dst_region: str | None) -> LinkCost:
        """Latency and egress cost of moving data from one (cloud, region) to another; a
        region that is not known counts as the same region."""
        if src_cloud == dst_cloud:
            if src_region is None or dst_region is None or src_region == dst_region:
                return LinkCost(latency_ms=1, egress_usd_per_gb=0)
            return self.intra_cloud
        for link in self.links:
            if link.src == src_cloud and link.dst == dst_cloud:
                return link
        return LinkCost(latency_ms=100, egress_usd_per_gb=0.2)

    def egress_usd_per_gb(self, src_cloud: str, src_region: str | None, dst_cloud: str,
                          dst_region: str | None) -> float:
        """What a GB from one place to the other costs: a negotiated rate, else the link's."""
        if src_cloud != dst_cloud:
            for rate in self.prices.negotiated:
                if (rate.src, rate.dst) == (src_cloud, dst_cloud):
                    return rate.egress_usd_per_gb
        return self.link(src_cloud, src_region, dst_cloud, dst_region).egress_usd_per_gb

    def catalog_store(self) -> Store:
        settings = self.settings
        return Store(self.catalog or settings.catalog_url, name="catalog",
                     durable=settings.durable_writes)


def _expand(value: Any, home: str) -> Any:
    if isinstance(value, str):
        return value.replace("{home}", home)
    if isinstance(value, list):
        return [_expand(v, home) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, home) for k, v in value.items()}
    return value


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it


def load_topology(path: str | Path | None = None, *,
                  settings: Settings | None = None) -> Topology:
    """Load a topology YAML file, or the embedded default when ``path`` is None, bound to
    ``settings`` (default: the process's, from the environment)."""
    settings = settings or get_settings()
    where = str(path) if path else "embedded default topology"
    try:
        if path is None:
            text = resources.files("skyferry").joinpath("default_topology.yaml").read_text()
        else:
            text = Path(path).read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read topology {where}: {exc}", source=where) from exc
    try:
        raw = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise TopologyError(f"topology {where} is not valid YAML: {exc}", source=where) from exc
    if not isinstance(raw, dict):
        raise TopologyError(f"topology {where} must be a mapping with 'nodes'", source=where)
    raw = _expand(raw, str(settings.home))
    try:
        return Topology.model_validate(raw).bind(settings)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise TopologyError(f"invalid topology {where}: {problems}", source=where) from None
