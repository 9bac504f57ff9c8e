"""dlt's side of the peer benchmark, run in the peers' own environment (never this project's).

`python dlt_sink.py WAREHOUSE TABLE URL BATCH WORKERS PIPELINES_DIR`: read the recipients
table from DuckDB as Arrow, and load it with a `@dlt.destination` sink that POSTs each batch
of BATCH records (one JSON object when BATCH is 1) to URL, WORKERS load jobs at once — dlt's
own recipe for a reverse-ETL push. Prints one JSON line: records loaded.
"""

import json
import sys
import threading

import dlt
import duckdb
import requests

warehouse, table, url, batch, workers, pipelines_dir = sys.argv[1:7]
batch_size, load_workers = int(batch), int(workers)
# Arrow batches of this many rows, one load job (file) each, so WORKERS jobs run at once.
file_rows = int(sys.argv[7])
local = threading.local()
HEADERS = {"Content-Type": "application/json"}


def session() -> requests.Session:
    if not hasattr(local, "session"):
        local.session = requests.Session()
    return local.session


@dlt.destination(
    batch_size=batch_size,
    loader_file_format="parquet",
    max_table_nesting=0,
    max_parallel_load_jobs=load_workers,
    loader_parallelism_strategy="parallel",
)
def gateway(items, table) -> None:
    rows = items.to_pylist() if hasattr(items, "to_pylist") else list(items)
    messages = [
        {
            "key": r["key"],
            "to": r["to"],
            "channel": r["channel"],
            "template": None,
            "body": r["body"],
        }
        for r in rows
    ]
    body = messages[0] if batch_size == 1 else messages
    answer = session().post(url, data=json.dumps(body), headers=HEADERS, timeout=60)
    answer.raise_for_status()


@dlt.resource(name="recipients", write_disposition="append")
def recipients():
    con = duckdb.connect(warehouse, read_only=True)
    try:
        query = con.execute(f'SELECT key, "to", channel, body FROM {table} ORDER BY key')
        yield from query.to_arrow_reader(file_rows)
    finally:
        con.close()


if __name__ == "__main__":
    pipeline = dlt.pipeline(
        pipeline_name="cdp_peer_bench", destination=gateway, pipelines_dir=pipelines_dir
    )
    info = pipeline.run(recipients())
    total = sum(len(package.jobs["completed_jobs"]) for package in info.load_packages)
    print(json.dumps({"jobs": total}))
