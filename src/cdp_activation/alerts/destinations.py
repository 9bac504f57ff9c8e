"""Where alerts go: a generic JSON webhook, Slack (Web API `chat.postMessage`, through
slack_sdk, the client dagster-slack uses) and e-mail (SMTP), as CDP_ALERT_* say.

A destination that cannot be reached costs at most one short timeout per sensor evaluation:
its first failure is logged once (without the URL, token or password) and it is skipped for
the rest of that evaluation; nothing is raised, so no sensor, run or send ever fails for it.
Alerts come from Dagster's sensors, never from a sending process, so they cannot slow a send.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import httpx

from cdp_activation.alerts.model import Alert
from cdp_activation.masking import redact_secrets

log = logging.getLogger(__name__)
TIMEOUT_S = 5.0  # per connection attempt and per read
SMTPS_PORT = 465  # SMTP over TLS from the first byte (else plain, or STARTTLS when asked)


@dataclass(frozen=True)
class Destinations:
    webhook_url: str | None = None
    slack_token: str | None = None
    slack_channel: str = ""
    slack_api_url: str = "https://slack.com/api/"
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str | None = None
    smtp_starttls: bool = False
    email_from: str = ""
    email_to: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> Destinations:
        def secret(value: Any) -> str | None:
            return value.get_secret_value() if value is not None else None

        return cls(
            webhook_url=secret(settings.alert_webhook_url),
            slack_token=secret(settings.alert_slack_token),
            slack_channel=settings.alert_slack_channel,
            slack_api_url=settings.alert_slack_api_url,
            smtp_host=settings.alert_smtp_host,
            smtp_port=settings.alert_smtp_port,
            smtp_username=settings.alert_smtp_username,
            smtp_password=secret(settings.alert_smtp_password),
            smtp_starttls=settings.alert_smtp_starttls,
            email_from=settings.alert_email_from,
            email_to=tuple(a.strip() for a in settings.alert_email_to.split(",") if a.strip()),
        )

    def names(self) -> list[str]:
        return [
            name
            for name, on in (
                ("webhook", self.webhook_url),
                ("slack", self.slack_token),
                ("email", self.email_to),
            )
            if on
        ]

    def secrets(self) -> list[str | None]:
        return [self.webhook_url, self.slack_token, self.smtp_password]


class Dispatcher:
    """Delivers the alerts of one sensor evaluation to every destination (see the module)."""

    def __init__(self, destinations: Destinations, logger: Any = log) -> None:
        self.destinations = destinations
        self.logger = logger
        self.down: dict[str, str] = {}  # destination -> why, for this evaluation
        self.delivered: list[tuple[str, str]] = []  # (destination, alert kind)

    def send(self, alert: Alert) -> list[str]:
        """The destinations that took `alert`."""
        took = []
        for name in self.destinations.names():
            if name in self.down:
                continue
            try:
                getattr(self, f"_{name}")(alert)
            except Exception as err:
                why = redact_secrets(_describe(err), self.destinations.secrets())
                self.down[name] = why.splitlines()[0][:300]
                self.logger.warning(
                    f"alert destination {name} could not be reached ({self.down[name]}); "
                    "its alerts of this evaluation are dropped, the sends are not affected"
                )
                continue
            took.append(name)
            self.delivered.append((name, alert.kind))
        return took

    def _webhook(self, alert: Alert) -> None:
        assert self.destinations.webhook_url
        answer = httpx.post(self.destinations.webhook_url, json=alert.as_json(), timeout=TIMEOUT_S)
        answer.raise_for_status()

    def _slack(self, alert: Alert) -> None:
        from slack_sdk import WebClient

        d = self.destinations
        base = d.slack_api_url if d.slack_api_url.endswith("/") else d.slack_api_url + "/"
        # No retry handlers: an unreachable Slack costs one timeout, not two.
        client = WebClient(
            token=d.slack_token, base_url=base, timeout=int(TIMEOUT_S), retry_handlers=[]
        )
        client.chat_postMessage(channel=d.slack_channel, text=alert.text(), mrkdwn=False)

    def _email(self, alert: Alert) -> None:
        d = self.destinations
        message = EmailMessage()
        message["Subject"] = alert.subject()
        message["From"] = d.email_from
        message["To"] = ", ".join(d.email_to)
        message.set_content(alert.text())
        tls = ssl.create_default_context()  # the server's certificate is checked
        smtp: smtplib.SMTP = (
            smtplib.SMTP_SSL(d.smtp_host, d.smtp_port, timeout=TIMEOUT_S, context=tls)
            if d.smtp_port == SMTPS_PORT  # implicit TLS
            else smtplib.SMTP(d.smtp_host, d.smtp_port, timeout=TIMEOUT_S)
        )
        with smtp:
            if d.smtp_starttls and d.smtp_port != SMTPS_PORT:
                smtp.starttls(context=tls)
            if d.smtp_username:
                smtp.login(d.smtp_username, d.smtp_password or "")
            smtp.send_message(message)


def _describe(err: Exception) -> str:
    """Why a destination refused, in words that carry no URL: Slack's error code, the HTTP
    status, or the error's class and first line."""
    response = getattr(err, "response", None)
    if type(err).__name__ == "SlackApiError" and response is not None:
        return f"Slack answered {response.get('error') or 'not ok'}"
    if isinstance(err, httpx.HTTPStatusError):
        return f"answered HTTP {err.response.status_code}"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
