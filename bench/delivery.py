"""Delivery transport benchmark: Meta template messages through each HTTP client, same run.

`python -m bench delivery [--messages N] [--concurrency 64 256] [--workers 1]` from the
repository root. The sandbox provider runs in its own process (uvicorn, uvloop + httptools when
installed, `--workers` processes sharing one listening socket) with 100 ms of latency on every
answer, like a distant provider. Each measurement runs in a fresh subprocess, so the client's
CPU time (`getrusage`, user + system) is its own:

- baseline: a bare aiohttp loop posting the connector's JSON payloads (no httpx, no connector);
- httpx: the real `MetaWhatsAppConnector.send_batch` (batch size 1) on plain `httpx.AsyncClient`;
- make_client: the same on `cdp_activation.delivery.transport.make_client` (httpx API,
  aiohttp transport);
- httpx-aiohttp: the same on the `httpx-aiohttp` package's transport, when it is installed.

`concurrency` workers send messages back to back until N are done or `--budget` seconds have
passed (plain httpx is slow enough that 20,000 messages would take minutes), so throughput is
messages done / wall time. The sandbox's CPU time is read from /proc around each measurement:
when it nears one core per worker process, the sandbox, not the client, is the ceiling.
Figures go to bench/results_delivery.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.index import refresh as refresh_index

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results_delivery.md"
_BENCH = (sys.executable, "-m", "bench", "delivery")
LATENCY_ENV = "CDP_BENCH_SANDBOX_LATENCY_MS"
CLIENTS = {
    "baseline": "baseline: bare aiohttp loop",
    "httpx": "plain httpx.AsyncClient",
    "make_client": "make_client (httpx + aiohttp transport)",
    "httpx-aiohttp": "httpx-aiohttp 0.2 transport (rejected)",
}


# ---------------------------------------------------------------------- the sandbox process


def sandbox_app() -> Any:
    """uvicorn factory: the sandbox with the benchmark's latency and a store that keeps nothing.

    The real store keeps every accepted message and request in memory; a million-message run
    would measure the sandbox's memory growth instead of the client.
    """
    from cdp_activation.sandbox import MessageStore, SandboxConfig, create_app

    class CountingStore(MessageStore):
        """Keeps nothing: a million recorded messages and attempts (and the garbage collector
        walking them) slowed the sandbox down by half over a long run."""

        def add(self, message: Any) -> None:
            pass

        def log(self, attempt: Any) -> None:
            pass

        def next_attempt(self, provider: str, request_hash: str) -> int:
            return 1  # no fault injection in the benchmarks: attempt numbers are not needed

    config = SandboxConfig(latency_ms=float(os.environ.get(LATENCY_ENV, "0")))
    return create_app(config, CountingStore())


def sandbox_main(argv: list[str]) -> int:
    """Serve `sandbox_app` on an inherited listening socket until terminated."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench delivery _sandbox")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    from uvicorn.supervisors import Multiprocess

    sock = socket.socket(fileno=args.fd)  # family detected from the socket (uvicorn's --fd: Unix)
    config = uvicorn.Config(
        "bench.delivery:sandbox_app",
        factory=True,
        workers=args.workers,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


class Sandbox:
    """The sandbox in its own process tree on a socket bound here (no port race)."""

    def __init__(self, latency_ms: float, workers: int) -> None:
        self.latency_ms = latency_ms
        self.workers = workers
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        fd = self.sock.fileno()
        self.process = subprocess.Popen(
            [*_BENCH, "_sandbox", "--fd", str(fd), "--workers", str(workers)],
            cwd=ROOT,
            pass_fds=[fd],
            env={**os.environ, LATENCY_ENV: str(latency_ms)},
        )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the sandbox process exited during startup")
            try:
                healthy = httpx.get(f"{self.url}/_sandbox/health", timeout=1).status_code == 200
                if healthy and (self.workers == 1 or len(self.pids()) > self.workers):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the sandbox did not answer within 30 s")

    def pids(self) -> list[int]:
        """The sandbox process and all its descendants (uvicorn's workers)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                todo.extend(int(child) for child in task.read_text().split())
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU of the sandbox's processes so far (Linux /proc)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sock.close()


# ---------------------------------------------------------------------- one measurement


def _messages(count: int) -> list[Any]:
    from cdp_activation.connectors.base import OutboundMessage, TemplateRef

    template = TemplateRef("winback_offer", "en", ("Ana", "45", "COMEBACK20"))
    # Digits ending in 13 are "not on WhatsApp" in the sandbox: skip them, every send succeeds.
    numbers = (f"+4479{n:08d}" for n in range(count * 2) if n % 100 != 13)
    return [
        OutboundMessage(key=f"k{i}", to=to, channel="whatsapp", template=template)
        for i, to in zip(range(count), numbers, strict=False)
    ]


async def _run_connector(
    client_kind: str, url: str, messages: list[Any], concurrency: int, budget: float
) -> Counter[str]:
    import httpx

    from cdp_activation.connectors import MetaWhatsAppConnector, connector_from_settings
    from cdp_activation.delivery.transport import make_client
    from cdp_activation.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        sandbox=True,
        meta_base_url=f"{url}/meta",
        meta_access_token=None,
    )
    connector = connector_from_settings("meta_whatsapp", settings)
    assert isinstance(connector, MetaWhatsAppConnector)
    if client_kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = httpx.AsyncClient(timeout=30.0, limits=limits)
    elif client_kind == "make_client":
        client = make_client(timeout=30.0, max_in_flight=concurrency)
    elif client_kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = httpx.AsyncClient(timeout=30.0, transport=AiohttpTransport(limits=limits))
    else:
        raise ValueError(client_kind)
    outcomes: Counter[str] = Counter()
    pending = iter(messages)
    deadline = time.perf_counter() + budget

    async def worker() -> None:
        for message in pending:
            [result] = await connector.send_batch(client, [message])
            outcomes[result.outcome.value] += 1
            if time.perf_counter() > deadline:
                return

    async with client:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def _run_baseline(
    url: str, messages: list[Any], concurrency: int, budget: float
) -> Counter[str]:
    """The floor: aiohttp posting the connector's own payloads, reading and parsing the JSON."""
    import aiohttp

    from cdp_activation.connectors import MetaWhatsAppConnector, connector_from_settings
    from cdp_activation.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        sandbox=True,
        meta_base_url=f"{url}/meta",
        meta_access_token=None,
    )
    connector = connector_from_settings("meta_whatsapp", settings)
    assert isinstance(connector, MetaWhatsAppConnector)
    endpoint = connector.messages_url
    headers = connector._headers()
    outcomes: Counter[str] = Counter()
    pending = iter(messages)
    deadline = time.perf_counter() + budget
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

    async def worker() -> None:
        for message in pending:
            payload = connector.build_payload(message)
            async with session.post(endpoint, json=payload, headers=headers) as response:
                data = json.loads(await response.read())
                ok = response.status == 200 and data["messages"][0]["id"]
            outcomes["sent" if ok else "other"] += 1
            if time.perf_counter() > deadline:
                return

    async with session:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def child_main(argv: list[str]) -> int:
    """One measurement in this (fresh) process; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench delivery _child")
    parser.add_argument("--client", required=True, choices=sorted(CLIENTS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--budget", type=float, required=True)
    args = parser.parse_args(argv)
    messages = _messages(args.messages)
    if args.client == "baseline":
        run = _run_baseline(args.url, messages, args.concurrency, args.budget)
    else:
        run = _run_connector(args.client, args.url, messages, args.concurrency, args.budget)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    outcomes = asyncio.run(run)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"wall": wall, "cpu": cpu, "outcomes": dict(outcomes)}))
    return 0


def measure(
    sandbox: Sandbox, client: str, messages: int, concurrency: int, budget: float
) -> dict[str, Any]:
    server_before = sandbox.cpu_seconds()
    done = subprocess.run(
        [
            *_BENCH,
            *("_child", "--client", client, "--url", sandbox.url),
            *("--messages", str(messages), "--concurrency", str(concurrency)),
            *("--budget", str(budget)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{client} at {concurrency} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu"] = sandbox.cpu_seconds() - server_before
    count = sum(result["outcomes"].values())
    result |= {
        "client": client,
        "concurrency": concurrency,
        "count": count,
        "rate": count / result["wall"],
        "cpu_ms": 1000 * result["cpu"] / count,
        "server_cpu_ms": 1000 * result["server_cpu"] / count,
    }
    return result


# ---------------------------------------------------------------------- report


def _versions() -> str:
    names = ["httpx", "httpcore", "aiohttp", "uvicorn", "uvloop", "httptools", "httpx-aiohttp"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Delivery transport benchmark ({args.messages:,} Meta template messages)",
        "",
        f"Measured {now} with `{command}` on {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"Python {platform.python_version()}, {_versions()}. Sandbox: its own process, "
        f"{args.workers} uvicorn worker(s), {args.latency_ms:g} ms latency per answer. Each "
        f"client runs in a fresh process until {args.messages:,} messages or {args.budget:g} s.",
        "",
        "Client CPU is user + system time of the sending process per message; sandbox CPU is "
        "the server's, per message. Ratios are against the bare aiohttp loop at the same "
        "concurrency (rate: higher is better; CPU: lower is better).",
        "",
        "| in flight | client | messages | req/s | rate ÷ baseline | client CPU/msg "
        "| CPU ÷ baseline | sandbox CPU/msg | outcomes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for concurrency in args.concurrency:
        group = [r for r in rows if r["concurrency"] == concurrency]
        base = next(r for r in group if r["client"] == "baseline")
        for row in group:
            outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(row["outcomes"].items()))
            lines.append(
                f"| {concurrency} | {CLIENTS[row['client']]} | {row['count']:,} "
                f"| {row['rate']:,.0f} | {row['rate'] / base['rate']:.2f} "
                f"| {row['cpu_ms']:.3f} ms | {row['cpu_ms'] / base['cpu_ms']:.2f} "
                f"| {row['server_cpu_ms']:.3f} ms | {outcomes} |"
            )
    lines.append("")
    for concurrency in args.concurrency:
        base = next(
            r for r in rows if r["concurrency"] == concurrency and r["client"] == "baseline"
        )
        ideal = concurrency / (args.latency_ms / 1000) if args.latency_ms else float("inf")
        server_load = base["server_cpu"] / base["wall"]
        bound = "sandbox-bound" if server_load > 0.85 * args.workers else "not sandbox-bound"
        lines.append(
            f"- {concurrency} in flight: the latency allows at most {ideal:,.0f} req/s; the "
            f"baseline reached {base['rate']:,.0f} ({base['rate'] / ideal:.0%}) with the "
            f"sandbox busy {server_load:.2f} CPU-seconds per second across {args.workers} "
            f"worker(s) ({bound})."
        )
    lines += ["", "## Conclusion", ""]
    for concurrency in args.concurrency:
        group = {r["client"]: r for r in rows if r["concurrency"] == concurrency}
        if "make_client" in group and "httpx" in group:
            ours, plain = group["make_client"], group["httpx"]
            lines.append(
                f"- {concurrency} in flight: make_client sent {ours['rate']:,.0f} req/s, "
                f"{ours['rate'] / plain['rate']:.1f}x plain httpx, at "
                f"{plain['cpu_ms'] / ours['cpu_ms']:.0f}x less client CPU per message "
                f"({ours['cpu_ms']:.2f} ms against {plain['cpu_ms']:.2f} ms)."
            )
    lines += [
        "",
        "`make_client` (httpx API, `cdp_activation.delivery.transport.AiohttpTransport`) is the "
        "delivery client: plain httpx/httpcore spends milliseconds of CPU per request once many "
        "are in flight, so it cannot keep 64 or 256 requests moving. What remains between "
        "make_client and the bare aiohttp loop is httpx's own request/response building and the "
        "connector (~0.3 ms a message), the price of keeping httpx as the connectors' API. The "
        "`httpx-aiohttp` package is as fast but maps aiohttp's `ServerDisconnectedError` (the "
        "provider hung up after reading the request) to `httpx.ConnectTimeout`, which the "
        "connectors treat as never sent and resend: a possible duplicate message. Our transport "
        "maps it to `RemoteProtocolError` (UNKNOWN), as plain httpx does; "
        "tests/test_transport.py checks every such case against plain httpx.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench delivery")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=1, help="sandbox uvicorn processes")
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds at most per measurement"
    )
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    if argv and argv[0] == "_sandbox":
        return sandbox_main(argv[1:])
    if argv and argv[0] == "_child":
        return child_main(argv[1:])
    args = parser.parse_args(argv)
    clients = ["baseline", *(c for c in args.clients if c != "baseline")]
    try:
        metadata.version("httpx-aiohttp")
    except metadata.PackageNotFoundError:
        clients = [c for c in clients if c != "httpx-aiohttp"]
    command = "python -m bench delivery " + " ".join(argv)
    rows = []
    sandbox = Sandbox(args.latency_ms, args.workers)
    try:
        for concurrency in args.concurrency:
            for client in clients:
                row = measure(sandbox, client, args.messages, concurrency, args.budget)
                rows.append(row)
                print(
                    f"{concurrency:>4} in flight  {client:<14} {row['count']:>9,} msgs "
                    f"{row['rate']:>8,.0f} req/s  client {row['cpu_ms']:.3f} ms CPU/msg  "
                    f"sandbox {row['server_cpu_ms']:.3f} ms CPU/msg",
                    flush=True,
                )
    finally:
        sandbox.close()
    text = report(rows, args, command.strip())
    args.output.write_text(text)
    refresh_index()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
