"""Deployment settings, read from the environment (prefix `CDP_`) or a `.env` file.

Every value a deployment changes lives here with its embedded default: the DuckDB demo
warehouse, the SQLite ledger under `dagster_home/`, and the local sandbox provider on
127.0.0.1. Secrets are `SecretStr`, so they never print. Against the local sandbox (the default
base URLs) the sandbox's published test credentials are used when none are set, so the embedded
default needs no configuration; against any other URL a missing credential is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import pydantic_settings
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdp_activation.confirmation import ConfirmPolicy
from cdp_activation.errors import CdpError, ConnectorConfigError
from cdp_activation.statuses import CONNECTOR_OF_PROVIDER

SANDBOX_META_TOKEN = "sandbox-meta-token"
SANDBOX_TWILIO_ACCOUNT_SID = "AC00000000000000000000000000000000"
SANDBOX_TWILIO_AUTH_TOKEN = "sandbox-twilio-token"
SANDBOX_INFOBIP_API_KEY = "sandbox-infobip-key"
SANDBOX_VONAGE_API_KEY = "sandboxkey"
SANDBOX_VONAGE_API_SECRET = "sandbox-vonage-secret"
SANDBOX_WEBHOOK_TOKEN = "sandbox-webhook-token"
SANDBOX_BRAZE_API_KEY = "sandbox-braze-rest-key"
SANDBOX_LINE_TOKEN = "sandbox-line-channel-token"
# What the sandbox signs its status webhooks with (each provider's own scheme).
SANDBOX_META_APP_SECRET = "sandbox-meta-app-secret"
SANDBOX_META_VERIFY_TOKEN = "sandbox-meta-verify-token"
SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS = "infobip:sandbox-webhook-password"
SANDBOX_VONAGE_SIGNATURE_SECRET = "sandbox-vonage-signature-secret-0123456789"
SANDBOX_LINE_CHANNEL_SECRET = "sandbox-line-channel-secret"
SANDBOX_STATUS_SECRET = "sandbox-status-secret"
SANDBOX_PII_HASH_KEY = "sandbox-pii-hash-key"
SANDBOX_PORT = 8787

# Numbers that only make sense above zero (a rate, a size, a count, a duration): anything else
# is refused when the settings are read, naming the variable (`SettingsError`), rather than
# failing mid-send or silently meaning "the default". Infinity and NaN are refused too.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveCount = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
NonNegativeCount = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(gt=0, le=65535)]


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


class Settings(BaseSettings):
    """All deployment settings. Field `x` is read from environment variable `CDP_X`."""

    model_config = SettingsConfigDict(env_prefix="CDP_", env_file=".env", extra="ignore")

    warehouse_url: str = ""  # default: duckdb:///<dagster_home>/demo_warehouse.duckdb
    ledger_url: str = ""  # default: sqlite:///<dagster_home>/ledger.sqlite
    # Where the send log is written (`activation_send_log`); default: the warehouse. Give a
    # writable connection here and keep CDP_WAREHOUSE_URL read-only.
    send_log_url: str = ""
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

    meta_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/meta"
    meta_api_version: str = "v23.0"
    meta_phone_number_id: str = "100000000000001"
    meta_waba_id: str = "200000000000002"
    meta_access_token: SecretStr | None = None
    meta_rate_per_second: Positive | None = None  # None: the connector's default (80 msg/s)

    twilio_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/twilio"
    # Content API (templates and their WhatsApp approvals). Real: https://content.twilio.com
    twilio_content_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/twilio"
    twilio_account_sid: str = SANDBOX_TWILIO_ACCOUNT_SID
    twilio_auth_token: SecretStr | None = None
    twilio_from: str = "+15005550006"
    # The WhatsApp sender: a WhatsApp-enabled number or a Messaging Service SID (MG…).
    twilio_whatsapp_from: str = "+14155238886"
    twilio_rate_per_second: Positive | None = None  # None: the connector's default
    # The public URL of our Twilio status webhook, e.g. https://hooks.example.com/webhooks/twilio:
    # each message's StatusCallback is this plus ?ref=cdp-<send id>; empty: none sent.
    twilio_status_callback_url: str = ""

    infobip_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/infobip"
    infobip_api_key: SecretStr | None = None
    infobip_whatsapp_from: str = "441134960000"  # registered WhatsApp sender number
    infobip_sms_sender: str = "InfoSMS"  # alphanumeric or numeric SMS sender id
    infobip_viber_sender: str = "DemoCompany"  # the Viber Business Messages sender
    infobip_rate_per_second: Positive | None = None

    vonage_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/vonage"
    vonage_api_key: str = SANDBOX_VONAGE_API_KEY  # an account id, not a secret
    vonage_api_secret: SecretStr | None = None
    vonage_whatsapp_from: str = "447700900001"
    vonage_sms_from: str = "447700900002"
    vonage_viber_from: str = "cdpdemo"  # the Viber Business Messages service id
    vonage_whatsapp_namespace: str = ""  # "<namespace>:" is prefixed to template names when set
    vonage_rate_per_second: Positive | None = None
    # Braze REST API (API-triggered campaigns). Real: your instance's REST endpoint, e.g.
    # https://rest.fra-01.braze.eu
    braze_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/braze"
    braze_api_key: SecretStr | None = None
    braze_rate_per_second: Positive | None = None
    # LINE Messaging API. Real: https://api.line.me
    line_base_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/line"
    line_channel_access_token: SecretStr | None = None
    line_rate_per_second: Positive | None = None

    # Status webhooks in (`cdp-activation webhooks serve`): each provider's signing secret.
    # Unset against the local sandbox: the sandbox's own; unset elsewhere: that provider's
    # webhooks are refused (401), never accepted unchecked.
    meta_app_secret: SecretStr | None = None
    meta_verify_token: SecretStr | None = None
    infobip_webhook_credentials: SecretStr | None = None  # "user:password" in the notify URL
    vonage_signature_secret: SecretStr | None = None
    line_channel_secret: SecretStr | None = None
    webhook_public_url: str | None = None  # e.g. https://hooks.example.com (Twilio signs it)
    webhooks_port: Port = 8788
    # The largest webhook body the receiver reads (413 beyond, before it is read whole).
    webhook_max_body_bytes: PositiveCount = 1_048_576

    webhook_url: str = f"http://127.0.0.1:{SANDBOX_PORT}/webhook/messages"
    # Extra request headers as JSON, e.g. {"Authorization": "Bearer …"}; values are secrets.
    webhook_headers: dict[str, SecretStr] | None = None
    webhook_batch_size: PositiveCount = 200
    webhook_rate_per_second: Positive | None = None

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

    @field_validator(
        "meta_rate_per_second",
        "twilio_rate_per_second",
        "infobip_rate_per_second",
        "vonage_rate_per_second",
        "braze_rate_per_second",
        "line_rate_per_second",
        "webhook_rate_per_second",
        "webhook_headers",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`CDP_X=` with nothing after it (as in .env.example) leaves X unset: the default."""
        return None if isinstance(value, str) and not value.strip() else value

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

    def meta_token(self) -> str:
        return resolve_secret(
            self.meta_access_token,
            self.meta_base_url,
            SANDBOX_META_TOKEN,
            "CDP_META_ACCESS_TOKEN",
            self.sandbox,
        )

    def twilio_token(self) -> str:
        return resolve_secret(
            self.twilio_auth_token,
            self.twilio_base_url,
            SANDBOX_TWILIO_AUTH_TOKEN,
            "CDP_TWILIO_AUTH_TOKEN",
            self.sandbox,
        )

    def infobip_key(self) -> str:
        return resolve_secret(
            self.infobip_api_key,
            self.infobip_base_url,
            SANDBOX_INFOBIP_API_KEY,
            "CDP_INFOBIP_API_KEY",
            self.sandbox,
        )

    def vonage_secret(self) -> str:
        return resolve_secret(
            self.vonage_api_secret,
            self.vonage_base_url,
            SANDBOX_VONAGE_API_SECRET,
            "CDP_VONAGE_API_SECRET",
            self.sandbox,
        )

    def braze_key(self) -> str:
        return resolve_secret(
            self.braze_api_key,
            self.braze_base_url,
            SANDBOX_BRAZE_API_KEY,
            "CDP_BRAZE_API_KEY",
            self.sandbox,
        )

    def line_token(self) -> str:
        return resolve_secret(
            self.line_channel_access_token,
            self.line_base_url,
            SANDBOX_LINE_TOKEN,
            "CDP_LINE_CHANNEL_ACCESS_TOKEN",
            self.sandbox,
        )

    def webhook_secrets(self) -> WebhookSecrets:
        """The receiver's secrets: configured ones, else the sandbox's in sandbox mode."""

        def pick(value: SecretStr | None, base_url: str, sandbox: str) -> str | None:
            if value is not None and value.get_secret_value():
                return value.get_secret_value()
            return sandbox if self.sandbox else None

        twilio = pick(self.twilio_auth_token, self.twilio_base_url, SANDBOX_TWILIO_AUTH_TOKEN)
        return WebhookSecrets(
            meta_app_secret=pick(self.meta_app_secret, self.meta_base_url, SANDBOX_META_APP_SECRET),
            meta_verify_token=pick(
                self.meta_verify_token, self.meta_base_url, SANDBOX_META_VERIFY_TOKEN
            ),
            twilio_auth_token=twilio,
            infobip_credentials=pick(
                self.infobip_webhook_credentials,
                self.infobip_base_url,
                SANDBOX_INFOBIP_WEBHOOK_CREDENTIALS,
            ),
            vonage_signature_secret=pick(
                self.vonage_signature_secret, self.vonage_base_url, SANDBOX_VONAGE_SIGNATURE_SECRET
            ),
            line_channel_secret=pick(
                self.line_channel_secret, self.line_base_url, SANDBOX_LINE_CHANNEL_SECRET
            ),
            sandbox_secret=SANDBOX_STATUS_SECRET if self.sandbox else None,
            public_url=self.webhook_public_url,
        )

    def webhook_header_values(self) -> dict[str, str]:
        """The webhook's extra headers; against the sandbox, its bearer token when none set."""
        return webhook_headers_or_sandbox(self.webhook_headers, self.sandbox)


def webhook_headers_or_sandbox(
    headers: dict[str, SecretStr] | None, sandbox: bool | None = None
) -> dict[str, str]:
    """Configured headers as plain strings; in sandbox mode, the sandbox's token when none.

    A receiver need not want any header, so nothing set outside sandbox mode is not an
    error (unlike a provider credential): the request simply carries no extra headers.
    """
    if headers:
        return {name: value.get_secret_value() for name, value in headers.items()}
    if sandbox_mode(sandbox):
        return {"Authorization": f"Bearer {SANDBOX_WEBHOOK_TOKEN}"}
    return {}


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


def confirm_policy() -> ConfirmPolicy:
    """The confirm-before-send thresholds of the current environment."""
    settings = get_settings()
    return ConfirmPolicy(
        confirm_above=settings.confirm_above,
        valid_hours=settings.preview_valid_hours,
        max_change=settings.preview_max_change,
    )


@dataclass(frozen=True)
class WebhookSecrets:
    """What each provider's webhooks are checked with; None: that provider is refused."""

    meta_app_secret: str | None = None
    meta_verify_token: str | None = None
    twilio_auth_token: str | None = None
    infobip_credentials: str | None = None  # "user:password" of the notify URL's Basic auth
    vonage_signature_secret: str | None = None
    line_channel_secret: str | None = None
    sandbox_secret: str | None = None
    # The public base URL providers call (behind a proxy the request's own URL differs);
    # Twilio signs the full URL it called.
    public_url: str | None = None

    def __repr__(self) -> str:  # never print a secret
        configured = [p for p in CONNECTOR_OF_PROVIDER if self.secret_for(p)]
        return f"WebhookSecrets(configured={configured}, public_url={self.public_url!r})"

    def secret_for(self, provider: str) -> str | None:
        return {
            "meta": self.meta_app_secret,
            "twilio": self.twilio_auth_token,
            "infobip": self.infobip_credentials,
            "vonage": self.vonage_signature_secret,
            "line": self.line_channel_secret,
            "sandbox": self.sandbox_secret,
        }[provider]


def get_settings() -> Settings:
    """Fresh settings from the current environment (cheap; not cached so tests can vary env).

    Raises `SettingsError` (one line naming each bad variable) for a value that makes no sense.
    """
    try:
        return Settings()
    except ValidationError as err:
        message = settings_error_message(err)
    except pydantic_settings.SettingsError as err:  # a JSON value that does not parse
        message = _source_error_message(err)
    # Raised outside the `except`: the pydantic error, which holds the raw input (a secret's
    # too), is not chained onto this one and so never reaches a traceback or a run's log.
    raise SettingsError(message)


class SettingsError(CdpError, ValueError):
    """Settings that make no sense, refused before anything is planned or sent: one line
    naming each variable, what it must be and what it means. Never holds a secret's value."""


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
    "webhook_max_body_bytes": "bytes of the largest webhook body the receiver reads",
}
_RATE_MEANING = "messages per second; unset it to use the connector's default"
_SECRET_WORDS = ("url", "token", "secret", "key", "password", "credentials", "headers", "sid")


def env_name(field: str) -> str:
    """The environment variable of a settings field ("meta_rate_per_second" ->
    "CDP_META_RATE_PER_SECOND")."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _may_show(field: str) -> bool:
    """Whether a bad value of this field may be echoed: never a secret, nor a URL or anything
    else that may hold a credential."""
    info = Settings.model_fields.get(field)
    if info is None or "SecretStr" in str(info.annotation):
        return False
    return not any(word in field for word in _SECRET_WORDS)


def settings_error_message(err: ValidationError) -> str:
    """One line for every refused setting: `CDP_X=value: must be … (what it means)`."""
    parts: list[str] = []
    for error in err.errors():
        field, *inner = [str(part) for part in error["loc"]] or ["?"]
        name = env_name(field) + "".join(f"[{part!r}]" for part in inner)
        value: Any = error.get("input")
        if _may_show(field) and isinstance(value, str | int | float) and len(str(value)) <= 40:
            name = f"{name}={value}"
        msg = str(error["msg"]).removeprefix("Value error, ")
        if msg.startswith("Input should be "):
            msg = "must be " + msg.removeprefix("Input should be ")
        meaning = _RATE_MEANING if field.endswith("_rate_per_second") else _MEANINGS.get(field)
        if not _may_show(field):
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
