"""The resources every activation uses, configured from the environment (`CDP_*`).

Non-secret settings take their embedded defaults (DuckDB demo warehouse, SQLite ledger, local
sandbox); secrets are `dg.EnvVar`s when set, so they stay out of the UI and run metadata.
"""

import os

import dagster as dg

from cdp_activation.resources import (
    BrazeResource,
    InfobipResource,
    LedgerResource,
    LineResource,
    MetaWhatsAppResource,
    SendLogResource,
    TwilioResource,
    VonageResource,
    WarehouseResource,
    WebhookResource,
)
from cdp_activation.settings import export_dotenv, get_settings
from cdp_activation.storage import SealedFilesystemIOManager


def _env_or(name: str, default: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name) else default


def _env_secret(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


@dg.definitions
def resources() -> dg.Definitions:
    export_dotenv()  # secrets only in .env reach the resources as they reach the CLI
    settings = get_settings()
    # The send log goes to the warehouse unless a (writable) URL of its own is set.
    send_log_variable = (
        "CDP_SEND_LOG_URL" if os.environ.get("CDP_SEND_LOG_URL") else "CDP_WAREHOUSE_URL"
    )
    return dg.Definitions(
        resources={
            # A database URL may hold a password: when it comes from the environment it stays
            # an EnvVar, resolved at run time and never shown in the UI.
            "warehouse": WarehouseResource(
                url=_env_or("CDP_WAREHOUSE_URL", settings.warehouse_url)
            ),
            "ledger": LedgerResource(url=_env_or("CDP_LEDGER_URL", settings.ledger_url)),
            # Step outputs hold whole audiences: sealed on disk (storage.py), not pickled in
            # clear like Dagster's default.
            "io_manager": SealedFilesystemIOManager(),
            "send_log": SendLogResource(url=_env_or(send_log_variable, settings.send_log_url)),
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
                content_base_url=settings.twilio_content_base_url,
                whatsapp_from=settings.twilio_whatsapp_from,
                status_callback_url=settings.twilio_status_callback_url,
                rate_per_second=settings.twilio_rate_per_second,
            ),
            "infobip": InfobipResource(
                base_url=settings.infobip_base_url,
                api_key=_env_secret("CDP_INFOBIP_API_KEY"),
                whatsapp_from=settings.infobip_whatsapp_from,
                sms_sender=settings.infobip_sms_sender,
                viber_sender=settings.infobip_viber_sender,
                rate_per_second=settings.infobip_rate_per_second,
            ),
            "vonage": VonageResource(
                base_url=settings.vonage_base_url,
                api_key=settings.vonage_api_key,
                api_secret=_env_secret("CDP_VONAGE_API_SECRET"),
                whatsapp_from=settings.vonage_whatsapp_from,
                sms_from=settings.vonage_sms_from,
                whatsapp_namespace=settings.vonage_whatsapp_namespace,
                viber_from=settings.vonage_viber_from,
                rate_per_second=settings.vonage_rate_per_second,
            ),
            "braze": BrazeResource(
                base_url=settings.braze_base_url,
                api_key=_env_secret("CDP_BRAZE_API_KEY"),
                rate_per_second=settings.braze_rate_per_second,
            ),
            "line": LineResource(
                base_url=settings.line_base_url,
                channel_access_token=_env_secret("CDP_LINE_CHANNEL_ACCESS_TOKEN"),
                rate_per_second=settings.line_rate_per_second,
            ),
            "webhook": WebhookResource(
                url=settings.webhook_url,
                headers_json=_env_secret("CDP_WEBHOOK_HEADERS"),
                batch_size=settings.webhook_batch_size,
                rate_per_second=settings.webhook_rate_per_second,
            ),
        }
    )
