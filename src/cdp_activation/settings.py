"""Deployment settings, read from the environment (prefix `CDP_`) or a `.env` file.

Every value a deployment changes lives here with its embedded default: the DuckDB demo
warehouse, the SQLite ledger under `dagster_home/`, and the local sandbox provider on
127.0.0.1. Secrets are `SecretStr`, so they never print. Against the local sandbox (the default
base URLs) the sandbox's published test credentials are used when none are set, so the embedded
default needs no configuration; against any other URL a missing credential is an error.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlparse

import pydantic_settings
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdp_activation.errors import ConnectorConfigError, SettingsError
from cdp_activation.plugins import (
    ConnectorPlugin,
    ConnectorSettings,
    Credentials,
    WebhookSecrets,
    plugin,
    plugins,
    status_routes,
)
from cdp_activation.sandbox_credentials import (  # noqa: F401  # re-exported
    SANDBOX_BRAZE_API_KEY,
    SANDBOX_INFOBIP_API_KEY,
    SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS,
    SANDBOX_LINE_CHANNEL_SECRET,
    SANDBOX_LINE_TOKEN,
    SANDBOX_META_APP_SECRET,
    SANDBOX_META_TOKEN,
    SANDBOX_META_VERIFY_TOKEN,
    SANDBOX_PII_HASH_KEY,
    SANDBOX_PORT,
    SANDBOX_STATUS_SECRET,
    SANDBOX_TWILIO_ACCOUNT_SID,
    SANDBOX_TWILIO_AUTH_TOKEN,
    SANDBOX_VONAGE_API_KEY,
    SANDBOX_VONAGE_API_SECRET,
    SANDBOX_VONAGE_SIGNATURE_SECRET,
    SANDBOX_WEBHOOK_TOKEN,
)

# Numbers that only make sense above zero (a rate, a size, a count, a duration): anything else
# is refused when the settings are read, naming the variable (`SettingsError`), rather than
# failing mid-send or silently meaning "the default". Infinity and NaN are refused too.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveCount = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
NonNegativeCount = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(gt=0, le=65535)]
# A DuckDB memory size ("2GB", "512MiB"), or empty for DuckDB's own default (80% of RAM).
MemorySize = Annotated[str, Field(pattern=r"^(\s*|\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB))$")]


@cache
def project_root() -> Path:
    """The checkout holding `sql/` and `dagster_home/` (override with CDP_PROJECT_ROOT)."""
    if env := os.environ.get("CDP_PROJECT_ROOT"):
        return Path(env).resolve()
    for candidate in [Path.cwd(), *Path(__file__).resolve().parents]:
        if (candidate / "sql").is_dir() and (candidate / "pyproject.toml").is_file():
            return candidate
    return Path.cwd()


def _default_dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or project_root() / "dagster_home")


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in {"127.0.0.1", "localhost", "::1"}


class CoreSettings(BaseSettings):
    """The project's own deployment settings. Field `x` is read from the variable `CDP_X`;
    `Settings` adds every connector's (`plugins.py`)."""

    model_config = SettingsConfigDict(env_prefix="CDP_", env_file=".env", extra="ignore")

    warehouse_url: str = ""  # default: duckdb:///<dagster_home>/demo_warehouse.duckdb
    ledger_url: str = ""  # default: sqlite:///<dagster_home>/ledger.sqlite
    # Where the send log is written (`activation_send_log`); default: the warehouse. Give a
    # writable connection here and keep CDP_WAREHOUSE_URL read-only.
    send_log_url: str = ""
    # The most memory an embedded DuckDB warehouse may use for an audience query; past it,
    # joins, aggregates and sorts spill to a temporary directory. The query runs inside the
    # Dagster step that then holds its result: DuckDB's own default (80% of RAM) would let it
    # take the memory the step needs (3.9 GB at 10,000,000 customers; 2.1 GB with "2GB").
    # Empty: DuckDB's default.
    duckdb_memory_limit: MemorySize = "2GB"
    # Plan, then apply (confirmation.py): a send of more than `confirm_above` recipients needs
    # a preview of the same partition in the last `preview_valid_hours`, whose count it may
    # not exceed or undercut by more than `preview_max_change` (a share).
    # 0: every send needs a preview; 0.0 change: the send must match the preview exactly.
    confirm_above: NonNegativeCount = 1000
    preview_valid_hours: Positive = 24.0
    preview_max_change: NonNegative = 0.10
    # Unit prices for the preview's cost estimate (pricing.py); default: the packaged list.
    prices_file: str = ""
    sandbox_port: Port = SANDBOX_PORT

    # The status webhook receiver (`cdp-activation webhooks serve`); each connector's signing
    # secret is among its own settings (CDP_META_APP_SECRET, …). Unset against the sandbox
    # (CDP_SANDBOX=1): the sandbox's own; unset elsewhere: that provider's webhooks are
    # refused (401), never accepted unchecked.
    webhook_public_url: str | None = None  # e.g. https://hooks.example.com (Twilio signs it)
    webhooks_port: Port = 8788
    # Prometheus' `/metrics` on a port of its own (docs/operations.md); unset: on the
    # receiver's port, beside the webhooks (keep it off the public path then).
    metrics_port: Port | None = None
    # Replies that opt a customer out of (or back into) a channel, comma-separated; empty: the
    # usual words (STOP, UNSUBSCRIBE, … and START, UNSTOP, …: policy/opt_out.py).
    opt_out_keywords: str = ""
    opt_in_keywords: str = ""
    # The largest webhook body the receiver reads (413 beyond, before it is read whole).
    webhook_max_body_bytes: PositiveCount = 1_048_576

    # CDP_SANDBOX=1: provider credentials and webhook signing secrets left unset take the local
    # sandbox's published ones (`make demo`, `make dev` and the tests turn it on). Off, an unset
    # credential is an error and an unset signing secret refuses that provider's webhooks,
    # whatever address a base URL points at: the sandbox is never inferred from an address.
    sandbox: bool = False

    # Personal data (pii.py). The key of the keyed hashes kept instead of phone numbers (the
    # phone cache); unset (outside sandbox mode), nothing derived from a number is kept and
    # the cache is off. Rows older than the retention lose their number, message text and
    # provider payloads (`cdp-activation purge`, the daily `purge_personal_data` job).
    pii_hash_key: SecretStr | None = None
    pii_retention_days: PositiveCount = 90

    # One message a day across activations (`priority` in defs.yaml): the most messages a
    # customer gets per channel and day from the activations that declare a priority, the
    # highest priorities first (activation/daily_cap.py). 0: no such cap.
    daily_cap: NonNegativeCount = 0

    # Alerts (alerts/, docs/operations.md): Dagster sensors tell these destinations of a failed
    # or blocked run, a degraded one, a growing fallback backlog, a burst of forged webhooks.
    # Off until one destination is set. A JSON POST per alert to this URL (secret: a URL
    # often holds a token).
    alert_webhook_url: SecretStr | None = None
    # Slack, through its Web API (chat.postMessage; the client dagster-slack uses): a bot
    # token with chat:write and the channel; another API URL for a proxy or a test server.
    alert_slack_token: SecretStr | None = None
    alert_slack_channel: str = Field(default="", validate_default=True)
    alert_slack_api_url: str = "https://slack.com/api/"
    # E-mail through an SMTP server, from one address to others (comma-separated).
    alert_smtp_host: str = ""
    alert_smtp_port: Port = 25
    alert_smtp_username: str = ""
    alert_smtp_password: SecretStr | None = None
    alert_smtp_starttls: bool = False
    alert_email_from: str = ""
    alert_email_to: str = Field(default="", validate_default=True)
    # Signature refusals, across every receiver, in `alert_refusal_minutes` that raise an alert.
    alert_signature_refusals: PositiveCount = 20
    alert_refusal_minutes: PositiveCount = 5
    # How often the alert sensors look, in seconds (at least 5).
    alert_interval_seconds: Annotated[int, Field(ge=5)] = 30
    # The Dagster UI as people reach it: alerts link to the run there.
    dagster_ui_url: str = "http://127.0.0.1:3000"

    # The delivery engine (delivery.py).
    # Requests in flight at once across all connectors (each still within its own rate).
    delivery_concurrency: PositiveCount = 32
    # Tries per message in one run, the first one included; a message that used them waits
    # for a later run (it is never dead-lettered for that, only past its send deadline).
    delivery_max_attempts: PositiveCount = 4
    # Seconds the engine's lease on the rows it is sending lasts unless renewed; once it
    # has expired, its holder is taken to have died and the rows may be recovered.
    delivery_lease_seconds: Positive = 30.0
    # Most claim workers one activation's delivery may fan out into (`delivery.workers` in
    # defs.yaml, `workers` in the Launchpad, `--workers` in the CLI): a guard against a typo
    # that would start a thousand processes.
    delivery_max_workers: PositiveCount = 32
    # Rate limits shared by every process sending for one sender (rate_limits.py): a Redis
    # URL, e.g. redis://127.0.0.1:6379/0. Empty: each process limits itself (one process).
    rate_limit_url: str = ""

    # Dagster's Celery executor for the activation jobs (docs/scaling.md): the broker the
    # Celery workers listen to, e.g. pyamqp://guest:guest@127.0.0.1:5672// or
    # redis://127.0.0.1:6379/1, and where they put results. Empty: the multiprocess executor.
    celery_broker_url: str = ""
    celery_backend_url: str = "rpc://"
    # Which executor runs an activation's steps: empty picks Celery when a broker is set and
    # the multiprocess executor otherwise; "k8s" runs each step as a Kubernetes Job
    # (dagster-k8s, the `k8s` extra; docs/scaling.md).
    executor: Literal["", "multiprocess", "celery", "k8s"] = ""
    # Kubernetes: the ConfigMap and Secret holding the CDP_* variables every step pod needs.
    k8s_env_config_map: str = "cdp-activation-env"
    k8s_env_secret: str = "cdp-activation-secrets"

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        schemes = ("amqp://", "pyamqp://", "amqps://", "redis://", "rediss://")
        if value and not value.startswith(schemes):
            raise ValueError(
                "must be a RabbitMQ (pyamqp://) or Redis (redis://) URL, or empty for the "
                "multiprocess executor"
            )
        return value

    @field_validator("rate_limit_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// URL (or empty for per-process limits)")
        return value

    @field_validator("alert_webhook_url", "alert_slack_api_url", "dagster_ui_url")
    @classmethod
    def _http_url(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and not re.match(r"^https?://[^/\s]+", text):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("alert_slack_channel")
    @classmethod
    def _slack_pair(cls, value: str, info: ValidationInfo) -> str:
        if bool(value.strip()) != (info.data.get("alert_slack_token") is not None):
            raise ValueError(
                "Slack alerts need both CDP_ALERT_SLACK_TOKEN and CDP_ALERT_SLACK_CHANNEL "
                "(or neither)"
            )
        return value.strip()

    @field_validator("alert_email_to")
    @classmethod
    def _email(cls, value: str, info: ValidationInfo) -> str:
        data = info.data
        if not value.strip():
            configured = [
                env
                for env, field in (
                    ("CDP_ALERT_SMTP_HOST", "alert_smtp_host"),
                    ("CDP_ALERT_SMTP_USERNAME", "alert_smtp_username"),
                    ("CDP_ALERT_SMTP_PASSWORD", "alert_smtp_password"),
                )
                if data.get(field)
            ]
            if configured:
                raise ValueError(f"e-mail alerts need recipients ({', '.join(configured)} is set)")
            return ""
        missing = [
            env
            for env, field in (
                ("CDP_ALERT_SMTP_HOST", "alert_smtp_host"),
                ("CDP_ALERT_EMAIL_FROM", "alert_email_from"),
            )
            if not str(data.get(field) or "").strip()
        ]
        if missing:
            raise ValueError(f"e-mail alerts also need {' and '.join(missing)}")
        if data.get("alert_smtp_username"):
            if data.get("alert_smtp_password") is None:
                raise ValueError("CDP_ALERT_SMTP_USERNAME is set without CDP_ALERT_SMTP_PASSWORD")
            if not data.get("alert_smtp_starttls") and data.get("alert_smtp_port") != 465:
                raise ValueError(
                    "an SMTP login needs TLS: CDP_ALERT_SMTP_STARTTLS=true, or port 465 "
                    "(the password would cross the network in clear)"
                )
        for address in [data["alert_email_from"], *value.split(",")]:
            if not re.match(r"^[^@\s,]+@[^@\s,]+\.[^@\s,]+$", address.strip()):
                raise ValueError(f"{address.strip()!r} is not an e-mail address")
        return value

    def alerts_on(self) -> bool:
        """Whether any alert destination is set."""
        return bool(
            self.alert_webhook_url is not None
            or self.alert_slack_token is not None
            or self.alert_email_to
        )

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """`CDP_X=` with nothing after it (as in .env.example) leaves an optional X unset: the
        default (a rate: the connector's own)."""
        if not isinstance(data, dict):
            return data
        optional = {name for name, info in cls.model_fields.items() if info.default is None}
        return {
            key: value
            for key, value in data.items()
            if not (key in optional and isinstance(value, str) and not value.strip())
        }

    @field_validator("sandbox", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        """`CDP_SANDBOX=` with nothing after it (as in .env.example) is off."""
        return False if isinstance(value, str) and not value.strip() else value

    def model_post_init(self, _context: object) -> None:
        home = _default_dagster_home()
        if not self.warehouse_url:
            self.warehouse_url = f"duckdb:///{home / 'demo_warehouse.duckdb'}"
        if not self.ledger_url:
            self.ledger_url = f"sqlite:///{home / 'ledger.sqlite'}"
        if not self.send_log_url:
            self.send_log_url = self.warehouse_url

    def prices_path(self) -> Path | None:
        """The price list file (CDP_PRICES_FILE), or None for the packaged one."""
        return Path(self.prices_file) if self.prices_file else None

    def connector_settings(self, name: str) -> ConnectorSettings:
        """The settings of the connector `name`, as its plugin declares them."""
        found = plugin(name)
        values = {f: getattr(self, found.flat_name(f)) for f in found.settings.model_fields}
        return found.settings.model_validate(values)

    def webhook_secrets(self) -> WebhookSecrets:
        """The receiver's secrets per status webhook route: configured ones, else the
        sandbox's published ones in sandbox mode."""
        secrets: dict[str, str | None] = {}
        tokens: dict[str, str | None] = {}
        for route, found in status_routes().items():
            hook = found.status_webhook
            assert hook is not None
            credentials = Credentials(found, self.connector_settings(found.name), self.sandbox)
            secrets[route] = credentials.optional(hook.secret)
            if hook.subscribe_token:
                tokens[route] = credentials.optional(hook.subscribe_token)
        return WebhookSecrets(secrets, tokens, self.webhook_public_url)


def export_dotenv(path: str | Path = ".env") -> None:
    """Put the CDP_* values of `.env` (the file `Settings` reads) into the environment, where
    it has none of its own, so the Dagster resources (`dg.EnvVar`) and every step process see
    the same configuration as the CLI: one source, whichever way a run starts."""
    from dotenv import dotenv_values

    file = Path(path)
    if not file.is_file():
        return
    for name, value in dotenv_values(file).items():
        if name.upper().startswith("CDP_") and value is not None and name not in os.environ:
            os.environ[name] = value


def sandbox_mode(sandbox: bool | None = None) -> bool:
    """`sandbox` when given, else CDP_SANDBOX from the environment (and .env)."""
    return get_settings().sandbox if sandbox is None else sandbox


def resolve_secret(
    value: str | SecretStr | None,
    base_url: str,
    sandbox_value: str,
    env_name: str,
    sandbox: bool | None = None,
) -> str:
    """The credential to use: the configured one, else the sandbox's own in sandbox mode
    (CDP_SANDBOX), else a clear error naming the variable to set."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value:
        return value
    if sandbox_mode(sandbox):
        return sandbox_value
    raise ConnectorConfigError(
        f"{env_name} is not set (the connector points at {base_url}). Set {env_name} in the "
        "environment or .env to the provider's credential, or CDP_SANDBOX=1 to use the local "
        "sandbox's published one."
    )


def _with_connector_fields(base: type[CoreSettings]) -> type[CoreSettings]:
    """`base` plus every installed connector's settings, each under its variable's name
    (`CDP_META_ACCESS_TOKEN` is the field `meta_access_token`): one class reads, checks and
    reports on every variable alike."""
    fields: dict[str, Any] = {}
    for found in plugins().values():
        for name, info in found.settings.model_fields.items():
            fields[found.flat_name(name)] = (info.annotation, copy.copy(info))
    return create_model("Settings", __base__=base, __module__=__name__, **fields)


@cache
def settings_class() -> type[CoreSettings]:
    """`Settings`, built on first use: the connector plugins are loaded then, so a broken or
    clashing plugin is reported like any other setting (one line), not as an import error."""
    return _with_connector_fields(CoreSettings)


if TYPE_CHECKING:
    Settings = CoreSettings
else:

    def __getattr__(name: str) -> Any:
        if name == "Settings":
            return settings_class()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_settings() -> Settings:
    """The settings of the current environment and `.env`, as a copy the caller may keep.

    Reading them costs ~15 ms (pydantic-settings inspects every field, then the `.env`
    file), and loading the definitions asks ~30 times: a process keeps the last settings
    read and reads them again only when what they come from changed (`_sources`).

    Raises `SettingsError` (one line naming each bad variable) for a value that makes no sense.
    """
    global _last_read
    cls = settings_class()
    key = (cls, _sources())
    last = _last_read  # one read: another thread may replace it meanwhile
    if last is not None and last[0] == key:
        return last[1].model_copy()
    try:
        settings = cls()
    except ValidationError as err:
        message = settings_error_message(err)
    except pydantic_settings.SettingsError as err:  # a JSON value that does not parse
        message = _source_error_message(err)
    else:
        _last_read = (key, settings)
        return settings.model_copy()
    # Raised outside the `except`: the pydantic error, which holds the raw input (a secret's
    # too), is not chained onto this one and so never reaches a traceback or a run's log.
    raise SettingsError(message)


# The key and the settings of the last successful read (`get_settings`).
_last_read: tuple[Any, CoreSettings] | None = None


def _sources() -> tuple[Any, ...]:
    """Everything the settings are read from: the CDP_ variables (any case, as
    pydantic-settings matches them), DAGSTER_HOME (the default ledger's and warehouse's
    folder), the working directory and its `.env` file (inode, size, modification time)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k[:4].upper() == "CDP_"))
    cwd = os.getcwd()
    try:
        found = os.stat(os.path.join(cwd, ".env"))
        dotenv: tuple[int, int, int] | None = (found.st_ino, found.st_size, found.st_mtime_ns)
    except OSError:
        dotenv = None
    return env, os.environ.get("DAGSTER_HOME"), cwd, dotenv


# What a number means, for the error that refuses it.
_MEANINGS = {
    "confirm_above": "recipients a send may have without a preview; 0: preview every send",
    "preview_valid_hours": "hours a preview stays valid for the send that follows it",
    "preview_max_change": "a share of the preview's count, e.g. 0.1 for 10%",
    "sandbox_port": "a TCP port, 1-65535",
    "webhooks_port": "a TCP port, 1-65535",
    "webhook_batch_size": "messages per webhook request",
    "delivery_concurrency": "requests in flight at once",
    "delivery_max_attempts": "tries per message, the first one included",
    "delivery_lease_seconds": "seconds a delivery lease lasts",
    "delivery_max_workers": "the most claim workers a delivery may fan out into",
    "daily_cap": "messages per customer, channel and day across prioritised activations; 0: off",
    "webhook_max_body_bytes": "bytes of the largest webhook body the receiver reads",
}
_RATE_MEANING = "messages per second; unset it to use the connector's default"
_SECRET_WORDS = ("url", "token", "secret", "key", "password", "credentials", "headers", "sid")


def env_name(field: str, plugin: ConnectorPlugin | None = None) -> str:
    """The environment variable of a settings field ("meta_rate_per_second" ->
    "CDP_META_RATE_PER_SECOND"), or of a field of a connector's own settings."""
    if plugin is not None:
        return plugin.env_name(field)
    return f"{CoreSettings.model_config.get('env_prefix', '')}{field}".upper()


def _may_show(field: str, plugin: ConnectorPlugin | None = None) -> bool:
    """Whether a bad value of this field may be echoed: never a secret, nor a URL or anything
    else that may hold a credential."""
    model = plugin.settings if plugin is not None else settings_class()
    info = model.model_fields.get(field)
    if info is None or "SecretStr" in str(info.annotation):
        return False
    if plugin is not None and plugin.is_secret(field):
        return False
    return not any(word in field for word in _SECRET_WORDS)


def settings_error_message(err: ValidationError, plugin: ConnectorPlugin | None = None) -> str:
    """One line for every refused setting: `CDP_X=value: must be … (what it means)`; the
    fields of `plugin`'s own settings when given."""
    parts: list[str] = []
    for error in err.errors():
        field, *inner = [str(part) for part in error["loc"]] or ["?"]
        name = env_name(field, plugin) + "".join(f"[{part!r}]" for part in inner)
        value: Any = error.get("input")
        show = _may_show(field, plugin)
        if show and isinstance(value, str | int | float) and len(str(value)) <= 40:
            name = f"{name}={value}"
        msg = str(error["msg"]).removeprefix("Value error, ")
        if msg.startswith("Input should be "):
            msg = "must be " + msg.removeprefix("Input should be ")
        flat = plugin.flat_name(field) if plugin is not None else field
        meaning = _RATE_MEANING if flat.endswith("_rate_per_second") else _MEANINGS.get(flat)
        if field == "rate_per_second":
            meaning = _RATE_MEANING
        if not show:
            meaning = "; ".join(filter(None, (meaning, "its value is not shown")))
        part = f"{name}: {msg}" + (f" ({meaning})" if meaning else "")
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid settings"


def _source_error_message(err: pydantic_settings.SettingsError) -> str:
    """pydantic-settings' own error (a JSON value that does not parse), with the variable."""
    found = re.search(r'field "([^"]+)"', str(err))
    if found is None:
        return "a CDP_* setting could not be read (its value is not shown)"
    return f"{env_name(found.group(1))}: must be valid JSON (its value is not shown)"
