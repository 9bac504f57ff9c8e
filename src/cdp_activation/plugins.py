"""Connector plugins: everything the project needs to know about a provider, declared once.

A connector module exports one `ConnectorPlugin`, registered as an entry point of the group
`cdp_activation.connectors` in its package's metadata (`pyproject.toml`):

    [project.entry-points."cdp_activation.connectors"]
    meta_whatsapp = "cdp_activation.connectors.meta_whatsapp:PLUGIN"

so another package adds a connector by installing itself, without touching this one. From the
plugins the project derives its deployment settings (`settings.Settings`: field `x` of a plugin
with prefix `meta` is the variable `CDP_META_X`), the Dagster resources (`resources.py`), the
status webhook routes (`webhooks/app.py`), and the connector tables of the docs
(`cdp-activation connectors`).

This module imports nothing of the connectors themselves (entry points are loaded by name), so
the settings, the receiver and the ledger can read the registry without depending on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, cached_property
from importlib.metadata import entry_points
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cdp_activation.contracts import InboundMessage, StatusEvent, TemplateState
from cdp_activation.errors import ConnectorConfigError, SettingsError

ENTRY_POINT_GROUP = "cdp_activation.connectors"

# Numbers that only make sense above zero (a rate, a size): refused when settings are read.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveCount = Annotated[int, Field(gt=0)]


def credential(
    sandbox: str | None = None, *, env: str | None = None, receiver: bool = False
) -> Any:
    """A secret field of a connector's settings (a `SecretStr | None`). Unset, it is an error
    naming its variable, except in sandbox mode (CDP_SANDBOX=1), where `sandbox`, the local
    sandbox's published value, is used. `receiver`: only the status webhook receiver needs it
    (a signing secret), so it is not part of the connector's Dagster resource."""
    extra: dict[str, Any] = {"secret": True, "receiver": receiver}
    if sandbox is not None:
        extra["sandbox"] = sandbox
    if env is not None:
        extra["env"] = env
    return Field(default=None, json_schema_extra=extra)


def setting(default: Any, *, env: str | None = None, doc: str = "") -> Any:
    """A plain field whose variable is not `CDP_<prefix>_<FIELD>` (e.g. CDP_TWILIO_FROM for the
    field `from_number`), or that wants a description in the docs' table."""
    extra: dict[str, Any] = {}
    if env is not None:
        extra["env"] = env
    return Field(default=default, description=doc or None, json_schema_extra=extra or None)


class ConnectorSettings(BaseModel):
    """A connector's deployment settings (subclass it in the connector's module).

    Every connector has `rate_per_second` (None: its own default). Secret fields are declared
    with `credential()`; `build` turns the settings into a ready connector.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_second: Positive | None = None

    def build(self, credentials: Credentials) -> Any:
        """The connector these settings describe (`credentials.get(field)` for a secret)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Credentials:
    """The secrets of one connector's settings as the connector gets them: the configured
    value, else the sandbox's published one in sandbox mode, else a one-line error naming the
    variable to set."""

    plugin: ConnectorPlugin
    settings: ConnectorSettings
    sandbox: bool

    def get(self, name: str) -> str:
        value = getattr(self.settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value:
            return str(value)
        fallback = self.plugin.sandbox_value(name)
        if self.sandbox and fallback is not None:
            return fallback
        variable = self.plugin.env_name(name)
        where = self.plugin.base_url(self.settings)
        raise ConnectorConfigError(
            f"{variable} is not set (the connector points at {where}). Set {variable} in the "
            "environment or .env to the provider's credential, or CDP_SANDBOX=1 to use the "
            "local sandbox's published one."
        )

    def optional(self, name: str) -> str | None:
        """The secret, or None when it is unset (and not given by the sandbox)."""
        try:
            return self.get(name)
        except ConnectorConfigError:
            return None


@dataclass(frozen=True)
class WebhookRequest:
    """What a status webhook's check and parser see of a request. `url` and `query` are
    worked out on first use (only some signature schemes read them: Twilio's): building them
    for every webhook cost more than checking a Meta signature."""

    body: bytes
    headers: Mapping[str, str]  # looked up by lower-case name
    received: datetime
    # The URL the provider called (behind a proxy: the public one), query included.
    called_url: Callable[[], str]
    query_params: Callable[[], Mapping[str, str]] = dict

    @cached_property
    def url(self) -> str:
        return self.called_url()

    @cached_property
    def query(self) -> Mapping[str, str]:
        return self.query_params()


@dataclass(frozen=True)
class StatusWebhook:
    """A provider's status webhooks: `POST /webhooks/<route>`, checked with the secret in the
    settings field `secret` before anything is parsed, then read into status reports."""

    route: str
    secret: str
    verify: Callable[[str, WebhookRequest], bool]
    parse: Callable[[WebhookRequest], list[StatusEvent]]
    # Template status changes the same webhook may carry (Meta's
    # `message_template_status_update`).
    template_updates: Callable[[WebhookRequest], list[TemplateState]] | None = None
    # The settings field of the token a `GET /webhooks/<route>` subscription check must name
    # (Meta's `hub.verify_token`); None: no such check.
    subscribe_token: str | None = None
    checked_with: str = ""  # for the docs: the provider's signature scheme, in a few words
    # The customers' own messages the same route carries (replies, button taps, STOP).
    inbound: Callable[[WebhookRequest], list[InboundMessage]] | None = None


@dataclass(frozen=True)
class ContractCase:
    """What the connector contract suite (tests/test_connector_contract.py) needs to exercise
    a connector against the sandbox: a message of its channel, a recipient its provider
    refuses and the code it answers with, the settings field holding its credential, and the
    forms in which that credential could leak."""

    message: Callable[[int], Any]  # i -> OutboundMessage
    bad_recipient: Any  # OutboundMessage
    failure_code: str
    credential: str
    secret_forms: Callable[[str], tuple[str, ...]] = field(default=lambda secret: (secret,))
    # The wait a throttled request is retried after when the provider sends no Retry-After
    # but a fixed rule (WeChat's minute quota: 60 s); None: the answer's Retry-After.
    throttle_retry_after: float | None = None


@dataclass(frozen=True)
class ConnectorPlugin:
    """One provider's connector, as the registry knows it."""

    name: str  # what an activation's channel plan names (`connector: meta_whatsapp`)
    title: str  # for people: "Meta WhatsApp Cloud API"
    connector: type  # the `Connector` class
    settings: type[ConnectorSettings]
    env_prefix: str  # "meta": its settings are CDP_META_*
    status_webhook: StatusWebhook | None = None
    sandbox: str = ""  # the path under the local sandbox that emulates it ("/meta")
    contract: ContractCase | None = None
    docs: str = ""  # one line for the docs' table: what it sends, and through which API

    def env_name(self, name: str) -> str:
        """The environment variable of a settings field."""
        extra = _extra(self.settings, name)
        return str(extra.get("env") or f"CDP_{self.env_prefix}_{name}".upper())

    def flat_name(self, name: str) -> str:
        """The field's name in the flat `Settings` (its variable without `CDP_`)."""
        return self.env_name(name).removeprefix("CDP_").lower()

    def sandbox_value(self, name: str) -> str | None:
        value = _extra(self.settings, name).get("sandbox")
        return None if value is None else str(value)

    def is_secret(self, name: str) -> bool:
        return bool(_extra(self.settings, name).get("secret"))

    def for_receiver_only(self, name: str) -> bool:
        return bool(_extra(self.settings, name).get("receiver"))

    def base_url(self, settings: ConnectorSettings) -> str:
        """Where the connector points (for messages): its `base_url` or `url` setting."""
        return str(getattr(settings, "base_url", None) or getattr(settings, "url", "") or "?")

    def build(self, settings: ConnectorSettings, sandbox: bool) -> Any:
        """A ready connector, with the settings' rate (None: the connector's default)."""
        connector = settings.build(Credentials(self, settings, sandbox))
        connector.rate_per_second = settings.rate_per_second
        return connector

    @property
    def capabilities(self) -> Any:
        """The connector class's `Capabilities` (channels, batch size, codes it declares)."""
        return getattr(self.connector, "capabilities")  # noqa: B009  # a class attribute

    @property
    def has_catalog(self) -> bool:
        """Whether its templates can be listed (a `templates/<connector>` asset)."""
        return hasattr(self.connector, "fetch_templates")


def _extra(settings: type[BaseModel], name: str) -> dict[str, Any]:
    info = settings.model_fields[name]
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


class PluginError(SettingsError):
    """A connector plugin that cannot be loaded or clashes with another: one line naming it."""


@cache
def plugins() -> Mapping[str, ConnectorPlugin]:
    """Every installed connector plugin by name, loaded once per process from the entry points
    of `ENTRY_POINT_GROUP`. Two plugins claiming one name, or one route, or one variable
    prefix, are refused: nothing would say which one a send goes through."""
    found: dict[str, ConnectorPlugin] = {}
    origin: dict[str, str] = {}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugin = entry.load()
        except Exception as err:
            raise PluginError(
                f"connector plugin {entry.name!r} ({entry.value}) cannot be loaded: "
                f"{type(err).__name__}: {err}"
            ) from err
        if not isinstance(plugin, ConnectorPlugin):
            raise PluginError(
                f"connector plugin {entry.name!r} ({entry.value}) is a {type(plugin).__name__}, "
                "not a cdp_activation.plugins.ConnectorPlugin"
            )
        if plugin.name != entry.name:
            raise PluginError(
                f"connector plugin {entry.value} calls itself {plugin.name!r} but is "
                f"registered as {entry.name!r}: the two must be the same"
            )
        if plugin.name in found:
            raise PluginError(
                f"connector name {plugin.name!r} is registered twice: {origin[plugin.name]} "
                f"and {entry.value}"
            )
        _check_unique(plugin, found.values())
        found[plugin.name] = plugin
        origin[plugin.name] = entry.value
    if not found:
        raise PluginError(
            f"no connector plugin is installed (entry points {ENTRY_POINT_GROUP!r}): install "
            "the project (`make install`, or `pip install -e .`) so its metadata is present"
        )
    return dict(found)


def _check_unique(plugin: ConnectorPlugin, others: Any) -> None:
    for other in others:
        if other.env_prefix == plugin.env_prefix:
            raise PluginError(
                f"connectors {other.name!r} and {plugin.name!r} both read CDP_"
                f"{plugin.env_prefix.upper()}_*: each needs its own prefix"
            )
        hooks = (other.status_webhook, plugin.status_webhook)
        if hooks[0] and hooks[1] and hooks[0].route == hooks[1].route:
            raise PluginError(
                f"connectors {other.name!r} and {plugin.name!r} both take status webhooks at "
                f"/webhooks/{plugin.status_webhook.route if plugin.status_webhook else ''}"
            )


def plugin(name: str) -> ConnectorPlugin:
    """The plugin named `name`; `ValueError` listing the known names otherwise."""
    known = plugins()
    try:
        return known[name]
    except KeyError:
        raise ValueError(
            f"unknown connector {name!r}; known connectors: {', '.join(sorted(known))}"
        ) from None


def status_routes() -> dict[str, ConnectorPlugin]:
    """Status webhook route -> the plugin whose sends its reports may update."""
    return {p.status_webhook.route: p for p in plugins().values() if p.status_webhook}


@dataclass(frozen=True)
class WebhookSecrets:
    """What the status webhook receiver checks each route's requests with (route -> secret;
    None or absent: that route's webhooks are refused, never accepted unchecked), the tokens
    of subscription checks (Meta's `hub.verify_token`), and the public base URL providers call
    (behind a proxy the request's own URL differs; Twilio signs the URL it called)."""

    by_route: Mapping[str, str | None] = field(default_factory=dict)
    subscribe_tokens: Mapping[str, str | None] = field(default_factory=dict)
    public_url: str | None = None

    def __repr__(self) -> str:  # never print a secret
        configured = sorted(route for route, secret in self.by_route.items() if secret)
        return f"WebhookSecrets(configured={configured}, public_url={self.public_url!r})"

    def secret_for(self, route: str) -> str | None:
        return self.by_route.get(route)

    def subscribe_token(self, route: str) -> str | None:
        return self.subscribe_tokens.get(route)


def connector_of(provider: str) -> str:
    """The connector whose sends a provider's report may update: the plugin whose status
    webhook route it came in by (`plugins.status_routes`: "meta" -> meta_whatsapp, "sandbox"
    -> webhook), or a connector named directly (a warehouse status source)."""
    found = status_routes().get(provider)
    return found.name if found is not None else provider
