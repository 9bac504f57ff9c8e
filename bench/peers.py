"""The project against the tools users would pick instead (drt, dlt), on the same job.

`python -m bench peers [--customers N] [--single N] [--repeats 3] [--latencies 0 100]` from the
repository root. Everything runs on this machine, each sender in its own fresh process:

- the endpoint: `bench/peer_endpoint.py`, a bare aiohttp server on 127.0.0.1 taking the
  project's JSON webhook request shape and answering each message `accepted`, after 0 or
  100 ms (its own process; its CPU is reported, so a reader sees it was not the ceiling);
- the project: `cdp-activation run winback_gateway` with the `webhook` connector on the demo
  warehouse (N customers, `lapse_threshold` -1: every lapsed customer with an order), a fresh
  Dagster home and SQLite ledger per run, the rate limit set far above what is reached, and
  32 requests in flight (the default); its audience SQL, policy, ledger and Dagster run are
  all in its figures;
- drt-core 1.2.1 (`drt run`, a `rest_api` destination, `body_mode: batch` with the same
  200-record JSON array, or one record a request) and dlt 1.31 (`@dlt.destination`, parquet
  load files, 32 load jobs at once), installed into their own environment under
  `bench/data/peers-venv` (never this project's), reading the same recipients (the ones the
  project sent, exported from its ledger: same keys, numbers and bodies) from DuckDB.

Recipients per second is recipients / the sender process's wall time, start-up included;
CPU per recipient "after start-up" is the difference between a run of N recipients and a run
of 200, divided by the N - 200 extra recipients, so a reader can extrapolate. Each figure is
the median of `--repeats` runs. A peer that cannot be installed is skipped and the reason is
printed. Figures go to bench/results_peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

import httpx

from bench.delivery import _cpu_model
from bench.index import publish

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results_peers.md"
PEERS_VENV = ROOT / "bench" / "data" / "peers-venv"
PEER_PACKAGES = {"drt": ["drt-core==1.2.1"], "dlt": ["dlt==1.31.0", "duckdb", "pyarrow"]}
ACTIVATION = "winback_gateway"
PARTITION = date(2026, 12, 1)
STARTUP_RECIPIENTS = 200
IN_FLIGHT = 32  # the project's default; dlt's load jobs at once


# ---------------------------------------------------------------- the peers' environment


def install_peers() -> dict[str, str]:
    """Create the peers' own virtualenv (once) and install each peer; {peer: why skipped}."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    skipped = {}
    for peer, packages in PEER_PACKAGES.items():
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "requests", *packages],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
            skipped[peer] = (errors or done.stderr.strip().splitlines() or ["pip failed"])[-1]
    return skipped


# ---------------------------------------------------------------- processes and measurement


class Endpoint:
    """bench/peer_endpoint.py in its own process, answering after `latency_ms`."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.peer_endpoint", str(self.port), str(latency_ms)],
            cwd=ROOT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/count", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the peer endpoint did not start")

    def reset(self) -> None:
        httpx.post(f"{self.url}/reset", timeout=5)

    def count(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.url}/count", timeout=5).json())

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def cpu_and_wall(command: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Run one process to the end: its CPU seconds (children included) and wall seconds."""
    cpu, wall, _ = measured_run(command, env, cwd)
    return cpu, wall


def measured_run(
    command: Sequence[str], env: dict[str, str], cwd: Path
) -> tuple[float, float, str]:
    """Run one process to the end: its CPU seconds (children it waited for included), wall
    seconds and standard output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])} failed:\n{(done.stdout + done.stderr)[-3000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, done.stdout


def timed(command: Sequence[str], env: dict[str, str], cwd: Path, endpoint: Endpoint) -> dict:
    """Run one sender process to the end: wall, its CPU (children included), what arrived."""
    endpoint.reset()
    endpoint_before = endpoint.cpu_seconds()
    cpu, wall = cpu_and_wall(command, env, cwd)
    arrived = endpoint.count()
    return {
        "wall": wall,
        "cpu": cpu,
        "recipients": arrived["messages"],
        "distinct": arrived["keys"],
        "endpoint_cpu": endpoint.cpu_seconds() - endpoint_before,
    }


# ---------------------------------------------------------------- the three senders


class Project:
    """`cdp-activation run winback_gateway` against the demo warehouse in `work`.

    Every run sends the same partition from a fresh copy of one ledger that a preview filled
    with the phone cache (as warm as on any day after the first); the Dagster instance is
    shared, as a deployment's is."""

    def __init__(self, work: Path, customers: int, *, preview: bool = True) -> None:
        from cdp_activation.demo.data import generate_demo_warehouse

        self.work = work
        self.warehouse = work / "warehouse.duckdb"
        as_of = datetime.combine(PARTITION, datetime.min.time(), tzinfo=UTC)
        began = time.perf_counter()
        generate_demo_warehouse(self.warehouse, customers=customers, seed=7, as_of=as_of)
        self.warehouse_seconds = time.perf_counter() - began
        self.home = work / "dagster_home"
        self.home.mkdir()
        shutil.copy(ROOT / "dagster_home" / "dagster.yaml", self.home / "dagster.yaml")
        self.template = self.home / "ledger-template.sqlite"
        self.ledger = self.template
        self.runs = 0
        if not preview:
            return
        env = self.env(None, 200)
        done = subprocess.run(
            [*self.command("preview"), "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the preview failed:\n{(done.stdout + done.stderr)[-3000:]}")

    def command(self, verb: str, limit: int | None = None) -> list[str]:
        return [
            str(Path(sys.executable).parent / "cdp-activation"),
            verb,
            ACTIVATION,
            "--partition",
            PARTITION.isoformat(),
            "--send-window",
            "00:00-23:59",
            "--param",
            "lapse_threshold=-1",
            *(["--max-recipients", str(limit)] if limit else []),
        ]

    def env(self, endpoint: Endpoint | None, batch: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
        return env | {
            "DAGSTER_HOME": str(self.home),
            "CDP_LEDGER_URL": f"sqlite:///{self.ledger}",
            "CDP_WAREHOUSE_URL": f"duckdb:///{self.warehouse}",
            "CDP_WEBHOOK_URL": f"{endpoint.url if endpoint else 'http://127.0.0.1:9'}/messages",
            "CDP_WEBHOOK_BATCH_SIZE": str(batch),
            "CDP_WEBHOOK_RATE_PER_SECOND": "1000000000",
            "CDP_CONFIRM_ABOVE": "1000000000",
            "CDP_PII_HASH_KEY": "peer-benchmark-" + "0" * 32,
        }

    def fresh_ledger(self) -> Path:
        """A new copy of the preview's ledger, the ledger of the next run (`self.ledger`)."""
        self.runs += 1
        self.ledger = self.home / f"ledger-{self.runs}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            source = self.template.with_name(self.template.name + suffix)
            if source.exists():
                shutil.copy(source, self.ledger.with_name(self.ledger.name + suffix))
        return self.ledger

    def run(self, endpoint: Endpoint, batch: int, limit: int | None) -> dict:
        self.fresh_ledger()
        result = timed(self.command("run", limit), self.env(endpoint, batch), ROOT, endpoint)
        return result | {"ledger": self.ledger}

    def export(self, ledger: Path, target: Path) -> int:
        """The recipients a run sent, as the peers' `recipients` table (same keys, numbers
        and bodies: the same JSON)."""
        import duckdb
        import polars as pl

        from cdp_activation.ledger import Ledger

        book = Ledger(f"sqlite:///{ledger}")
        try:
            rows = book.rows(ACTIVATION).filter(pl.col("state") == "sent")
        finally:
            book.dispose()
        frame = rows.select(
            pl.col("idempotency_key").alias("key"),
            pl.col("recipient").alias("to"),
            "channel",
            pl.col("message").str.json_path_match("$.body").alias("body"),
        )
        con = duckdb.connect(str(target))
        try:
            con.register("sent", frame.to_arrow())
            con.execute("CREATE OR REPLACE TABLE recipients AS SELECT * FROM sent ORDER BY key")
        finally:
            con.close()
        return frame.height


class Peers:
    """drt and dlt in their own environment, reading `recipients` from `table_db`."""

    def __init__(self, work: Path, table_db: Path) -> None:
        self.work = work
        self.table_db = table_db
        self.python = PEERS_VENV / "bin" / "python"
        self.runs = 0

    def table(self, limit: int | None) -> str:
        """The recipients table, or a view of its first `limit` rows."""
        if limit is None:
            return "recipients"
        import duckdb

        con = duckdb.connect(str(self.table_db))
        try:
            con.execute(
                f"CREATE OR REPLACE VIEW recipients_{limit} AS "
                f"SELECT * FROM recipients ORDER BY key LIMIT {limit}"
            )
        finally:
            con.close()
        return f"recipients_{limit}"

    def dlt(self, endpoint: Endpoint, batch: int, limit: int | None, total: int) -> dict:
        self.runs += 1
        rows = min(limit or total, total)
        file_rows = max(batch, -(-rows // IN_FLIGHT))  # IN_FLIGHT load jobs at once
        env = dict(os.environ) | {
            "LOAD__WORKERS": str(IN_FLIGHT),
            "DATA_WRITER__FILE_MAX_ITEMS": str(file_rows),
            "RUNTIME__LOG_LEVEL": "WARNING",
            "DLT_TELEMETRY": "0",
            "RUNTIME__DLTHUB_TELEMETRY": "false",
        }
        command = [
            str(self.python),
            str(ROOT / "bench" / "peers" / "dlt_sink.py"),
            str(self.table_db),
            self.table(limit),
            f"{endpoint.url}/messages",
            str(batch),
            str(IN_FLIGHT),
            str(self.work / f"dlt-{self.runs}"),
            str(file_rows),
        ]
        return timed(command, env, self.work, endpoint)

    def drt(self, endpoint: Endpoint, batch: int, limit: int | None) -> dict:
        self.runs += 1
        project = self.work / f"drt-{self.runs}"
        (project / "syncs").mkdir(parents=True)
        (project / ".home" / ".drt").mkdir(parents=True)
        (project / "drt_project.yml").write_text(
            'name: peer_bench\nversion: "0.1"\nprofile: bench\n'
        )
        (project / ".home" / ".drt" / "profiles.yml").write_text(
            f"bench:\n  type: duckdb\n  database: {self.table_db}\n"
        )
        if batch == 1:
            body = '  body_mode: record\n  body_template: "{{ row | tojson }}"\n'
        else:
            body = (
                '  body_mode: batch\n  batch_template: "{{ rows | tojson }}"\n'
                f"  max_records_per_request: {batch}\n"
            )
        (project / "syncs" / "gateway.yml").write_text(
            "name: gateway\n"
            f'model: "SELECT key, \\"to\\", channel, NULL AS template, body FROM '
            f'{self.table(limit)} ORDER BY key"\n'
            "destination:\n  type: rest_api\n"
            f'  url: "{endpoint.url}/messages"\n  method: POST\n'
            '  headers:\n    Content-Type: "application/json"\n'
            f"{body}"
            f"sync:\n  mode: full\n  batch_size: {max(batch, 200)}\n"
            "  rate_limit:\n    requests_per_second: 1000000\n  on_error: fail\n"
        )
        env = dict(os.environ) | {"HOME": str(project / ".home"), "DRT_TELEMETRY": "0"}
        return timed([str(PEERS_VENV / "bin" / "drt"), "run"], env, project, endpoint)


# ---------------------------------------------------------------- the benchmark


def median_of(repeats: int, run: Callable[[], dict]) -> dict:
    """The median run by rate (each run's own figures kept together)."""
    results = sorted((run() for _ in range(repeats)), key=lambda r: r["recipients"] / r["wall"])
    chosen = results[len(results) // 2]
    chosen["rates"] = [r["recipients"] / r["wall"] for r in results]
    return chosen


def measure(
    name: str,
    run: Callable[[int | None], dict],
    size: int | None,
    repeats: int,
) -> dict:
    """A sender's median full run and its start-up run (200 recipients): rate and CPU."""
    full = median_of(repeats, lambda: run(size))
    small = median_of(repeats, lambda: run(STARTUP_RECIPIENTS))
    extra = full["recipients"] - small["recipients"]
    full |= {
        "sender": name,
        "rate": full["recipients"] / full["wall"],
        # The steady rate: the extra recipients over the extra wall time of the full run.
        "steady_rate": extra / (full["wall"] - small["wall"]) if extra > 0 else None,
        "startup_cpu": small["cpu"],
        "startup_wall": small["wall"],
        "marginal_cpu_us": 1e6 * (full["cpu"] - small["cpu"]) / extra if extra > 0 else None,
        "endpoint_cpu_us": 1e6 * full["endpoint_cpu"] / max(full["recipients"], 1),
    }
    if full["distinct"] != full["recipients"]:
        raise RuntimeError(
            f"{name} delivered {full['recipients']} messages to {full['distinct']} distinct keys"
        )
    full.pop("ledger", None)
    print(json.dumps({k: v for k, v in full.items() if k != "rates"}, default=str), file=sys.stderr)
    return full


def report(rows: list[dict], args: argparse.Namespace, skipped: dict[str, str]) -> str:
    lines = [
        "# Peers: the project, drt and dlt on the same job",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `python -m bench peers "
        f"--customers {args.customers} --single {args.single} --repeats {args.repeats}` on "
        f"{os.cpu_count()} CPUs ({_cpu_model()}), Python {sys.version.split()[0]}: drt-core "
        "1.2.1 and dlt 1.31.0 in their own environment (bench/data/peers-venv); the endpoint "
        "(bench/peer_endpoint.py) in its own process on 127.0.0.1; medians of "
        f"{args.repeats} runs.",
        "",
        "| records/request | endpoint latency | sender | recipients | recipients/s, whole run | "
        "recipients/s after start-up | ÷ faster peer (after start-up) | CPU per recipient "
        "after start-up | start-up (200 recipients) CPU / wall | endpoint CPU per recipient |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, latency in sorted({(r["batch"], r["latency"]) for r in rows}, reverse=True):
        group = [r for r in rows if (r["batch"], r["latency"]) == (batch, latency)]
        peers = [r["steady_rate"] or 0.0 for r in group if r["sender"] != "project"]
        best = max(peers, default=None)
        for r in group:
            steady = r["steady_rate"]
            ratio = f"{steady / best:.2f}" if best and steady and r["sender"] == "project" else ""
            marginal = f"{r['marginal_cpu_us']:.0f} µs" if r["marginal_cpu_us"] else ""
            lines.append(
                f"| {batch} | {latency:g} ms | {r['sender']} | {r['recipients']:,} | "
                f"{r['rate']:,.0f} | {f'{steady:,.0f}' if steady else ''} | {ratio} | "
                f"{marginal} | {r['startup_cpu']:.2f} s / "
                f"{r['startup_wall']:.2f} s | {r['endpoint_cpu_us']:.0f} µs |"
            )
    for peer, why in skipped.items():
        lines.append(f"\n{peer} skipped: {why}")
    lines += [
        "",
        "Each sender's runs are in its own process; recipients/s counts start-up (the project's",
        "includes its audience query and policy over the whole warehouse, its ledger and the",
        "Dagster run). drt sends one request at a time; dlt and the project keep "
        f"{IN_FLIGHT} in flight.",
    ]
    return "\n".join(lines) + "\n"


def senders(
    project: Project,
    peers: Peers,
    endpoint: Endpoint,
    batch: int,
    size: int | None,
    total: int,
    skipped: dict[str, str],
    slow_cap: int,
) -> list[tuple[str, Callable[[int | None], dict], int | None]]:
    """The senders of one (batch, endpoint) cell: each a run of n recipients, and its n."""
    group: list[tuple[str, Callable[[int | None], dict], int | None]] = [
        ("project", lambda n: project.run(endpoint, batch, n), size)
    ]
    if "dlt" not in skipped:
        group.append(("dlt", lambda n: peers.dlt(endpoint, batch, n, total), size))
    if "drt" not in skipped:
        # drt sends one request at a time: at 1 a request behind latency, fewer recipients.
        cap = slow_cap if batch == 1 and endpoint.latency_ms else size
        group.append(("drt", lambda n: peers.drt(endpoint, batch, n), cap))
    return group


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench peers")
    parser.add_argument("--customers", type=int, default=100_000, help="demo warehouse size")
    parser.add_argument("--single", type=int, default=3_000, help="recipients at 1 a request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 100.0])
    parser.add_argument(
        "--drt-slow-cap",
        type=int,
        default=300,
        help="drt's recipients at 1 a request behind latency (it sends one at a time)",
    )
    args = parser.parse_args(argv)
    skipped = install_peers()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cdp-peers-") as tmp:
        work = Path(tmp)
        project = Project(work, args.customers)
        peers = Peers(work, work / "peers.duckdb")
        total = 0  # recipients the project sent in its first run: the peers' table
        for latency in args.latencies:
            endpoint = Endpoint(latency)
            try:
                if not total:
                    first = project.run(endpoint, 200, None)
                    total = project.export(first["ledger"], work / "peers.duckdb")
                for batch, size in ((200, None), (1, args.single)):
                    cell = senders(
                        project, peers, endpoint, batch, size, total, skipped, args.drt_slow_cap
                    )
                    for name, run, n in cell:
                        result = measure(name, run, n, args.repeats)
                        rows.append(result | {"batch": batch, "latency": latency})
            finally:
                endpoint.close()
    publish(RESULTS, report(rows, args, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
