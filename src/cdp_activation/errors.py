"""The root of every error cdp-activation raises on purpose, and its two kinds.

`CdpError.transient` says what an operator (or a scheduler) should do about it:
- terminal (False): trying again changes nothing until something is fixed — a setting, the
  audience SQL, a template, a credential. The message names what and where.
- transient (True): the same run may succeed later — a provider down, a rate limiter not
  answering, a run interrupted, a partition busy. Nothing was lost: what was not sent stays
  planned in the ledger.

The CLI prints any of them as one line (the traceback with `cdp-activation --debug`) and
exits 1 for a terminal one, 75 (EX_TEMPFAIL) for a transient one, so a scheduler can tell
"fix it" from "retry"; an exception that is not a `CdpError` is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


class CdpError(Exception):
    """Base of the project's own errors (see the module doc)."""

    transient: ClassVar[bool] = False

    @property
    def kind(self) -> str:
        return "transient" if self.transient else "terminal"


class ConnectorError(CdpError):
    """Base class of errors that stop a whole activation, not just one recipient; by
    default transient (the provider may answer later), terminal where a subclass says so.

    Raised from a connector's `send_batch`, it says the provider took none of the batch's
    messages, unless `answered` holds what it did answer for some of them before it refused
    the rest (a batch sent as one request per channel, of which a later one is refused; a stop
    read among per-message statuses): the delivery engine records those answers as any
    other, so an accepted message is never taken for unsent and sent again."""

    transient: ClassVar[bool] = True
    answered: tuple[Any, ...] = ()  # `SendResult`s, set by the connector that raises

    def after(self, results: Iterable[Any]) -> ConnectorError:
        """This error, with answers received before it (`results`) put ahead of its own
        (returned, for `raise err.after(results)` outside an `except`)."""
        self.answered = (*results, *self.answered)
        return self


class CredentialsError(ConnectorError):
    """The provider refused our credentials (401/403, Meta code 190, Twilio 20003)."""

    transient: ClassVar[bool] = False


class TemplateError(ConnectorError):
    """The template itself is wrong (missing, not approved, wrong parameters): stop sending."""

    transient: ClassVar[bool] = False


class ConnectorConfigError(ConnectorError):
    """A connector is configured wrongly (missing base URL, sender id or credential)."""

    transient: ClassVar[bool] = False


class SettingsError(CdpError, ValueError):
    """Settings that make no sense, refused before anything is planned or sent: one line
    naming each variable, what it must be and what it means. Never holds a secret's value."""


def cdp_error_in(err: BaseException) -> CdpError | None:
    """The first `CdpError` in `err`'s chain of causes (Dagster wraps what a step raised)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, CdpError):
            return cause
        seen.add(id(cause))
        # `raise … from None` hides the context: what it replaced is not this error's cause.
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


EX_TEMPFAIL = 75  # the exit status of a transient error: try again later (sysexits.h)
