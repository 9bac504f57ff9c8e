"""`quick_init`: the message records keep every behaviour of a frozen dataclass, and a class it
cannot make so is refused when it is defined."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from cdp_activation.connectors.base import OutboundMessage, TemplateRef
from cdp_activation.contracts import Outcome, SendResult
from cdp_activation.frozen_records import quick_init
from cdp_activation.ledger.records import PlannedSend, Settlement

RECORDS = {
    PlannedSend: ((7, "k", "whatsapp", "meta_whatsapp", "+447911123456", {"a": 1}, 1), {}),
    Settlement: ((7, "sent"), {"provider_message_id": "wamid.1", "uncertain": True}),
    SendResult: (("k", Outcome.SENT), {"provider_message_id": "wamid.1"}),
    TemplateRef: (("winback", "en", ("Ana",)), {}),
    OutboundMessage: (("k", "+447911123456", "sms"), {"body": "Hi", "reference": "cdp-7"}),
}


def _as_dataclass_made_it(cls: type) -> type:
    """The same fields as a frozen dataclass of dataclass's own making."""
    return dataclass(frozen=True)(
        type(cls.__name__, (), {"__annotations__": dict(cls.__annotations__)} | _defaults(cls))
    )


def _defaults(cls: type) -> dict:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


@pytest.mark.parametrize("cls", list(RECORDS), ids=lambda c: c.__name__)
def test_a_record_behaves_as_the_frozen_dataclass_it_is(cls: type) -> None:
    args, kwargs = RECORDS[cls]
    plain = _as_dataclass_made_it(cls)
    record, same = cls(*args, **kwargs), cls(*args, **kwargs)

    assert inspect.signature(cls.__init__) == inspect.signature(plain.__init__)
    assert dataclasses.asdict(record) == dataclasses.asdict(plain(*args, **kwargs))
    assert record == same
    if cls is not PlannedSend:  # which holds a dict: unhashable, as a dataclass's would be
        assert hash(record) == hash(same)
    assert repr(record).startswith(f"{cls.__name__}(")
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, first, None)
    changed = dataclasses.replace(record, **{first: getattr(record, first)})
    assert changed == record and changed is not record
    with pytest.raises(TypeError):
        cls()  # the required fields are still required


def test_defaults_are_the_declared_ones() -> None:
    settled = Settlement(1, "planned", not_before=datetime(2026, 12, 6, tzinfo=UTC))
    assert (settled.unsent, settled.deferred, settled.error_code) == (False, False, None)
    assert TemplateRef("t", "en").parameters == ()


@pytest.mark.parametrize(
    "make",
    [
        lambda: dataclass(type("Plain", (), {"__annotations__": {"a": "int"}})),
        lambda: dataclass(frozen=True, slots=True)(
            type("Slotted", (), {"__annotations__": {"a": "int"}})
        ),
        lambda: dataclass(frozen=True)(
            type(
                "Factory", (), {"__annotations__": {"a": "list"}, "a": field(default_factory=list)}
            )
        ),
        lambda: dataclass(frozen=True)(
            type("KeywordOnly", (), {"__annotations__": {"a": "int"}, "a": field(kw_only=True)})
        ),
        lambda: dataclass(frozen=True)(
            type(
                "Checked",
                (),
                {"__annotations__": {"a": "int"}, "__post_init__": lambda self: None},
            )
        ),
    ],
    ids=["not frozen", "slots", "default factory", "keyword-only", "post-init"],
)
def test_a_class_it_cannot_make_so_is_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="quick_init"):
        quick_init(make())
