"""The loopback endpoint the peer benchmark sends to: the JSON webhook contract, nothing more.

`python -m bench.peer_endpoint PORT LATENCY_MS` serves `POST /messages` (a JSON array of
messages, or one message object, as a peer sending one record a request posts) and answers
each message `accepted` with an id, after LATENCY_MS, as `connectors/webhook.py` expects.
`GET /count` gives the messages received and the distinct keys among them, so the benchmark
checks that every sender delivered every recipient once; `POST /reset` zeroes both.

aiohttp's own server, no framework and no validation: it should cost far less than any
sender, so the senders, not the endpoint, are what is measured (its CPU is reported too).
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


def app(latency_ms: float) -> web.Application:
    received = {"messages": 0}
    keys: set[str] = set()

    async def messages(request: web.Request) -> web.Response:
        data = json.loads(await request.read())
        items = data if isinstance(data, list) else [data]
        received["messages"] += len(items)
        answer = []
        for item in items:
            key = str(item.get("key"))
            keys.add(key)
            answer.append({"key": key, "status": "accepted", "id": f"gw-{key[-12:]}"})
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        return web.Response(
            body=json.dumps(answer if isinstance(data, list) else answer[0]),
            content_type="application/json",
        )

    async def count(_: web.Request) -> web.Response:
        return web.json_response({"messages": received["messages"], "keys": len(keys)})

    async def reset(_: web.Request) -> web.Response:
        received["messages"] = 0
        keys.clear()
        return web.json_response({})

    application = web.Application(client_max_size=64 * 1024 * 1024)
    application.router.add_post("/messages", messages)
    application.router.add_get("/count", count)
    application.router.add_post("/reset", reset)
    return application


if __name__ == "__main__":
    port, latency = int(sys.argv[1]), float(sys.argv[2])
    web.run_app(app(latency), host="127.0.0.1", port=port, print=None, backlog=4096)
