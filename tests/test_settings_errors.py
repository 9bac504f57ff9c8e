"""Settings that make no sense are refused at start: one line naming the variable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dagster as dg
import pytest
from pydantic import ValidationError

from cdp_activation.components.resources import connector_resource
from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import SettingsError, get_settings, project_root
from conftest import cli_project

ROOT = project_root()
BIN = Path(sys.executable).parent
RATE_HINT = "(messages per second; unset it to use the connector's default)"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CDP_* from the caller's shell, and no `.env` from the working directory."""
    for name in list(os.environ):
        if name.startswith("CDP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        get_settings()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_negative_rate_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, CDP_META_RATE_PER_SECOND="-5")
    assert message == f"CDP_META_RATE_PER_SECOND=-5: must be greater than 0 {RATE_HINT}"


@pytest.mark.parametrize(
    "variable",
    [
        "CDP_META_RATE_PER_SECOND",
        "CDP_TWILIO_RATE_PER_SECOND",
        "CDP_INFOBIP_RATE_PER_SECOND",
        "CDP_VONAGE_RATE_PER_SECOND",
        "CDP_BRAZE_RATE_PER_SECOND",
        "CDP_LINE_RATE_PER_SECOND",
        "CDP_WEBHOOK_RATE_PER_SECOND",
    ],
)
def test_a_zero_rate_is_refused_not_taken_as_the_default(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    message = refusal(monkeypatch, **{variable: "0"})
    assert message == f"{variable}=0: must be greater than 0 {RATE_HINT}"


def test_a_rate_that_is_not_a_finite_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert refusal(monkeypatch, CDP_TWILIO_RATE_PER_SECOND="inf").startswith(
        "CDP_TWILIO_RATE_PER_SECOND=inf: must be a finite number"
    )
    assert refusal(monkeypatch, CDP_TWILIO_RATE_PER_SECOND="fast").startswith(
        "CDP_TWILIO_RATE_PER_SECOND=fast: must be a valid number"
    )


def test_zero_concurrency_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, CDP_DELIVERY_CONCURRENCY="0")
    expected = "CDP_DELIVERY_CONCURRENCY=0: must be greater than 0 (requests in flight at once)"
    assert message == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "must be greater than 0"),
        ("-1", "must be greater than 0"),
        ("two", "must be a valid integer"),
        ("2.5", "must be a valid integer"),
    ],
)
def test_a_bad_attempt_count_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    message = refusal(monkeypatch, CDP_DELIVERY_MAX_ATTEMPTS=value)
    assert message.startswith(f"CDP_DELIVERY_MAX_ATTEMPTS={value}: {problem}")
    assert message.endswith("(tries per message, the first one included)")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CDP_DELIVERY_LEASE_SECONDS", "0"),
        ("CDP_WEBHOOK_BATCH_SIZE", "0"),
        ("CDP_PREVIEW_VALID_HOURS", "-1"),
        ("CDP_PREVIEW_MAX_CHANGE", "-0.1"),
        ("CDP_CONFIRM_ABOVE", "-1"),
        ("CDP_SANDBOX_PORT", "0"),
        ("CDP_WEBHOOKS_PORT", "70000"),
    ],
)
def test_other_numbers_that_make_no_sense_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    assert refusal(monkeypatch, **{variable: value}).startswith(f"{variable}={value}: must be ")


def test_every_bad_setting_is_named_on_the_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(monkeypatch, CDP_META_RATE_PER_SECOND="-5", CDP_DELIVERY_CONCURRENCY="0")
    assert "CDP_META_RATE_PER_SECOND=-5: must be greater than 0" in message
    assert "CDP_DELIVERY_CONCURRENCY=0: must be greater than 0" in message


def test_sane_values_and_the_defaults_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert settings.delivery_concurrency == 32
    assert settings.delivery_max_attempts == 4
    assert settings.delivery_lease_seconds == 30.0
    assert settings.meta_rate_per_second is None  # unset: the connector's default
    for name, value in {
        "CDP_DELIVERY_CONCURRENCY": "8",
        "CDP_DELIVERY_MAX_ATTEMPTS": "1",
        "CDP_DELIVERY_LEASE_SECONDS": "2.5",
        "CDP_META_RATE_PER_SECOND": "0.5",
        "CDP_CONFIRM_ABOVE": "0",  # every send needs a preview
        "CDP_PREVIEW_MAX_CHANGE": "0",  # the send must match its preview exactly
    }.items():
        monkeypatch.setenv(name, value)
    settings = get_settings()
    assert (settings.delivery_concurrency, settings.delivery_max_attempts) == (8, 1)
    assert settings.delivery_lease_seconds == 2.5
    assert settings.meta_rate_per_second == 0.5
    assert (settings.confirm_above, settings.preview_max_change) == (0, 0.0)


def test_an_empty_value_is_unset_so_env_example_works_as_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())  # cwd is tmp_path
    settings = get_settings()
    assert settings.meta_rate_per_second is None and settings.webhook_headers is None
    monkeypatch.setenv("CDP_TWILIO_RATE_PER_SECOND", "")
    assert get_settings().twilio_rate_per_second is None
    monkeypatch.setenv("CDP_TWILIO_RATE_PER_SECOND", "-1")  # the environment wins over .env
    assert refusal(monkeypatch).startswith("CDP_TWILIO_RATE_PER_SECOND=-1: must be greater")


def test_a_secret_s_value_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "Bearer s3cr3t-do-not-print"
    for raw in (f'{{"Authorization": ["{secret}"]}}', f"{{not json {secret}"):
        monkeypatch.setenv("CDP_WEBHOOK_HEADERS", raw)
        with pytest.raises(SettingsError) as info:
            get_settings()
        error = info.value
        assert str(error).startswith("CDP_WEBHOOK_HEADERS")
        assert "not shown" in str(error)
        # Nor in what a traceback or a Dagster run's log would print.
        assert error.__cause__ is None and error.__context__ is None
        assert "s3cr3t" not in str(error) and "s3cr3t" not in repr(error)


def test_connector_resources_refuse_the_same_values_from_the_launchpad() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        connector_resource("meta_whatsapp")(
            base_url="http://127.0.0.1:1/meta", phone_number_id="1", waba_id="2", rate_per_second=0
        )
    with pytest.raises(ValidationError, match="greater than 0"):
        connector_resource("webhook")(url="http://127.0.0.1:1/hook", batch_size=0)


def test_the_cli_prints_the_one_line_when_dagster_wraps_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from cdp_activation.cli import main as cli
    from cdp_activation.cli import validation

    def load(_root: Path) -> None:
        try:
            get_settings()
        except SettingsError as err:
            raise RuntimeError("Error while building definitions for activations/x") from err

    monkeypatch.setenv("CDP_DELIVERY_CONCURRENCY", "0")
    monkeypatch.setattr(validation, "validate_project", load)
    result = CliRunner().invoke(cli.main, ["validate"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Error: CDP_DELIVERY_CONCURRENCY=0: must be greater than 0 (requests in flight at once)"
    ]


def test_a_dagster_run_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cdp_activation.cli.runner import run_activation

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CDP_META_RATE_PER_SECOND", "-5")
    with dg.instance_for_test() as instance:
        # Loading the definitions refuses them (Dagster wraps the error with the component
        # that read the settings): no run starts, so nothing is read, planned or sent.
        with pytest.raises(Exception) as info:
            run_activation("winback_whatsapp", "2026-12-01", instance=instance)
        causes: list[BaseException] = [info.value]
        while (cause := causes[-1].__cause__ or causes[-1].__context__) is not None:
            causes.append(cause)
        refused = [c for c in causes if isinstance(c, SettingsError)]
        assert refused and str(refused[0]).startswith("CDP_META_RATE_PER_SECOND=-5: must be")
        assert instance.get_runs() == []


@pytest.mark.e2e
def test_the_cli_refuses_a_negative_rate_in_one_line_and_writes_nothing(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox)
    ledger, home, cli = project.ledger_file, project.home, project.run

    for command in ("run", "preview"):
        result = cli(command, "winback_whatsapp", CDP_META_RATE_PER_SECOND="-5")
        assert result.returncode != 0
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            f"Error: CDP_META_RATE_PER_SECOND=-5: must be greater than 0 {RATE_HINT}"
        ], result.stderr
    assert not ledger.exists()  # nothing planned, not even a ledger created
    assert sandbox.messages() == []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs() == []  # no Dagster run was even started

    secret = cli(
        "run",
        "winback_whatsapp",
        CDP_DELIVERY_CONCURRENCY="0",
        CDP_WEBHOOK_HEADERS='{"Authorization": ["Bearer s3cr3t"]}',
    )
    assert secret.returncode != 0
    [line] = secret.stderr.splitlines()
    assert "CDP_DELIVERY_CONCURRENCY=0: must be greater than 0" in line
    assert "CDP_WEBHOOK_HEADERS['Authorization']: must be a valid string" in line
    assert "s3cr3t" not in secret.stderr + secret.stdout

    # The same command with a sane rate does send: the refusal above is what stopped it.
    # The whole day: at 03:00-03:30 UTC every customer of the small demo is in quiet hours.
    whole_day = ("--send-window", "00:00-23:59")
    sent = cli("run", "winback_whatsapp", *whole_day, "--json", CDP_META_RATE_PER_SECOND="500")
    assert sent.returncode == 0, sent.stderr[-2000:] + sent.stdout[-2000:]
    assert sandbox.messages()


def test_a_duckdb_memory_limit_that_is_not_a_size_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = refusal(monkeypatch, CDP_DUCKDB_MEMORY_LIMIT="lots")
    assert message.startswith("CDP_DUCKDB_MEMORY_LIMIT=lots: ")
    monkeypatch.setenv("CDP_DUCKDB_MEMORY_LIMIT", "512MiB")
    assert get_settings().duckdb_memory_limit == "512MiB"


def test_settings_are_read_again_whenever_what_they_come_from_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A process keeps the settings it read (loading the definitions asks ~30 times), yet
    every change of a CDP_ variable (in any case), of DAGSTER_HOME, of the working directory
    or of its `.env` is seen at the next call; and a caller changing its copy changes nobody
    else's."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    first = get_settings()
    assert first.delivery_concurrency == 32
    assert first.ledger_url == f"sqlite:///{tmp_path / 'home' / 'ledger.sqlite'}"
    first.delivery_concurrency = 7  # the caller's own copy
    assert get_settings().delivery_concurrency == 32

    monkeypatch.setenv("CDP_DELIVERY_CONCURRENCY", "64")
    assert get_settings().delivery_concurrency == 64
    monkeypatch.delenv("CDP_DELIVERY_CONCURRENCY")
    monkeypatch.setenv("cdp_delivery_concurrency", "65")  # pydantic-settings ignores case
    assert get_settings().delivery_concurrency == 65
    monkeypatch.delenv("cdp_delivery_concurrency")
    assert get_settings().delivery_concurrency == 32

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "other"))
    assert get_settings().ledger_url == f"sqlite:///{tmp_path / 'other' / 'ledger.sqlite'}"

    dotenv = tmp_path / ".env"
    dotenv.write_text("CDP_DELIVERY_CONCURRENCY=16\n")
    assert get_settings().delivery_concurrency == 16
    dotenv.write_text("CDP_DELIVERY_CONCURRENCY=17\n")  # same size, maybe the same instant
    os.utime(dotenv, ns=(1, 1))
    assert get_settings().delivery_concurrency == 17
    dotenv.write_text("CDP_DELIVERY_CONCURRENCY=abc\n")
    with pytest.raises(SettingsError, match="CDP_DELIVERY_CONCURRENCY"):
        get_settings()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no `.env` here
    assert get_settings().delivery_concurrency == 32
