"""The resources every activation uses, configured from the environment (`CDP_*`).

Non-secret settings take their embedded defaults (DuckDB demo warehouse, SQLite ledger, local
sandbox); secrets are `dg.EnvVar`s when set, so they stay out of the UI and run metadata.
"""

import os

import dagster as dg

from cdp_activation.resources import (
    LedgerResource,
    MetaWhatsAppResource,
    TwilioResource,
    WarehouseResource,
)
from cdp_activation.settings import get_settings


def _env_or(name: str, default: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name) else default


def _env_secret(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


@dg.definitions
def resources() -> dg.Definitions:
    settings = get_settings()
    return dg.Definitions(
        resources={
            # A database URL may hold a password: when it comes from the environment it stays
            # an EnvVar, resolved at run time and never shown in the UI.
            "warehouse": WarehouseResource(
                url=_env_or("CDP_WAREHOUSE_URL", settings.warehouse_url)
            ),
            "ledger": LedgerResource(url=_env_or("CDP_LEDGER_URL", settings.ledger_url)),
            "meta_whatsapp": MetaWhatsAppResource(
                base_url=settings.meta_base_url,
                api_version=settings.meta_api_version,
                phone_number_id=settings.meta_phone_number_id,
                waba_id=settings.meta_waba_id,
                access_token=_env_secret("CDP_META_ACCESS_TOKEN"),
                rate_per_second=settings.meta_rate_per_second,
            ),
            "twilio": TwilioResource(
                base_url=settings.twilio_base_url,
                account_sid=settings.twilio_account_sid,
                auth_token=_env_secret("CDP_TWILIO_AUTH_TOKEN"),
                from_number=settings.twilio_from,
                rate_per_second=settings.twilio_rate_per_second,
            ),
        }
    )
