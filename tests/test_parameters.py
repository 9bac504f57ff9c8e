"""Audience parameters keep their types wherever they are stored."""

from __future__ import annotations


def test_audience_parameters_are_stored_typed_and_come_back_the_same() -> None:
    """The fallback reads the partition's parameters back from the audience's metadata: a
    boolean stored as the text "True" used to fail there (issue 16, item 3)."""
    import json
    from datetime import date

    from cdp_activation.spec import coerce_parameter, storable_parameters

    given = {"vip_only": True, "threshold": 0.7, "days": 30, "since": date(2026, 1, 31), "c": "GB"}
    kinds = {"vip_only": "bool", "threshold": "float", "days": "int", "since": "date", "c": "str"}
    stored = json.loads(json.dumps(storable_parameters(given)))
    assert {k: coerce_parameter(kinds[k], v) for k, v in stored.items()} == given
