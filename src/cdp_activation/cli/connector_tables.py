"""The installed connectors as tables, derived from their plugins: what `cdp-activation
connectors` prints and what docs/connectors.md shows (a test keeps the two the same)."""

from __future__ import annotations

from cdp_activation.connectors.base import Capabilities
from cdp_activation.plugins import ConnectorPlugin, plugins


def _variables(plugin: ConnectorPlugin, receiver: bool) -> str:
    names = []
    for field in plugin.settings.model_fields:
        if plugin.for_receiver_only(field) != receiver or field == "rate_per_second":
            continue
        secret = " (secret)" if plugin.is_secret(field) else ""
        names.append(f"`{plugin.env_name(field).removeprefix('CDP_')}`{secret}")
    return ", ".join(names)


def connectors_markdown() -> str:
    """One row per connector: channels, batch, default rate, idempotency, settings."""
    header = "| name | provider | channels | per request | default rate | idempotent | settings |"
    lines = [header, "|---|---|---|---:|---:|---|---|"]
    for name, plugin in sorted(plugins().items()):
        caps: Capabilities = plugin.capabilities
        lines.append(
            f"| `{name}` | {plugin.title} | {', '.join(sorted(caps.channels))} | "
            f"{caps.max_batch_size:,} | {caps.default_rate_per_second:,.0f}/s | "
            f"{'yes' if caps.idempotency else 'no'} | {_variables(plugin, receiver=False)} |"
        )
    return "\n".join(lines)


def webhooks_markdown() -> str:
    """One row per status webhook route: how it is checked, and with which settings."""
    lines = [
        "| route | connector | checked with | settings |",
        "|---|---|---|---|",
    ]
    for name, plugin in sorted(plugins().items()):
        hook = plugin.status_webhook
        if hook is None:
            continue
        subscribe = " (and `GET` for the subscription check)" if hook.subscribe_token else ""
        secret = f"`{plugin.env_name(hook.secret).removeprefix('CDP_')}`"
        extra = _variables(plugin, receiver=True)
        settings = ", ".join(dict.fromkeys([secret + " (secret)", *extra.split(", ")]))
        lines.append(
            f"| `/webhooks/{hook.route}`{subscribe} | `{name}` | {hook.checked_with} | "
            f"{settings.rstrip(', ')} |"
        )
    return "\n".join(lines)
