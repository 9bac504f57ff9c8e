"""Pydantic models of an activation, as written in its `defs.yaml`.

These are plain models with no Dagster in them: the policy, ledger and delivery modules take
them as input, and the Dagster component (`components/activation.py`) is a thin face over them.
"""

from __future__ import annotations

import functools
import re
from datetime import date, timedelta
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cdp_activation.partitions import FRAMEWORK_PARAMETERS

Channel = Literal["whatsapp", "sms", "viber", "line", "kakao", "rcs", "wechat"]
Purpose = Literal["marketing", "transactional"]
TemplateCategory = Literal["marketing", "utility", "authentication"]

# Channels whose messages are plain text the business writes: no template catalog to check.
BODY_ONLY_CHANNELS = frozenset({"line"})

_BODY_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The template categories a purpose may use: a marketing message must not hide in a utility
# template, and a transactional one must not use a marketing template.
CATEGORIES_FOR_PURPOSE: dict[str, frozenset[str]] = {
    "marketing": frozenset({"marketing"}),
    "transactional": frozenset({"utility", "authentication"}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParameterSpec(_Strict):
    """A named `:parameter` of the audience SQL, with its default and a marketer-facing text."""

    type: Literal["float", "int", "str", "bool", "date"] = "str"
    default: Any = None
    description: str = ""

    @model_validator(mode="after")
    def _default_matches_type(self) -> ParameterSpec:
        if self.default is not None:
            coerce_parameter(self.type, self.default)
        return self


def coerce_parameter(kind: str, value: Any) -> Any:
    """Turn a YAML or Launchpad value into the Python type the SQL parameter expects."""
    try:
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError("a boolean is not a number")
            return float(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("not a whole number")
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise TypeError("expected true or false")
        if kind == "date":
            return value if isinstance(value, date) else date.fromisoformat(str(value))
        return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{value!r} is not a valid {kind}: {err}") from None


def storable_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON keeps them, typed (a date as ISO text): `coerce_parameter` takes each
    back to the same value (`True` stays a boolean, not the text "True")."""
    return {
        name: value.isoformat()
        if isinstance(value, date)
        else value
        if value is None or isinstance(value, bool | int | float | str)
        else str(value)
        for name, value in parameters.items()
    }


class AudienceSpec(_Strict):
    """Where the audience SQL is and the defaults of its parameters."""

    sql: str = Field(description="Path of the audience SQL file, relative to the project root.")
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _names(cls, value: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        reserved = FRAMEWORK_PARAMETERS
        for name in value:
            if not _IDENT.match(name):
                raise ValueError(f"parameter name {name!r} is not a valid identifier")
            if name in reserved:
                raise ValueError(f"parameter name {name!r} is reserved: the framework binds it")
        return value


class TemplateSpec(_Strict):
    """A provider-approved template and the audience columns its body variables come from."""

    name: str
    language: str = "en"
    category: TemplateCategory
    variables: list[str] = Field(
        default_factory=list,
        description="Audience columns for the body's {{1}}, {{2}}, … placeholders, in order.",
    )

    @field_validator("variables")
    @classmethod
    def _columns(cls, value: list[str]) -> list[str]:
        for column in value:
            if not _IDENT.match(column):
                raise ValueError(f"variable {column!r} is not a column name")
        return value


HANDOFF_PREFIX = "audience:"  # a handoff travels as the message name audience:<attribute>[:<group>]
# Keys of a Braze user attributes object that the handoff sets or that identify the user.
HANDOFF_RESERVED = frozenset(
    {
        "external_id",
        "braze_id",
        "user_alias",
        "phone",
        "subscription_groups",
        "_update_existing_only",
    }
)


class HandoffSpec(_Strict):
    """Hand the customer to a CEP instead of messaging them: the CEP's own journey (a Braze
    Canvas entered on the attribute) sends, on the step's channel, to customers the policy
    has already cleared for it (consent, suppression, opt-outs, caps, quiet hours)."""

    attribute: str = Field(
        description="Custom attribute set on the CEP's user profile to the time they joined "
        "this run's audience (a Canvas enters users when it changes), e.g. cdp_winback_at."
    )
    subscription_group: str | None = Field(
        default=None,
        description="Subscription group id set `subscribed` with the push (the consent the "
        "policy checked for the step's channel); none: subscription state is left alone.",
    )
    properties: list[str] = Field(
        default_factory=list,
        description="Audience columns written as attributes of the same names (first_name, "
        "offer_code, …) for the CEP's message to use; a missing value excludes the customer.",
    )

    @field_validator("attribute", "properties")
    @classmethod
    def _names(cls, value: Any) -> Any:
        for name in [value] if isinstance(value, str) else value:
            if not _IDENT.match(name):
                raise ValueError(f"{name!r} is not a valid attribute name (letters, digits, _)")
        return value

    @field_validator("subscription_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9_-]+$", value):
            raise ValueError(f"{value!r} is not a subscription group id (letters, digits, - and _)")
        return value

    @model_validator(mode="after")
    def _no_reserved_names(self) -> HandoffSpec:
        # A property named external_id would write the values to another Braze user.
        names = [self.attribute, *self.properties]
        if taken := sorted(set(names) & HANDOFF_RESERVED):
            raise ValueError(
                f"handoff: {', '.join(taken)} is set by the handoff itself (the customer id, "
                "the checked number, the subscription state); alias the column in the SQL"
            )
        if len(set(names)) != len(names):
            raise ValueError("handoff: the attribute and each property need their own name")
        return self

    def message_name(self) -> str:
        """How the ledger and connector carry it: `audience:<attribute>[:<group>]`."""
        group = f":{self.subscription_group}" if self.subscription_group else ""
        return f"{HANDOFF_PREFIX}{self.attribute}{group}"

    @staticmethod
    def from_message_name(name: str) -> HandoffSpec | None:
        """The handoff a message name carries, or None when it names a template (parsed once
        per name: the connector asks for every message it sends)."""
        return _handoff_named(name)


@functools.lru_cache(maxsize=256)
def _handoff_named(name: str) -> HandoffSpec | None:
    if not name.startswith(HANDOFF_PREFIX):
        return None
    attribute, _, group = name.removeprefix(HANDOFF_PREFIX).partition(":")
    return HandoffSpec(attribute=attribute, subscription_group=group or None)


class StepSpec(_Strict):
    """One channel of the plan: a template, a text body with {column} fields, or a `handoff`
    of the customer to a CEP whose own journey sends (Braze through `braze_audience`).

    On WhatsApp a `body` is a free-form session message: policy lets it go only inside the
    customer's 24-hour care window (the audience must return `whatsapp_last_inbound_at`).
    """

    channel: Channel
    connector: str
    template: TemplateSpec | None = None
    body: str | None = None
    handoff: HandoffSpec | None = None
    template_code: str | None = Field(
        default=None,
        description="KakaoTalk AlimTalk only: the code of the Kakao-approved template whose "
        "registered text `body` is (its variables as {column} fields). Kakao checks the code "
        "and the rendered text against the template when the message is sent.",
    )

    @model_validator(mode="after")
    def _template_or_body(self) -> StepSpec:
        given = [x for x in (self.template, self.body, self.handoff) if x is not None]
        if len(given) != 1:
            raise ValueError(
                f"step '{self.channel}': give exactly one of `template`, `body` or `handoff`"
            )
        if self.channel in BODY_ONLY_CHANNELS and self.template is not None:
            raise ValueError(
                f"step '{self.channel}': {self.channel} has no provider-approved templates; "
                "give the message as `body` (with {column} fields)"
            )
        if self.channel == "kakao" and (self.body is None or not self.template_code):
            raise ValueError(
                "step 'kakao': KakaoTalk AlimTalk sends a Kakao-approved template: give its "
                "`template_code` and its registered text as `body` (variables as {column})"
            )
        if self.template_code is not None and self.channel != "kakao":
            raise ValueError(
                f"step '{self.channel}': `template_code` is for KakaoTalk AlimTalk only; give "
                "a `template` instead"
            )
        return self

    def variable_columns(self) -> list[str]:
        if self.template is not None:
            return list(self.template.variables)
        if self.handoff is not None:
            return list(self.handoff.properties)
        return _BODY_FIELD.findall(self.body or "")

    def message_name(self) -> str | None:
        """The template's name, a handoff's `audience:…` name, a KakaoTalk template code, or
        None for a text body."""
        if self.template is not None:
            return self.template.name
        if self.handoff is not None:
            return self.handoff.message_name()
        return self.template_code

    def message_language(self, decided_at: str) -> str | None:
        """What the ledger keeps beside `message_name`: a template's language, a handoff's
        attribute value (`decided_at`, the decision's time), `ko` for KakaoTalk, None for a
        text body."""
        if self.template is not None:
            return self.template.language
        if self.handoff is not None:
            return decided_at
        return "ko" if self.template_code else None


class FallbackSpec(_Strict):
    """When a message on another channel of the plan does not land, send this channel instead.

    A customer's send on any other channel of the plan falls back at once when it failed with
    a code meaning the customer cannot receive it there (`failure_codes`, by default each
    connector's `unreachable_codes`, e.g. Meta 131026); when it is not delivered (nor read)
    `not_delivered_within_minutes` after it was sent; or, if set, when it is delivered but not
    read within `not_read_within_hours`. The policy is applied again for the fallback channel
    (consent, suppression, quiet hours, caps) before anything is sent.
    """

    channel: Channel = Field(description="The plan's channel to fall back to, e.g. sms.")
    not_delivered_within_minutes: float = Field(
        default=30.0,
        description="Fall back when the message is not delivered this many minutes after it "
        "was sent (failed or unanswered ones included).",
    )
    failure_codes: list[str] | None = Field(
        default=None,
        description="Provider error codes that fall back at once; default: the connector's "
        "codes for 'this customer cannot receive it on this channel' (Meta 131026, …).",
    )
    not_read_within_hours: float | None = Field(
        default=None,
        description="Also fall back when a delivered message is not read within this many "
        "hours (off by default: the customer then gets two messages).",
    )

    @field_validator("not_delivered_within_minutes")
    @classmethod
    def _minutes(cls, value: float) -> float:
        if not 0 <= value <= 7 * 24 * 60:
            raise ValueError("not_delivered_within_minutes must be between 0 and 10080 (7 days)")
        return value

    @field_validator("not_read_within_hours")
    @classmethod
    def _hours(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 7 * 24:
            raise ValueError("not_read_within_hours must be between 0 and 168 (7 days)")
        return value


class ChannelPlanSpec(_Strict):
    """Ordered channels: each customer gets the first one they may lawfully receive; with a
    `fallback`, a customer whose message did not land is sent the fallback channel."""

    purpose: Purpose = "marketing"
    steps: list[StepSpec]
    fallback: FallbackSpec | None = None

    @model_validator(mode="after")
    def _distinct_channels(self) -> ChannelPlanSpec:
        if not self.steps:
            raise ValueError("a channel plan needs at least one step")
        channels = [s.channel for s in self.steps]
        if len(set(channels)) != len(channels):
            raise ValueError(f"each channel may appear once in the plan, got {channels}")
        for step in self.steps:
            if step.channel == "kakao" and self.purpose == "marketing":
                raise ValueError(
                    "KakaoTalk AlimTalk carries information only (orders, bookings, "
                    "deliveries), never advertising: a kakao step needs purpose transactional"
                )
            if step.template and step.template.category not in CATEGORIES_FOR_PURPOSE[self.purpose]:
                raise ValueError(
                    f"template {step.template.name!r} is category {step.template.category!r}, "
                    f"which a {self.purpose} activation may not use"
                )
        if self.fallback is not None:
            if any(step.handoff is not None for step in self.steps):
                raise ValueError(
                    "a plan with a `handoff` step cannot have a `fallback`: the CEP's journey "
                    "decides what follows a message it sends (no delivery report comes back)"
                )
            if self.fallback.channel not in channels:
                raise ValueError(
                    f"fallback.channel {self.fallback.channel!r} is not a channel of the plan "
                    f"({channels}): add a step for it (its connector and message are used)"
                )
            if len(channels) < 2:
                raise ValueError("a fallback needs another channel in the plan to fall back from")
        return self

    def step_for(self, channel: str) -> StepSpec:
        return next(step for step in self.steps if step.channel == channel)


class ScheduleSpec(_Strict):
    """When the activation runs by itself. Off until someone turns it on in the UI."""

    cron: str = "0 10 * * *"
    timezone: str = "UTC"
    enabled: bool = False


class LimitsSpec(_Strict):
    max_recipients: int | None = Field(
        default=None, description="Most recipients one run may message (None: no cap)."
    )
    max_audience_change: float = Field(
        default=10.0,
        description="Blocking check: the audience may be at most this many times larger (or "
        "smaller) than the last successful run's; a sudden 10x is a bug, not a campaign.",
    )

    @field_validator("max_recipients")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("max_recipients must be at least 1 (leave it out for no cap)")
        return value

    @field_validator("max_audience_change")
    @classmethod
    def _factor(cls, value: float) -> float:
        if value <= 1:
            raise ValueError("max_audience_change is a factor and must be above 1")
        return value


class AlertsSpec(_Strict):
    """When a run that succeeded is still reported as degraded (alerts/conditions.py); where
    alerts go is the deployment's (CDP_ALERT_*, docs/operations.md): none set, none sent."""

    max_failed_share: float = Field(
        default=0.05,
        description="Alert when more than this share of the messages a run's provider "
        "answered were failed.",
    )
    max_unknown_share: float = Field(
        default=0.01,
        description="Alert when more than this share of a run's answered messages are "
        "unknown (an answer lost: they may or may not have gone).",
    )
    max_dead_letter_share: float = Field(
        default=0.01,
        description="Alert when more than this share of the partition's messages are dead "
        "letters (given up on: past their send deadline).",
    )
    share_min_messages: int = Field(
        default=50,
        description="The failed, unknown and dead-letter shares are judged on at least this "
        "many messages (1 failed of 3 is no trend).",
    )
    audience_change: float = Field(
        default=0.5,
        description="Alert when the audience is more than this share above or below the median "
        "of the last `history_runs` runs' (the blocking check stops only a "
        "limits.max_audience_change jump).",
    )
    history_runs: int = Field(
        default=7, description="Earlier audiences the usual range is taken from."
    )
    min_rate_share: float = Field(
        default=0.2,
        description="Alert when a run sent at less than this share of the rate its connectors' "
        "limits allow (a provider slowing down, throttling, a stalled ledger).",
    )
    rate_min_messages: int = Field(
        default=1000,
        description="The rate is judged only on runs that sent at least this many messages "
        "(a small run's time is its start-up).",
    )
    fallback_backlog_min: int = Field(
        default=100,
        description="Alert when the first messages due a fallback and not yet decided number "
        "at least this many and grew at each of the last `fallback_backlog_checks` checks.",
    )
    fallback_backlog_checks: int = Field(
        default=3, description="How many checks in a row the backlog must grow (2 to 60)."
    )

    @field_validator(
        "max_failed_share", "max_unknown_share", "max_dead_letter_share", "min_rate_share"
    )
    @classmethod
    def _share(cls, value: float, info: ValidationInfo) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"{info.field_name} is a share: from 0 to 1, got {value}")
        return value

    @field_validator("audience_change")
    @classmethod
    def _change(cls, value: float) -> float:
        if not 0 < value < float("inf"):
            raise ValueError(f"audience_change is a share above 0 (0.5: ±50%), got {value}")
        return value

    @field_validator(
        "history_runs",
        "fallback_backlog_checks",
        "rate_min_messages",
        "fallback_backlog_min",
        "share_min_messages",
    )
    @classmethod
    def _count(cls, value: int, info: ValidationInfo) -> int:
        low, high = {"history_runs": (2, 100), "fallback_backlog_checks": (2, 60)}.get(
            info.field_name or "", (1, 10**9)
        )
        if not low <= value <= high:
            raise ValueError(f"{info.field_name} must be from {low} to {high}, got {value}")
        return value


_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class QuietHoursSpec(_Strict):
    """No message in the recipient's own night: they are deferred to `end`, not dropped."""

    enabled: bool = True
    start: str = Field(default="21:00", description="Local time quiet hours begin (HH:MM).")
    end: str = Field(default="09:00", description="Local time quiet hours end (HH:MM).")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"{value!r} is not a time of day like 21:00")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHoursSpec:
        if self.enabled and self.start == self.end:
            raise ValueError("quiet hours start and end are equal; disable them instead")
        return self


class FrequencyCapSpec(_Strict):
    """At most `max_messages` messages of `purpose` on `channel` per customer in `days` days,
    counted across every activation from the ledger."""

    purpose: Literal["marketing", "transactional", "any"] = "marketing"
    channel: Literal["whatsapp", "sms", "viber", "line", "kakao", "rcs", "wechat", "any"] = "any"
    max_messages: int = 1
    days: int = 7

    @model_validator(mode="after")
    def _positive(self) -> FrequencyCapSpec:
        if self.max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if not 1 <= self.days <= 90:
            raise ValueError("days must be between 1 and 90")
        return self


class HoldoutSpec(_Strict):
    """A stable control group: recorded in the ledger as `holdout`, never messaged."""

    share: float = Field(default=0.0, description="Share of eligible customers held out, 0-0.5.")
    salt: str | None = Field(default=None, description="Hash salt; default: the activation name.")

    @field_validator("share")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0.0 <= value <= 0.5:
            raise ValueError("holdout share must be between 0 and 0.5")
        return value


class VariantMessageSpec(_Strict):
    """A variant's own message on one channel of the plan: another template or text."""

    template: TemplateSpec | None = None
    body: str | None = None

    @model_validator(mode="after")
    def _one(self) -> VariantMessageSpec:
        if (self.template is None) == (self.body is None):
            raise ValueError("give exactly one of `template` or `body`")
        return self


class SendWindowSpec(_Strict):
    """Local hours a variant's messages may go out in; outside them they wait for `start`."""

    start: str = Field(description="Local time the window opens (HH:MM).")
    end: str = Field(description="Local time the window closes (HH:MM).")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"{value!r} is not a time of day like 18:00")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> SendWindowSpec:
        if self.start == self.end:
            raise ValueError("a send window's start and end must differ")
        return self


_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class VariantSpec(_Strict):
    """One arm of an experiment: the plan as written, or with its own messages, channel order
    or send window; or the holdout, recorded and never messaged."""

    name: str = Field(description="Lower-case letters, digits, - and _ (at most 40).")
    weight: float = Field(description="Relative share of newly assigned customers, above 0.")
    holdout: bool = Field(
        default=False, description="The control group: assigned and recorded, never messaged."
    )
    messages: dict[Channel, VariantMessageSpec] = Field(
        default_factory=dict,
        description="Per channel of the plan, this variant's template or text instead.",
    )
    channel_order: list[Channel] | None = Field(
        default=None, description="The plan's channels in another order (all of them)."
    )
    send_window: SendWindowSpec | None = Field(
        default=None, description="Local hours this variant's messages may go out in."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _VARIANT_NAME.match(value):
            raise ValueError(
                f"variant name {value!r}: use lower-case letters, digits, - and _ (at most 40)"
            )
        return value

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not 0 < value < float("inf"):
            raise ValueError("a variant's weight must be a number above 0")
        return value

    @model_validator(mode="after")
    def _holdout_sends_nothing(self) -> VariantSpec:
        if self.holdout and (self.messages or self.channel_order or self.send_window):
            raise ValueError(
                f"variant {self.name!r} is the holdout: it sends nothing, so it takes no "
                "messages, channel_order or send_window"
            )
        return self


class ExperimentSpec(_Strict):
    """A/B/n variants of the activation. Each customer is assigned once, by a stable hash of
    their id and the `salt`, recorded in the ledger and kept: changing the weights or the
    audience moves only customers never assigned before."""

    salt: str | None = Field(
        default=None,
        description="Hash salt; default: the activation's name. A new salt starts a new "
        "experiment for customers not yet assigned.",
    )
    variants: list[VariantSpec]
    conversion_sql: str | None = Field(
        default=None,
        description="SQL returning conversions (customer_id, converted_at) for the results "
        "asset; relative to the project root. It may bind :start and :end.",
    )
    conversion_window_days: int = Field(
        default=7, description="A conversion counts within this many days of the decision."
    )

    @model_validator(mode="after")
    def _variants(self) -> ExperimentSpec:
        names = [v.name for v in self.variants]
        if len(names) < 2:
            raise ValueError("an experiment needs at least two variants")
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ, got {names}")
        if all(v.holdout for v in self.variants):
            raise ValueError("an experiment needs a variant that sends")
        if not 1 <= self.conversion_window_days <= 90:
            raise ValueError("conversion_window_days must be between 1 and 90")
        return self


class PolicySpec(_Strict):
    """Per-activation policy settings; every field has a safe default."""

    quiet_hours: QuietHoursSpec = Field(default_factory=QuietHoursSpec)
    frequency_caps: list[FrequencyCapSpec] = Field(
        default_factory=lambda: [FrequencyCapSpec()],
        description="Default: at most 1 marketing message per customer per 7 days.",
    )
    holdout: HoldoutSpec = Field(default_factory=HoldoutSpec)
    country_channels: dict[str, list[Channel]] = Field(
        default_factory=dict,
        description="Per-country channel order overriding the plan's, e.g. UA: [viber, sms].",
    )
    mobile_only: list[Channel] = Field(
        default_factory=lambda: list[Channel](["sms"]),
        description="Channels that need a mobile number (a fixed line cannot take an SMS).",
    )
    whatsapp_marketing_blocked_countries: list[str] = Field(
        default_factory=lambda: ["US"],
        description="Countries where WhatsApp delivers no marketing templates (Meta stopped "
        "delivering them to US numbers): their customers go to the plan's next channel.",
    )

    @field_validator("whatsapp_marketing_blocked_countries")
    @classmethod
    def _blocked(cls, value: list[str]) -> list[str]:
        for country in value:
            if not re.match(r"^[A-Z]{2}$", country):
                raise ValueError(f"{country!r} is not an ISO-3166 alpha-2 country code")
        return value

    @field_validator("country_channels")
    @classmethod
    def _countries(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for country, channels in value.items():
            if not re.match(r"^[A-Z]{2}$", country):
                raise ValueError(f"{country!r} is not an ISO-3166 alpha-2 country code")
            if not channels:
                raise ValueError(f"country {country}: give at least one channel")
        return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    """`90m`, `24h`, `2d`, `30s` (or a timedelta) as a positive timedelta."""
    if isinstance(value, timedelta):
        duration = value
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration: write e.g. 30m, 24h or 2d")
        duration = timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    if duration <= timedelta(0):
        raise ValueError(f"{value!r}: a duration must be greater than 0")
    return duration


def check_workers(value: int) -> int:
    """A number of claim workers: at least 1, at most CDP_DELIVERY_MAX_WORKERS."""
    from cdp_activation.settings import get_settings

    most = get_settings().delivery_max_workers
    if not 1 <= value <= most:
        raise ValueError(f"must be between 1 and {most} (CDP_DELIVERY_MAX_WORKERS), got {value}")
    return value


class DeliverySpec(_Strict):
    """How sends that may or may not have reached the provider are treated."""

    max_send_delay: str = Field(
        default="24h",
        description="How long a message may wait to leave (provider outages, retries, "
        "deferrals) after it was first due: past it, it ends `dead_letter` with reason "
        "`send_deadline_passed` instead of going out late (a win-back that cannot leave within "
        "a day is pointless). Written like 90m, 24h or 2d.",
    )

    @field_validator("max_send_delay")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value.strip()

    def send_deadline(self) -> timedelta:
        """`max_send_delay` as a timedelta."""
        return parse_duration(self.max_send_delay)

    workers: int = Field(
        default=1,
        description="Claim workers the deliveries (and fallback) step fans out into, each "
        "claiming batches from the ledger until none are due, as separate Dagster steps (the "
        "multiprocess executor on one machine, the Celery executor across machines; "
        "docs/scaling.md). 1, the default, sends from the step's own process. More than 1 "
        "needs a PostgreSQL ledger to be worth it. At most CDP_DELIVERY_MAX_WORKERS (32).",
    )

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        return check_workers(value)

    in_flight: int | None = Field(
        default=None,
        description="Requests each claim worker keeps in the air at once (per connector); "
        "empty: CDP_DELIVERY_CONCURRENCY (32). One-recipient providers at a high latency "
        "send at most in_flight / latency messages a second per worker: raise it there, "
        "within the provider's rate limit. A run can choose another (Launchpad, --in-flight).",
    )

    @field_validator("in_flight")
    @classmethod
    def _in_flight(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 1024:
            raise ValueError("in_flight must be between 1 and 1024")
        return value

    resend_unknown: bool = Field(
        default=False,
        description="Send `unknown` rows again (a request whose answer was lost, or a run "
        "killed mid-request, through a provider without an idempotency key). The customer may "
        "get the message twice; off by default. Idempotent providers never need it.",
    )


class EventsSpec(_Strict):
    """An event-driven activation: a sensor looks for new events every `interval_seconds` and
    runs the windows of `window_minutes` (the partitions) they fall in, so a customer is
    messaged minutes after the event, once per window (the ledger's key), never after
    `max_event_age`."""

    sql: str = Field(
        description="SQL returning one row, `first_event_at`, `last_event_at` and "
        "`loaded_until`: the earliest and latest event times and the latest load time of the "
        "events loaded after `:since` (NULLs when there are none). Relative to the root."
    )
    window_minutes: int = Field(
        default=15, description="Length of each partition (a divisor of 60), in minutes."
    )
    interval_seconds: int = Field(
        default=60, description="How often the sensor looks for new events (at least 30 s)."
    )
    max_event_age: str = Field(
        default="1h",
        description="Events older than this are not activated (a window that ended longer "
        "ago is not run again); also the activation's deadline to send (delivery."
        "max_send_delay defaults to it). Written like 45m or 1h.",
    )
    enabled: bool = Field(default=False, description="Start the sensor with the code location.")

    @field_validator("window_minutes")
    @classmethod
    def _window(cls, value: int) -> int:
        if value < 1 or 60 % value:
            raise ValueError(
                "window_minutes must divide 60: 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60"
            )
        return value

    @field_validator("interval_seconds")
    @classmethod
    def _interval(cls, value: int) -> int:
        if not 30 <= value <= 3600:
            raise ValueError("interval_seconds must be between 30 and 3600")
        return value

    @field_validator("max_event_age")
    @classmethod
    def _age(cls, value: str) -> str:
        parse_duration(value)
        return value.strip()

    def event_age(self) -> timedelta:
        return parse_duration(self.max_event_age)


class ActivationSpec(_Strict):
    """Everything one activation declares: audience, channel plan, schedule and limits."""

    description: str = ""
    owner: str = ""
    audience: AudienceSpec
    channel_plan: ChannelPlanSpec
    suppression_sql: str = Field(
        default="sql/policy/suppressions.sql",
        description="SQL returning the suppression list (phone, channel); relative to the root.",
    )
    partitions_start_date: str = "2026-01-01"
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    delivery: DeliverySpec = Field(default_factory=DeliverySpec)
    events: EventsSpec | None = Field(
        default=None,
        description="Event-driven instead of daily: window partitions run by a sensor "
        "(abandoned carts within the hour).",
    )
    priority: int | None = Field(
        default=None,
        description="Takes part in the daily cap across activations (CDP_DAILY_CAP): a "
        "customer in several prioritised activations' audiences on a day gets the highest "
        "priority's message (a higher number wins; equal: the first name). None: not capped.",
    )
    experiment: ExperimentSpec | None = Field(
        default=None,
        description="A/B/n variants with weights and a holdout; lift measured by its "
        "conversion_sql (`<name>/results`).",
    )
    alerts: AlertsSpec = Field(
        default_factory=AlertsSpec,
        description="Thresholds of the degraded-run alerts (sent where CDP_ALERT_* point).",
    )

    def send_deadline(self) -> timedelta:
        """How long a message may wait to leave: `delivery.max_send_delay`, or for an
        event-driven activation that does not set it, its `events.max_event_age`."""
        if self.events is not None and "max_send_delay" not in self.delivery.model_fields_set:
            return self.events.event_age()
        return self.delivery.send_deadline()

    @property
    def window_minutes(self) -> int | None:
        """Minutes per partition for an event-driven activation; None: daily partitions."""
        return self.events.window_minutes if self.events is not None else None

    @model_validator(mode="after")
    def _routes_use_plan_channels(self) -> ActivationSpec:
        planned = {step.channel for step in self.channel_plan.steps}
        for country, channels in self.policy.country_channels.items():
            unknown = [c for c in channels if c not in planned]
            if unknown:
                raise ValueError(
                    f"policy.country_channels.{country} uses {unknown}, which the channel plan "
                    f"does not have (plan: {sorted(planned)})"
                )
        return self

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 1000:
            raise ValueError("priority must be between 0 and 1000")
        return value

    @model_validator(mode="after")
    def _variants_fit_the_plan(self) -> ActivationSpec:
        if self.experiment is None:
            return self
        plan = self.channel_plan
        channels = [step.channel for step in plan.steps]
        if self.policy.holdout.share > 0:
            raise ValueError(
                "experiment: give the holdout as a variant (`holdout: true` with its weight), "
                "not as policy.holdout.share"
            )
        for variant in self.experiment.variants:
            where = f"experiment.variants.{variant.name}"
            order = variant.channel_order
            if order is not None and sorted(order) != sorted(channels):
                raise ValueError(
                    f"{where}.channel_order {order} must list the plan's channels {channels} "
                    "once each, in the variant's order"
                )
            for channel, message in variant.messages.items():
                if channel not in channels:
                    raise ValueError(
                        f"{where}.messages.{channel}: the plan has no {channel} step "
                        f"(plan: {channels})"
                    )
                if plan.fallback is not None and channel == plan.fallback.channel:
                    raise ValueError(
                        f"{where}.messages.{channel}: {channel} is the plan's fallback, which "
                        "sends the plan's own message; change it in channel_plan"
                    )
                step = plan.step_for(channel)
                kind = "template" if message.template is not None else "body"
                own = "handoff" if step.handoff else "template" if step.template else "body"
                if kind != own or step.template_code is not None:
                    raise ValueError(
                        f"{where}.messages.{channel}: the plan's {channel} step sends a {own}; "
                        f"the variant must give a {own} too"
                    )
                category = message.template.category if message.template else None
                if category and category not in CATEGORIES_FOR_PURPOSE[plan.purpose]:
                    raise ValueError(
                        f"{where}.messages.{channel}: template category {category!r} is not "
                        f"allowed for a {plan.purpose} activation"
                    )
        return self

    @field_validator("partitions_start_date")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        date.fromisoformat(value)
        return value

    def connectors(self) -> list[str]:
        return [step.connector for step in self.channel_plan.steps]
