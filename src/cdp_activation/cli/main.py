"""The `cdp-activation` command line: demo, run, validate, sandbox, dev, webhooks."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from cdp_activation import heap
from cdp_activation.errors import EX_TEMPFAIL, cdp_error_in
from cdp_activation.plugins import plugins, status_routes
from cdp_activation.settings import SANDBOX_PORT, get_settings, project_root

console = Console(stderr=True)
_OWN_PROCESS = False  # the command runs in a process of its own (`entry`), not in a caller's


def entry(args: list[str] | None = None, **options: Any) -> Any:
    """The `cdp-activation` command and `python -m cdp_activation.cli.main`: the process is
    the command's own, so its start-up may set the collector for it (heap.py). A program
    that calls `main` itself keeps its collector as it is."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    return main(args, **options)


def _start_up() -> None:
    """The collector off until the command's start-up ends, in a process of its own."""
    if _OWN_PROCESS:
        heap.start_up()


class _Main(click.Group):
    """Any of the project's errors (`errors.CdpError`: bad settings, SQL, templates,
    credentials, a provider down) ends a command with one line, not a traceback, also when
    Dagster wraps it; `--debug` shows the traceback. Anything else is a bug: traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise  # already the one line (and exit status) a command chose
        except Exception as err:
            cause = cdp_error_in(err)
            if cause is None or (ctx.obj or {}).get("debug"):
                raise
            code = EX_TEMPFAIL if cause.transient else 1
            if (ctx.obj or {}).get("json_logs"):  # the one line, as JSON like the others
                logging.getLogger("cdp_activation.cli").error(
                    str(cause), extra={"event": "error", "exit_code": code}
                )
                raise click.exceptions.Exit(code) from None
            failure = click.ClickException(str(cause))
            failure.exit_code = code  # type: ignore[misc]
            raise failure from None
        finally:
            # A command that failed before its definitions loaded (bad settings, a busy
            # activation) leaves no collector off behind it, e.g. in a caller's process.
            heap.started()


@click.group(
    cls=_Main,
    help="Activate warehouse audiences on WhatsApp, SMS and more, safely, with Dagster.",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an error, not one line.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    from cdp_activation import logs

    ctx.obj = {"debug": debug}
    # CDP_LOG_FORMAT=json: JSON lines (batches, run summaries, errors) on stderr, the
    # console's words for people among them, a line each. It and CDP_METRICS_DIR may be in
    # .env, read before anything reads them.
    from cdp_activation.settings import export_dotenv

    export_dotenv()
    if logs.configure():
        ctx.obj["json_logs"] = True
        console.file = logs.LinesToLog(logging.getLogger("cdp_activation.cli"))  # type: ignore[assignment]
        console.soft_wrap = True


# ---------------------------------------------------------------- demo


@main.command(help="Build the demo warehouse, start the sandbox, run winback_whatsapp for today.")
@click.option("--customers", default=100_000, show_default=True, help="Demo warehouse size.")
@click.option("--seed", default=42, show_default=True, help="Seed of the demo data.")
@click.option("--port", default=SANDBOX_PORT, show_default=True, help="Sandbox port.")
@click.option("--dry-run", is_flag=True, help="Preview only: send nothing.")
@click.option(
    "--send-window",
    metavar="HH:MM-HH:MM",
    help="Local hours messages may go out (default: the activation's quiet hours apply: at "
    "03:00 UTC in winter every demo customer is asleep and every message waits).",
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of the summary.")
@click.option(
    "--live",
    is_flag=True,
    help="Instead: keep appending abandoned carts to the demo warehouse (cart_events), for "
    "the abandoned_cart activation's sensor (make dev) to react to.",
)
@click.option(
    "--activate",
    is_flag=True,
    help="With --live: also run abandoned_cart here, as its sensor would (every minute, the "
    "windows new events fall in), against the sandbox.",
)
@click.option(
    "--events-per-minute", default=12.0, show_default=True, help="With --live: carts a minute."
)
@click.option(
    "--minutes",
    type=float,
    default=None,
    help="With --live: stop after this long (default: until Ctrl-C).",
)
@click.option(
    "--experiment",
    is_flag=True,
    help="Instead of winback_whatsapp, run winback_experiment (three arms, one a holdout), "
    "simulate the customers' orders of the following week, and print its results.",
)
def demo(
    customers: int,
    seed: int,
    port: int,
    dry_run: bool,
    send_window: str | None,
    as_json: bool,
    live: bool,
    activate: bool,
    events_per_minute: float,
    minutes: float | None,
    experiment: bool,
) -> None:
    if live:
        _live_demo(customers, seed, port, activate, events_per_minute, minutes)
        return
    _start_up()  # for the imports (heap.py)
    from cdp_activation.audience.warehouse import duckdb_path
    from cdp_activation.cli.runner import (
        ensure_dagster_home,
        load_definitions,
        run_activation,
        run_fallback,
        today_partition,
    )
    from cdp_activation.demo.data import generate_demo_warehouse

    started = time.perf_counter()
    activation = "winback_experiment" if experiment else "winback_whatsapp"
    if experiment and send_window is None:
        # Every arm sends now, whatever the hour: results need sent customers beside the
        # held-out ones, and the demo's customers live in every time zone.
        send_window = "00:00-23:59"
        console.print("demo --experiment: quiet hours lifted (--send-window 00:00-23:59)")
    window = _window(send_window)
    # The demo runs against the local sandbox, with its published credentials: say so.
    os.environ["CDP_SANDBOX"] = "1"
    home = ensure_dagster_home()
    queue = _queue()  # each run waits behind any other run of the activation, and says so
    settings = get_settings()
    path = duckdb_path(settings.warehouse_url) or home / "demo_warehouse.duckdb"
    os.environ["CDP_WAREHOUSE_URL"] = f"duckdb:///{path}"
    partition = today_partition()
    # Anchor the data at the start of the partition's day: every demo run of the same day
    # sees the same warehouse, so a second run has nothing new to send.
    as_of = datetime.combine(datetime.fromisoformat(partition), dtime.min, tzinfo=UTC)
    # The imports were the start-up: the warehouse and the servers' waits come next, with the
    # collector on (the definitions load later, after them).
    heap.started()
    console.print(f"[bold]1/5[/] demo warehouse: {customers:,} customers → {path}")
    counts = generate_demo_warehouse(path, customers=customers, seed=seed, as_of=as_of)
    console.print("    " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    with ExitStack() as stack:
        url = _sandbox_url(stack, port)
        # The demo always sends to the sandbox, never to a real provider from the environment.
        _use_sandbox(url)
        hooks = None if dry_run else _status_webhooks(stack, url)
        # Plan, then apply: the preview a marketer checks before a send, through Dagster.
        console.print(f"[bold]3/5[/] preview (dry run) of {activation} for {partition}")
        # Loaded once for the preview, the send and the fallback (~0.5 s each time).
        definitions = load_definitions(tolerant=True)
        summary = run_activation(
            activation,
            partition,
            dry_run=True,
            queue=queue,
            send_window=window,
            definitions=definitions,
        )
        if summary.success:
            cost = summary.estimated_cost or 0.0
            earlier = (
                f", {summary.already_sent:,} sent by an earlier run" if summary.already_sent else ""
            )
            console.print(
                f"    would send {summary.to_send:,} now ({summary.deferred:,} deferred by "
                f"quiet hours{earlier}), about {summary.estimated_seconds or 0:,.0f} s at the "
                f"providers' rate limits; estimated cost of the whole plan ("
                f"{sum(summary.eligible.values()):,} messages) {cost:,.2f} {summary.currency}",
                highlight=False,
            )
            hint = _quiet_hours_hint(summary.to_send, summary.deferred, window)
            if hint:
                console.print(hint, highlight=False)
        reports = None
        if not dry_run and summary.success:
            console.print(f"[bold]4/5[/] sending {activation} for {partition} via Dagster")
            with _progress_bar(activation, partition):
                summary = run_activation(
                    activation,
                    partition,
                    dry_run=False,
                    queue=queue,
                    send_window=window,
                    definitions=definitions,
                )
            reports = _settled_statuses(activation, partition, url) if hooks else None
        fallback = None
        if experiment:
            pass  # no fallback in the experiment's plan: its results follow the report
        elif reports is not None and summary.success:
            # The plan falls back after 30 minutes; the demo's statuses have settled, so it
            # does not wait: whatever is not delivered now falls back now.
            console.print(
                "[bold]5/5[/] fallback: SMS where WhatsApp did not land (demo: the plan's "
                "30-minute window shortened to 0)"
            )
            fallback = run_fallback(
                activation,
                partition,
                not_delivered_within_minutes=0,
                send_window=window,
                queue=queue,
                definitions=definitions,
            )
    summary.elapsed_seconds = round(time.perf_counter() - started, 2)
    _report(summary, as_json, sandbox_url=url, reports=reports, fallback=fallback)
    if experiment and reports is not None and summary.success and not as_json:
        _experiment_results(activation, partition, path)


def _quiet_hours_hint(to_send: int, deferred: int, window: tuple[str, str] | None) -> str | None:
    """What the demo says when quiet hours hold messages back. Its customers live in many time
    zones, and at some hours (03:00-04:30 UTC in winter) every one of them is asleep: without
    this, a newcomer sees nothing sent and no reason why. None when nothing waits, or when the
    send window was chosen (`--send-window`)."""
    if window is not None or deferred <= 0:
        return None
    waiting = f"all {deferred:,}" if to_send <= 0 else f"{deferred:,} of {to_send + deferred:,}"
    return (
        f"    quiet hours: {waiting} messages wait for their customers' morning (planned in the "
        "ledger; a run after it sends them). To send them now, in the demo: make demo "
        "SEND_WINDOW=00:00-23:59 (cdp-activation demo --send-window 00:00-23:59)"
    )


def _experiment_results(activation: str, partition: str, warehouse: Path) -> None:
    """`demo --experiment`'s last step: the customers' simulated orders of the week after the
    send (demo/conversions.py), then the results, as `cdp-activation results` prints them."""
    from cdp_activation.demo.conversions import simulate_conversions
    from cdp_activation.ledger import Ledger

    console.print(
        "[bold]5/5[/] the week after: simulated orders (a base chance, more for customers "
        "whose message was delivered), then the results"
    )
    ledger = Ledger(get_settings().ledger_url)
    try:
        added = simulate_conversions(warehouse, ledger, activation, partition)
    finally:
        ledger.dispose()
    console.print(f"    {added:,} orders added to the demo warehouse", highlight=False)
    results.callback(activation, partition, False)  # type: ignore[misc]


def _live_demo(
    customers: int,
    seed: int,
    port: int,
    activate: bool,
    per_minute: float,
    minutes: float | None,
) -> None:
    """`demo --live`: abandoned carts into the demo warehouse, and with `--activate` the
    abandoned_cart activation run on them here (cli/live.py)."""
    from cdp_activation.audience.warehouse import duckdb_path
    from cdp_activation.cli import live
    from cdp_activation.cli.runner import ensure_dagster_home, run_activation
    from cdp_activation.demo.data import generate_demo_warehouse

    os.environ["CDP_SANDBOX"] = "1"
    home = ensure_dagster_home()
    path = duckdb_path(get_settings().warehouse_url) or home / "demo_warehouse.duckdb"
    os.environ["CDP_WAREHOUSE_URL"] = f"duckdb:///{path}"
    if not _has_table(path, "cart_events"):
        console.print(f"demo warehouse: {customers:,} customers → {path}")
        generate_demo_warehouse(path, customers=customers, seed=seed)

    def say(line: str) -> None:
        console.print(line, highlight=False)

    with ExitStack() as stack:
        run_window = None
        if activate:
            _use_sandbox(_sandbox_url(stack, port, step=""))
            queue = _queue()

            def run_window(window: str) -> str:
                summary = run_activation(live.ACTIVATION, window, queue=queue)
                if not summary.success:
                    return f"failed: {summary.error}"
                return f"sent {summary.sent}, excluded {sum(summary.excluded.values())}"

        else:
            say(
                "appending abandoned carts; run `make dev` and switch on the sensor "
                f"{live.ACTIVATION}_events (Automation) to activate them. Ctrl-C stops."
            )
        try:
            total = live.live(path, per_minute, minutes, say, run_window)
        except KeyboardInterrupt:
            total = None
    if total is not None:
        say(f"{total} abandoned cart(s) appended to {path}")


def _has_table(path: Path, table: str) -> bool:
    if not path.exists():
        return False
    from cdp_activation.audience.warehouse import connect_duckdb

    con = connect_duckdb(path, read_only=True)
    try:
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchone()
    finally:
        con.close()
    return bool(found and found[0])


def _use_sandbox(url: str) -> None:
    """Point the demo's connectors at the local sandbox, never a real provider."""
    os.environ["CDP_META_BASE_URL"] = f"{url}/meta"
    os.environ["CDP_TWILIO_BASE_URL"] = f"{url}/twilio"
    os.environ["CDP_TWILIO_CONTENT_BASE_URL"] = f"{url}/twilio"
    for var in ("CDP_META_ACCESS_TOKEN", "CDP_TWILIO_AUTH_TOKEN", "CDP_META_APP_SECRET"):
        os.environ.pop(var, None)
    # Meta's highest throughput tier; the sandbox has no limit of its own.
    os.environ.setdefault("CDP_META_RATE_PER_SECOND", "1000")
    os.environ.setdefault("CDP_TWILIO_RATE_PER_SECOND", "1000")


def _window(send_window: str | None) -> tuple[str, str] | None:
    """`--send-window HH:MM-HH:MM` as (start, end)."""
    if send_window is None:
        return None
    from cdp_activation.activation.run import quiet_hours_outside

    start, sep, end = send_window.partition("-")
    if not sep:
        raise click.BadParameter(f"{send_window!r} is not HH:MM-HH:MM", param_hint="--send-window")
    window = start.strip(), end.strip()
    try:  # refused here, before any run starts, as the run itself would refuse it
        quiet_hours_outside(window)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--send-window") from None
    return window


# How the demo's sandbox reports back: most WhatsApp and SMS messages delivered (half of them
# read), a few failed with the provider's code, the rest never delivered.
DEMO_STATUSES = {
    "status_delivered_rate": 0.85,
    "status_failed_rate": 0.05,
    "status_read_rate": 0.5,
    "status_delay_ms": 50,
    "status_duplicate_rate": 0.05,
    "status_reorder_rate": 0.05,
    # Meta gathers its reports into batched webhooks: up to 100 statuses a request here.
    "status_batch_max": 100,
    # Some customers write back, and some of those say stop: the next run leaves them out.
    "reply_rate": 0.1,
    "reply_stop_rate": 0.3,
}


def _status_webhooks(stack: ExitStack, sandbox_url: str) -> str | None:
    """Start the status webhook receiver and point the sandbox's reports at it."""
    port = _free_port()
    hooks = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            *[sys.executable, "-m", "cdp_activation.cli.main", "webhooks", "serve"],
            *["--port", str(port), "--no-access-log"],
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(_stop_process, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{hooks}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        console.print("    [yellow]status webhook receiver did not start: no delivery reports[/]")
        return None
    faults = {**DEMO_STATUSES, "status_webhooks_url": hooks}
    httpx.post(f"{sandbox_url}/_sandbox/faults", json=faults, timeout=5).raise_for_status()
    console.print(f"    status webhooks: the sandbox reports back to {hooks}/webhooks/<provider>")
    return hooks


def _settled_statuses(
    activation: str, partition: str, sandbox_url: str, quiet: float = 1.0
) -> dict[str, int]:
    """Delivery statuses of the partition, and how many of its customers replied and opted
    out, once the sandbox has no report left to send (`/_sandbox/pending`: the
    receiver stores each before answering it) or, from a sandbox that does not say, once the
    reports stop changing for `quiet` seconds; at most ~15 s. Replies are counted once at the
    end: counting them is a read of the whole partition (~80 ms for the demo's)."""
    from cdp_activation.ledger import INITIAL_STEP, Ledger

    ledger = Ledger(get_settings().ledger_url)
    try:
        last: tuple[dict[str, int], tuple[int, int]] | None = None
        stable_since = time.monotonic()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pending = _reports_pending(sandbox_url)
            if pending:  # the sandbox says when; nothing to watch meanwhile
                time.sleep(0.1)
                continue
            ledger.apply_pending_statuses()
            if pending == 0:
                break
            counts = ledger.delivery_status_counts(activation, partition, step=INITIAL_STEP)
            seen = (counts, ledger.replies_seen())
            if seen != last:
                last, stable_since = seen, time.monotonic()
            elif time.monotonic() - stable_since >= quiet:
                break
            time.sleep(0.1)
        statuses = ledger.delivery_status_counts(activation, partition, step=INITIAL_STEP)
        return statuses | ledger.reply_counts(activation, partition)
    finally:
        ledger.dispose()


def _reports_pending(sandbox_url: str) -> int | None:
    """Status webhooks the sandbox has still to send; None when it does not say."""
    try:
        answer = httpx.get(f"{sandbox_url}/_sandbox/pending", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    pending = answer.get("status_webhooks") if isinstance(answer, dict) else None
    return pending if isinstance(pending, int) else None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sandbox_url(stack: ExitStack, port: int, step: str = "[bold]2/5[/] ") -> str:
    url = f"http://127.0.0.1:{port}"
    try:
        if httpx.get(f"{url}/_sandbox/health", timeout=1).status_code == 200:
            console.print(f"{step}sandbox provider already running at {url}")
            return url
    except httpx.HTTPError:
        pass
    # Its own process, as a real provider would be: it must not share our interpreter's GIL.
    # Its log goes to a file, not a pipe: a pipe nobody reads once it has started would stop
    # it the moment it filled (a chatty log level, CDP_LOG_FORMAT=json).
    log = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115  # closed by the stack
    process = subprocess.Popen(
        [
            *[sys.executable, "-m", "cdp_activation.cli.main", "sandbox", "--port", str(port)],
            "--no-access-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    stack.callback(_stop_process, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            error = log.read().decode(errors="replace")
            raise click.ClickException(
                f"the sandbox provider did not start on port {port}: {error.strip()[-500:]}"
            )
        try:
            if httpx.get(f"{url}/_sandbox/health", timeout=1).status_code == 200:
                console.print(f"{step}sandbox provider started at {url}")
                return url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise click.ClickException(f"the sandbox provider did not answer on {url} within 20 s")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


# ---------------------------------------------------------------- run


class Busy(click.ClickException):
    """Another run of the activation is queued or in progress (--no-wait, --wait-timeout)."""

    exit_code = EX_TEMPFAIL  # nothing was started; try again later


def _queue_options(command: Callable[..., None]) -> Callable[..., None]:
    """How a run waits behind another run of the same activation (one at a time)."""
    options = (
        click.option(
            "--no-wait",
            is_flag=True,
            help="If another run of this activation is queued or in progress, fail at once "
            "(exit 75) instead of waiting behind it.",
        ),
        click.option(
            "--wait-timeout",
            type=click.FloatRange(min=0),
            metavar="SECONDS",
            help="Wait at most this long behind another run of this activation, then fail "
            "(exit 75). Default: as long as it takes, like Dagster's run queue.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _queue(no_wait: bool = False, wait_timeout: float | None = None) -> Any:
    """The runner's `RunQueue`, telling the user (once per run) which run it waits behind."""
    from cdp_activation.cli.runner import RunQueue

    def on_wait(active: Any) -> None:
        console.print(
            f"waiting behind run {active.describe()}… (Ctrl-C stops waiting; --no-wait fails "
            "instead)",
            highlight=False,
            soft_wrap=True,
        )

    def on_stale(active: Any, why: str) -> None:
        console.print(
            f"[yellow]run {active.describe()} will never finish: {why}; marked it failed[/]",
            highlight=False,
            soft_wrap=True,
        )

    return RunQueue(wait=not no_wait, timeout=wait_timeout, on_wait=on_wait, on_stale=on_stale)


@contextmanager
def _one_run_at_a_time(activation: str, no_wait: bool, wait_timeout: float | None) -> Iterator[Any]:
    """Wait (or fail) until no other run of the activation is queued or in progress, then
    yield the queue for the runner, which looks once more right before it starts."""
    import dataclasses

    from cdp_activation.cli.runner import ActivationBusy, wait_for_turn

    queue = _queue(no_wait, wait_timeout)
    began = time.monotonic()
    try:
        wait_for_turn(activation, queue)
        if wait_timeout is not None:
            left = max(0.0, wait_timeout - (time.monotonic() - began))
            queue = dataclasses.replace(queue, timeout=left)
        yield queue
    except ActivationBusy as err:
        raise Busy(str(err)) from None


def _run_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options `run` and `preview` share: which partition, and the Launchpad's choices."""
    options = (
        click.argument("activation"),
        click.option("--partition", help="Partition date, YYYY-MM-DD (default: today, UTC)."),
        click.option(
            "--param",
            "params",
            multiple=True,
            metavar="NAME=VALUE",
            help="Audience SQL parameter, e.g. --param lapse_threshold=0.8 (repeatable).",
        ),
        click.option("--max-recipients", type=int, help="Cap the recipients of this run."),
        click.option("--template", help="Another approved template for the plan's template step."),
        click.option(
            "--send-window",
            metavar="HH:MM-HH:MM",
            help="Local hours messages may go out, e.g. 09:00-20:00 (default: the activation's).",
        ),
        click.option("--json", "as_json", is_flag=True, help="End with one JSON line."),
    )
    command = _queue_options(command)
    for option in reversed(options):
        command = option(command)
    return command


@main.command(help="Run one activation through Dagster for a partition (default: today).")
@_run_options
@click.option("--dry-run", is_flag=True, help="Preview only: decide, estimate, send nothing.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Claim workers to send from at once, each a process (or a Celery task with "
    "CDP_CELERY_BROKER_URL); default: delivery.workers in the activation's defs.yaml.",
)
@click.option(
    "--in-flight",
    type=click.IntRange(1, 1024),
    help="Requests each claim worker keeps in the air at once; default: delivery.in_flight "
    "in the activation's defs.yaml, else CDP_DELIVERY_CONCURRENCY (32).",
)
def run(dry_run: bool, as_json: bool, **options: Any) -> None:
    _report(_run(dry_run=dry_run, **options), as_json)


@main.command(
    help="Preview one activation for a partition (a dry run): who would be messaged on which "
    "channel, who not and why, sample messages (numbers masked), estimated cost and duration. "
    "Nothing is sent; a real send of more than CDP_CONFIRM_ABOVE recipients needs it first."
)
@_run_options
def preview(as_json: bool, **options: Any) -> None:
    _report(_run(dry_run=True, **options), as_json, show_samples=True)


def _run(
    activation: str,
    partition: str | None,
    dry_run: bool,
    params: tuple[str, ...],
    max_recipients: int | None,
    template: str | None,
    send_window: str | None,
    no_wait: bool = False,
    wait_timeout: float | None = None,
    workers: int | None = None,
    in_flight: int | None = None,
) -> Any:
    _start_up()  # until the definitions are loaded (heap.py)
    from cdp_activation.cli.runner import (
        ActivationNotFound,
        current_partition,
        load_definitions,
        run_activation,
        today_partition,
    )

    parameters: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        parameters[key] = _yaml_scalar(value)
    window = _window(send_window)
    with ExitStack() as stack:
        # First wait behind any other run of the activation: the progress bar counts from
        # where the ledger stands once this run's turn comes.
        queue = stack.enter_context(_one_run_at_a_time(activation, no_wait, wait_timeout))
        _start_sandbox_if_needed(stack, activation)
        definitions = load_definitions(tolerant=True)
        if partition is None:
            try:
                partition = current_partition(definitions, activation)
            except Exception:  # an unknown activation: run_activation says so in one line
                partition = today_partition()
        if not dry_run:
            stack.enter_context(_progress_bar(activation, partition))
        try:
            return run_activation(
                activation,
                partition,
                dry_run=dry_run,
                parameters=parameters,
                max_recipients=max_recipients,
                template=template,
                send_window=window,
                queue=queue,
                workers=workers,
                in_flight=in_flight,
                definitions=definitions,
            )
        except ActivationNotFound as err:
            raise click.ClickException(str(err)) from None
        finally:
            _say_left_out(activation)


def _say_left_out(running: str) -> None:
    """One line per other activation that could not be loaded (and so was left out)."""
    from cdp_activation.cli.runner import broken_activations

    for name, reason in sorted(broken_activations().items()):
        if name != running:
            console.print(
                f"[yellow]note[/] activation {name} is broken and was left out: {reason}",
                highlight=False,
                soft_wrap=True,
            )


@contextmanager
def _progress_bar(activation: str, partition: str, every: float = 0.5) -> Iterator[None]:
    """A progress bar (done of due, rate, ETA) for a real send, drawn from the ledger by a
    thread while the run goes on; nothing shows until rows are planned. On a large partition
    the bar is redrawn less often than `every` (cli/pacing.py)."""
    import threading

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
    )

    from cdp_activation.cli.pacing import look_until_stopped
    from cdp_activation.ledger import Ledger

    stop = threading.Event()
    ledger = Ledger(get_settings().ledger_url)
    start_done, _ = ledger.progress(activation, partition)
    columns = (
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )

    def look(progress: Progress, task: list[TaskID]) -> None:
        done, left = ledger.progress(activation, partition)
        done -= start_done
        if not task and left == 0:
            return
        total = done + left
        if not task:  # the bar shows from the first rows due: none, no bar (nor empty line)
            with guard:
                if closed.is_set():  # too late: the run's summary is being printed
                    return
                progress.start()
                task.append(progress.add_task("send", total=total, rate=""))
        speed = progress.tasks[task[0]].speed
        rate = f"{speed:,.0f} msg/s" if speed else ""
        progress.update(task[0], completed=done, total=total, rate=rate)

    progress = Progress(*columns, console=console, transient=False)
    shown: list[TaskID] = []
    guard, closed = threading.Lock(), threading.Event()
    thread = threading.Thread(
        target=look_until_stopped,
        args=(lambda: look(progress, shown), stop, every),
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with guard:  # a look still running past the join starts no bar after this
            closed.set()
            if shown:
                progress.stop()
        ledger.dispose()


@main.command(
    help="Send an activation's fallback (e.g. SMS) for a partition to customers whose first "
    "message did not land; what the fallback sensor launches."
)
@click.argument("activation")
@click.option("--partition", help="Partition date, YYYY-MM-DD (default: today, UTC).")
@click.option("--dry-run", is_flag=True, help="Preview only: decide, send nothing.")
@click.option(
    "--not-delivered-within",
    "minutes",
    type=float,
    help="Override the plan's window, in minutes (default: channel_plan.fallback's).",
)
@click.option(
    "--send-window",
    metavar="HH:MM-HH:MM",
    help="Local hours messages may go out, e.g. 09:00-20:00 (default: the window the "
    "partition's latest real send was decided with).",
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of the summary.")
@_queue_options
def fallback(
    activation: str,
    partition: str | None,
    dry_run: bool,
    minutes: float | None,
    send_window: str | None,
    as_json: bool,
    no_wait: bool,
    wait_timeout: float | None,
) -> None:
    _start_up()  # until the definitions are loaded (heap.py)
    from cdp_activation.cli.runner import ActivationNotFound, run_fallback

    window = _window(send_window)
    with ExitStack() as stack:
        queue = stack.enter_context(_one_run_at_a_time(activation, no_wait, wait_timeout))
        _start_sandbox_if_needed(stack, activation)
        try:
            summary = run_fallback(
                activation,
                partition,
                dry_run=dry_run,
                not_delivered_within_minutes=minutes,
                send_window=window,
                queue=queue,
            )
        except ActivationNotFound as err:
            raise click.ClickException(str(err)) from None
    out = Console()
    out.print(_fallback_table(summary))
    if summary.error:
        out.print(f"[red]run failed[/] {summary.error}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(summary.as_json(), sort_keys=True))
    if not summary.success:
        raise SystemExit(1)


def _start_sandbox_if_needed(stack: ExitStack, activation: str) -> None:
    """The embedded default needs no setup: in sandbox mode (CDP_SANDBOX), if a connector the
    activation sends through points at the local sandbox and nothing answers there, run one
    for the command's duration. A run through other providers starts none."""
    settings = get_settings()
    if not settings.sandbox:
        return
    sandbox = f"http://127.0.0.1:{settings.sandbox_port}/"
    names = _connectors_of(activation) or set(plugins())
    urls = [plugins()[n].base_url(settings.connector_settings(n)) for n in names if n in plugins()]
    if any(url.startswith(sandbox) for url in urls):
        heap.started()  # its wait polls for up to 20 s: not with the collector off (heap.py)
        _sandbox_url(stack, settings.sandbox_port, step="")


def _connectors_of(activation: str) -> set[str]:
    """The connectors an activation's channel plan names, read from its defs.yaml (empty when
    it cannot be read: the run itself then says what is wrong)."""
    import yaml

    from cdp_activation import definitions

    path = Path(definitions.__file__).parent / "defs" / "activations" / activation / "defs.yaml"
    try:
        plan = (yaml.safe_load(path.read_text()) or {})["attributes"]["channel_plan"]
        return {str(step["connector"]) for step in plan["steps"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return set()


def _yaml_scalar(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


# ---------------------------------------------------------------- validate


@main.command(help="Check every activation (defs.yaml) and audience SQL file; list all problems.")
@click.option(
    "--offline",
    is_flag=True,
    help="Check the files only: skip running each audience with LIMIT 0 in the warehouse and "
    "checking its templates in the provider's catalog.",
)
def validate(offline: bool) -> None:
    from cdp_activation.cli.validation import check_live, validate_project

    root = project_root()
    valid, problems = validate_project(root)
    notes: list[str] = []
    if not offline and valid:
        live, notes = check_live(root, valid)
        problems += [problem for found in live.values() for problem in found]
        valid = [name for name in valid if name not in live]
    for name in valid:
        console.print(f"[green]ok[/]  {name}")
    for note in notes:
        console.print(f"[yellow]note[/] {note}", highlight=False, soft_wrap=True)
    for problem in problems:
        console.print(f"[red]error[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise SystemExit(1)


# ---------------------------------------------------------------- sandbox / dev


@main.command(
    help="List the installed connectors (entry points `cdp_activation.connectors`): what each "
    "sends, how much per request, its settings and its status webhook route, as Markdown. "
    "Their settings are checked first."
)
def connectors() -> None:
    from cdp_activation.cli.connector_tables import connectors_markdown, webhooks_markdown

    get_settings()  # a bad setting of any connector: one line naming it
    click.echo(connectors_markdown())
    click.echo()
    click.echo(webhooks_markdown())


@main.command(help="Serve the local sandbox provider (every provider it emulates).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=SANDBOX_PORT, show_default=True)
@click.option("--access-log/--no-access-log", default=True, show_default=True)
def sandbox(host: str, port: int, access_log: bool) -> None:
    _start_up()  # until it serves (heap.py)
    from cdp_activation.sandbox.server import serve

    console.print(f"sandbox provider on http://{host}:{port} (Ctrl-C to stop)")
    serve(host, port, access_log=access_log)


@main.command(
    help="Create or upgrade the ledger's schema (CDP_LEDGER_URL) now, e.g. at deployment; "
    "otherwise each process does it on its first use of the ledger."
)
def migrate() -> None:
    from cdp_activation.ledger import Ledger

    settings = get_settings()
    ledger = Ledger(settings.ledger_url)  # opening it the first time in a process migrates
    ledger.dispose()
    console.print("ledger schema is up to date", highlight=False)


@main.command(
    help="Print an experiment's results: conversion per variant and each variant's lift over "
    "the holdout, with 95% intervals and p-values (the `<name>/results` asset's table)."
)
@click.argument("activation")
@click.option("--partition", help="One day's partition (YYYY-MM-DD); default: every partition.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON line.")
def results(activation: str, partition: str | None, as_json: bool) -> None:
    import yaml

    from cdp_activation.activation.results import experiment_results
    from cdp_activation.activation.run import Activation
    from cdp_activation.audience.sql import sql_dialect
    from cdp_activation.audience.warehouse import Warehouse
    from cdp_activation.cli.validation import activations_dir
    from cdp_activation.ledger import Ledger
    from cdp_activation.spec import ActivationSpec

    settings = get_settings()
    root = project_root()
    folder = activations_dir(root)
    path = folder / activation / "defs.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.parent.name for p in folder.glob("*/defs.yaml")))
        raise click.BadParameter(f"no activation {activation!r} (there are: {known})")
    spec = ActivationSpec.model_validate(yaml.safe_load(path.read_text())["attributes"])
    loaded = Activation.from_spec(activation, spec, root, sql_dialect(settings.warehouse_url))
    warehouse = Warehouse(settings.warehouse_url, duckdb_memory_limit=settings.duckdb_memory_limit)
    ledger = Ledger(settings.ledger_url)
    try:
        found = experiment_results(loaded, ledger, warehouse, partition)
    finally:
        ledger.dispose()
    if as_json:
        click.echo(json.dumps(found.as_json(), sort_keys=True))
        return
    scope = f"partition {partition}" if partition else "every partition"
    if not found.variants:
        console.print(
            f"{activation} ({scope}): no customer's first message has been decided yet; run "
            f"it first (cdp-activation run {activation})",
            highlight=False,
        )
        return
    console.print(
        f"[bold]{activation}[/] · {scope} · a conversion within {found.window_days} days of "
        f"the decision · baseline `{found.baseline}`",
        highlight=False,
    )
    table = Table("variant", "customers", "conversions", "rate (95% CI)", "lift (95% CI)", "p")
    for v in found.variants:
        rate = f"{v.rate:.2%} ({v.rate_low:.2%} to {v.rate_high:.2%})"
        lift = (
            "baseline"
            if v.lift is None
            else f"{v.lift * 100:+.2f} pts ({(v.lift_low or 0) * 100:+.2f} to "
            f"{(v.lift_high or 0) * 100:+.2f})"
        )
        p = "" if v.p_value is None else f"{v.p_value:.3g}"
        table.add_row(v.variant, f"{v.customers:,}", f"{v.conversions:,}", rate, lift, p)
    console.print(table)
    if found.open_windows:
        console.print(
            f"{found.open_windows:,} customers' conversion windows are still open (the last "
            f"closes {found.window_closes_at:%Y-%m-%d %H:%M} UTC): these figures can still "
            "change.",
            highlight=False,
        )


@main.command(
    help="Take personal data out of finished sends, status reports and the phone cache older "
    "than the retention (CDP_PII_RETENTION_DAYS, 90 by default). Rows still to send are kept."
)
@click.option("--days", type=click.IntRange(min=1), help="Retention in days (default: setting).")
def purge(days: int | None) -> None:
    from cdp_activation.ledger import Ledger
    from cdp_activation.retention import purge as purge_ledger

    settings = get_settings()
    days = days or settings.pii_retention_days
    ledger = Ledger(settings.ledger_url)
    try:
        done = purge_ledger(ledger, days, storage_dir=_dagster_storage())
    finally:
        ledger.dispose()
    console.print(
        f"older than {days} days: {done.sends:,} sends lost their number and message text, "
        f"{done.status_reports:,} status reports their payload; {done.phone_cache:,} phone "
        f"cache entries and {done.outputs:,} stored step outputs removed",
        highlight=False,
    )


def _dagster_storage() -> Path:
    """Where the Dagster instance keeps step outputs (its storage directory)."""
    import dagster as dg

    from cdp_activation.cli.runner import ensure_dagster_home

    ensure_dagster_home()
    with dg.DagsterInstance.get() as instance:
        return Path(instance.storage_directory())


@main.command(
    help="Erase customers (a data subject's request): their numbers, message texts and status "
    "payloads leave the ledger, their customer id becomes a pseudonym there and in the send "
    "log, planned sends to them are cancelled, and the phone cache is emptied."
)
@click.argument("customer_ids", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def erase(customer_ids: tuple[str, ...], yes: bool) -> None:
    from cdp_activation.ledger import Ledger
    from cdp_activation.retention import erase as erase_customers

    if not yes:
        click.confirm(f"Erase {len(customer_ids)} customer(s)? This cannot be undone", abort=True)
    settings = get_settings()
    ledger = Ledger(settings.ledger_url)
    try:
        done = erase_customers(
            ledger, customer_ids, settings.send_log_url, storage_dir=_dagster_storage()
        )
    finally:
        ledger.dispose()
    console.print(
        f"erased: {done.sends:,} sends, {done.status_reports:,} status reports, "
        f"{done.send_log:,} send log rows rewritten; phone cache emptied ({done.phone_cache:,}), "
        f"{done.outputs:,} stored step outputs deleted",
        highlight=False,
    )


@main.group(help="Delivery-status webhooks from the providers into the ledger.")
def webhooks() -> None:
    pass


@webhooks.command(
    "serve",
    help="Receive status webhooks on POST /webhooks/{meta,twilio,infobip,vonage,line,sandbox}; "
    "each is signature-checked and stored in the ledger before it is answered 200.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, help="Port (default: CDP_WEBHOOKS_PORT, 8788).")
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="A line per request (query strings left out). The metrics count requests anyway.",
)
def webhooks_serve(host: str, port: int | None, access_log: bool) -> None:
    _start_up()  # until it serves (heap.py)
    import uvicorn

    from cdp_activation.feedback.receiver import access_log_config, create_app
    from cdp_activation.ledger import Ledger

    settings = get_settings()
    secrets = settings.webhook_secrets()
    port = port or settings.webhooks_port
    refused = [route for route in status_routes() if secrets.secret_for(route) is None]
    console.print(f"status webhooks on http://{host}:{port}/webhooks/<provider> (Ctrl-C to stop)")
    if refused:
        console.print(
            f"[yellow]no signing secret for {', '.join(refused)}: their webhooks are refused "
            "(401) until one is set (see .env.example)[/]"
        )
    from cdp_activation.policy import opt_out

    app = create_app(
        Ledger(settings.ledger_url),
        secrets,
        max_body_bytes=settings.webhook_max_body_bytes,
        opt_out_keywords=opt_out.keywords(settings.opt_out_keywords, opt_out.OPT_OUT_KEYWORDS),
        opt_in_keywords=opt_out.keywords(settings.opt_in_keywords, opt_out.OPT_IN_KEYWORDS),
        serve_metrics=settings.metrics_port is None,
    )
    if settings.metrics_port is not None:
        from cdp_activation import metrics

        metrics.serve(settings.metrics_port, host)
        console.print(f"Prometheus metrics on http://{host}:{settings.metrics_port}/metrics")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=access_log_config(),
        access_log=access_log,
        lifespan="off",
    )


@main.command(
    name="celery-worker",
    help="Start a Dagster Celery worker for the activation jobs (CDP_CELERY_BROKER_URL): it "
    "takes steps of any run, claim workers included, until stopped. Start as many as you "
    "like, on any host sharing the broker, the PostgreSQL ledger and Dagster's PostgreSQL "
    "instance (docs/scaling.md).",
)
@click.option("--name", help="Worker name (default: dagster-<random>@<host>).")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Steps this worker runs at once, each in its own process.",
)
def celery_worker(name: str | None, concurrency: int) -> None:
    from cdp_activation import scaling
    from cdp_activation.cli.runner import ensure_dagster_home

    settings = get_settings()
    if not settings.celery_broker_url:
        raise click.ClickException(
            "CDP_CELERY_BROKER_URL is not set: a Celery worker needs the broker the runs use "
            "(e.g. pyamqp://guest:guest@127.0.0.1:5672//)"
        )
    try:
        scaling.check_broker(settings.celery_broker_url)
    except scaling.ScalingError as err:
        raise click.ClickException(str(err)) from None
    home = ensure_dagster_home()
    config = scaling.write_worker_yaml(home / "celery" / "worker.yaml")
    command = [
        str(Path(sys.executable).parent / "dagster-celery"),
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(config),
        *(["--name", name] if name else []),
        "--",
        f"--concurrency={concurrency}",
    ]
    # dagster-celery starts `celery` from PATH: this environment's, even when not activated.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    # This process becomes the worker: signals (Ctrl-C, SIGTERM) reach it as they would.
    os.execve(command[0], command, env)


@main.command(
    name="scale-demo",
    help="One activation on N Celery workers on this machine: RabbitMQ, PostgreSQL (fresh "
    "databases for Dagster's instance and the ledger), a large demo warehouse and the sandbox; "
    "prints each worker's and the total throughput, then stops everything it started.",
)
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--customers", type=int, default=1_000_000, show_default=True)
@click.option("--max-recipients", type=int, default=100_000, show_default=True)
@click.option(
    "--postgres",
    default="postgresql://postgres@127.0.0.1:5432/postgres",
    show_default=True,
    help="A PostgreSQL server URL (a database on it to connect to first).",
)
@click.option("--broker", default="pyamqp://guest:guest@127.0.0.1:5672//", show_default=True)
def scale_demo(
    workers: int, customers: int, max_recipients: int, postgres: str, broker: str
) -> None:
    from cdp_activation.demo import scale as demo
    from cdp_activation.scaling import ScalingError

    try:
        summary = demo.run(
            workers=workers,
            customers=customers,
            max_recipients=max_recipients,
            postgres=postgres,
            broker=broker,
            say=lambda text: console.print(text, highlight=False),
        )
    except ScalingError as err:
        raise click.ClickException(str(err)) from None
    table = Table(title=f"winback_whatsapp on {workers} Celery workers")
    for column in ("claim worker", "sent", "seconds", "sent/s"):
        table.add_column(column, justify="right")
    for w in summary.get("per_worker") or []:
        table.add_row(
            w["worker"], f"{w['sent']:,}", f"{w['seconds']:.1f}", f"{w['per_second']:,.0f}"
        )
    elapsed = summary.get("elapsed_seconds") or 0.0
    table.add_row(
        "total",
        f"{summary.get('sent', 0):,}",
        f"{elapsed:.1f}",
        f"{summary.get('sent', 0) / elapsed:,.0f}" if elapsed else "",
    )
    console.print(table)
    console.print(
        "total seconds are the whole run's (audience, policy, Dagster steps); a worker's are "
        "its sending alone"
    )
    if not summary.get("success"):
        raise click.ClickException(f"the run failed: {summary.get('error')}")


@main.command(
    help="Start the sandbox, the status webhook receiver and the Dagster UI (dagster dev)."
)
@click.option("--port", default=3000, show_default=True, help="Dagster UI port.")
@click.option("--sandbox-port", default=SANDBOX_PORT, show_default=True)
def dev(port: int, sandbox_port: int) -> None:
    from cdp_activation.audience.warehouse import duckdb_path
    from cdp_activation.cli.runner import ensure_dagster_home
    from cdp_activation.demo.data import generate_demo_warehouse

    os.environ["CDP_SANDBOX"] = "1"  # the UI, the daemon and its runs use the sandbox
    home = ensure_dagster_home()
    if "CDP_METRICS_DIR" not in os.environ:
        # Every process of the UI's runs writes its metrics here; the receiver adds them up.
        # Emptied at each start, as prometheus-client's multiprocess mode asks.
        metrics_dir = home / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["CDP_METRICS_DIR"] = str(metrics_dir)
    path = duckdb_path(get_settings().warehouse_url)
    if path is not None and not path.exists():
        console.print(f"no warehouse at {path}: generating the demo one (100,000 customers)")
        generate_demo_warehouse(path)
    with ExitStack() as stack:
        url = _sandbox_url(stack, sandbox_port)
        env = dict(os.environ, DAGSTER_HOME=str(home))
        env.setdefault("CDP_META_BASE_URL", f"{url}/meta")
        env.setdefault("CDP_TWILIO_BASE_URL", f"{url}/twilio")
        env.setdefault("CDP_TWILIO_CONTENT_BASE_URL", f"{url}/twilio")
        # The sandbox reports delivery statuses back, as in `make demo`.
        hooks = _status_webhooks(stack, url)
        if hooks:
            console.print(
                f"Prometheus metrics of every run on {hooks}/metrics (docs/operations.md)"
            )
        console.print(f"Dagster UI on http://127.0.0.1:{port}")
        command = [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        # Its own process group, stopped as a whole however this command ends (Ctrl-C or a
        # SIGTERM from a supervisor): otherwise its webserver, daemon and code server outlive us.
        process = subprocess.Popen(command, cwd=project_root(), env=env, start_new_session=True)
        stack.callback(_stop_group, process)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with suppress(KeyboardInterrupt):
            process.wait()


# ---------------------------------------------------------------- output


def _report(
    summary: Any,
    as_json: bool,
    sandbox_url: str | None = None,
    reports: dict[str, int] | None = None,
    fallback: Any = None,
    show_samples: bool = False,
) -> None:
    out = Console()
    title = f"{summary.activation} · partition {summary.partition}"
    if summary.dry_run:
        title += " · DRY RUN (nothing sent)"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("audience", f"{summary.audience:,}")
    for channel, count in summary.eligible.items():
        table.add_row(f"eligible · {channel}", f"{count:,}")
    for reason, count in summary.excluded.items():
        table.add_row(f"excluded · {reason}", f"{count:,}")
    if summary.holdout:
        table.add_row("holdout (control group, not messaged)", f"{summary.holdout:,}")
    if summary.deferred:
        table.add_row("deferred (quiet hours; sent later)", f"{summary.deferred:,}")
    if summary.cancelled:
        table.add_row("cancelled (no longer chosen)", f"{summary.cancelled:,}")
    if summary.estimated_cost is not None:
        table.add_row(f"estimated cost ({summary.currency})", f"{summary.estimated_cost:,.2f}")
    if summary.dry_run:
        # The count a real send's preview guard compares (CDP_CONFIRM_ABOVE, max change).
        table.add_row(
            "would message (now, or once their quiet hours end)",
            f"{sum(summary.eligible.values()):,}",
        )
        table.add_row("would send now", f"{summary.to_send:,}")
        if summary.estimated_seconds is not None:
            table.add_row("estimated duration", f"{summary.estimated_seconds:,.1f} s")
    else:
        table.add_row("sent", f"{summary.sent:,}")
        table.add_row("failed", f"{summary.failed:,}")
        if summary.unknown:
            table.add_row("unknown (answer lost; not resent)", f"{summary.unknown:,}")
        if summary.retried:
            table.add_row("retried after 429/5xx (waited in the ledger)", f"{summary.retried:,}")
        if summary.held_for_quiet_hours:
            table.add_row(
                "reached in quiet hours (waiting until they end)",
                f"{summary.held_for_quiet_hours:,}",
            )
    table.add_row("already sent (earlier runs)", f"{summary.already_sent:,}")
    if not summary.dry_run:
        _partition_rows(table, summary, with_replies=not reports)
    for code, count in summary.error_codes.items():
        table.add_row(f"provider error · {code}", f"{count:,}")
    for word, count in summary.accepted_as.items():
        table.add_row(f"sent, accepted as {word.replace('_', ' ')}", f"{count:,}")
    if reports:
        for status in ("delivered", "read", "failed", "sent"):
            label = "sent, not delivered (yet)" if status == "sent" else status
            table.add_row(f"delivery reports · {label}", f"{reports.get(status, 0):,}")
        table.add_row("replies · customers who wrote back", f"{reports.get('replied', 0):,}")
        table.add_row(
            "replies · opted out (left out from now on)", f"{reports.get('opted_out', 0):,}"
        )
    table.add_row("elapsed", f"{summary.elapsed_seconds:,.1f} s")
    out.print(table)
    if show_samples and summary.sample_messages:
        from rich.markdown import Markdown

        out.print("[bold]sample messages[/] (phone numbers masked)")
        out.print(Markdown(summary.sample_messages))
    if fallback is not None:
        out.print(_fallback_table(fallback))
        if fallback.error:
            out.print(f"[red]fallback failed[/] {fallback.error}", highlight=False, soft_wrap=True)
    for check, description in summary.failed_checks.items():
        out.print(f"[red]check failed[/] {check}: {description}", highlight=False)
    if summary.error:
        out.print(f"[red]run failed[/] {summary.error}", highlight=False, soft_wrap=True)
    if sandbox_url and not summary.dry_run:
        out.print(f"sandbox recorded messages: {sandbox_url}/_sandbox/messages", highlight=False)
    out.print(f"Dagster run {summary.run_id} (see it with `make dev`)", highlight=False)
    if as_json:
        data = summary.as_json()
        if reports is not None:
            replies = ("replied", "opted_out")
            data["delivery_statuses"] = {k: v for k, v in reports.items() if k not in replies}
            data["replies"] = {k: reports.get(k, 0) for k in replies}
        if fallback is not None:
            data["fallback"] = fallback.as_json()
        print(json.dumps(data, sort_keys=True))
    if not summary.success or (fallback is not None and not fallback.success):
        raise SystemExit(1)


PARTITION_STATES = {
    "planned": "planned (waiting or deferred)",
    "in_flight": "in flight (another run, or recovered by the next)",
    "unknown": "unknown (may have reached the provider)",
    "dead_letter": "dead-lettered",
}


def _partition_rows(table: Table, summary: Any, with_replies: bool = True) -> None:
    """The whole partition as it stands after the run: what is still waiting, and why (and
    its replies, unless the settled delivery reports below count them)."""
    if summary.recovered_in_flight:
        table.add_row(
            "recovered from a stopped run (now unknown)", f"{summary.recovered_in_flight:,}"
        )
    if summary.revived:
        table.add_row("given up by an earlier version, sent again", f"{summary.revived:,}")
    if summary.unknown_reconciled:
        table.add_row("unknown, then proved sent by a report", f"{summary.unknown_reconciled:,}")
    for state, count in sorted(summary.partition_states.items()):
        table.add_row(f"partition · {PARTITION_STATES.get(state, state)}", f"{count:,}")
    if with_replies and summary.replied:
        table.add_row("partition · customers who wrote back", f"{summary.replied:,}")
        table.add_row("partition · of them opted out", f"{summary.opted_out:,}")
    for reason, count in sorted(summary.dead_letter_by_reason.items()):
        table.add_row(f"partition · dead-lettered · {reason}", f"{count:,}")
    for reason, count in sorted(summary.cancelled_by_reason.items()):
        table.add_row(f"partition · cancelled · {reason}", f"{count:,}")
    if summary.waiting:
        table.add_row(
            "[yellow]still waiting to be sent[/] (next run or the deferred-sends sensor)",
            f"{summary.waiting:,}",
        )


FALLBACK_REASONS = {
    "primary_unreachable": "failed: cannot receive it there",
    "primary_not_delivered": "not delivered in time",
    "primary_not_read": "not read in time",
    "primary_window_closed": "WhatsApp window closed before it went",
}


def _fallback_table(summary: Any) -> Table:
    # A run that failed before it decided anything does not know the channel yet.
    channel = summary.channel or "fallback"
    title = f"{summary.activation} · {summary.partition} · fallback"
    if summary.channel:
        title += f" to {summary.channel}"
    if summary.dry_run:
        title += " · DRY RUN (nothing sent)"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    first = summary.first_messages
    if first:
        # Only first messages on another channel can fall back to this one: the run's table
        # counts them all, so its numbers are larger.
        which = f"first messages (not {summary.channel})" if summary.channel else "first messages"
        landed = first.get("delivered", 0) + first.get("read", 0)
        table.add_row(f"{which} · delivered or read", f"{landed:,}")
        labels = {"sent": "sent, not delivered", "planned": "deferred, not sent yet"}
        for status, count in sorted(first.items()):
            if status not in ("delivered", "read"):
                table.add_row(f"{which} · {labels.get(status, status)}", f"{count:,}")
    table.add_row("due a fallback", f"{sum(summary.due.values()):,}")
    for reason, count in summary.due.items():
        table.add_row(f"why · {FALLBACK_REASONS.get(reason, reason)}", f"{count:,}")
    for code, count in summary.due_codes.items():
        table.add_row(f"first message's error · {code}", f"{count:,}")
    table.add_row(f"eligible · {channel}", f"{summary.eligible:,}")
    for reason, count in summary.excluded.items():
        table.add_row(f"not fallen back · {reason}", f"{count:,}")
    if summary.deferred:
        table.add_row("deferred (quiet hours; sent later)", f"{summary.deferred:,}")
    if summary.cancelled:
        table.add_row("cancelled (first message delivered meanwhile)", f"{summary.cancelled:,}")
    if not summary.dry_run:
        table.add_row(f"fallen back · {channel} sent", f"{summary.sent:,}")
        table.add_row(f"fallen back · {channel} failed", f"{summary.failed:,}")
    table.add_row("elapsed", f"{summary.elapsed_seconds:,.1f} s")
    return table


if __name__ == "__main__":
    entry()
