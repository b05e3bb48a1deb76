"""Metric batches into an MLflow tracking server, two ways.

    python log_batch.py URI BATCHES

Creates an experiment and a run, then sends BATCHES `runs/log-batch`
requests of 1,000 points each (MLflow's per-request maximum), twice:

* `client`: through MLflow's own `MlflowClient.log_batch`, as a training
  script does. On this machine the Python client itself tops out near 30k
  points/s (against a server that answers instantly), so this measures the
  client as much as the server.
* `wire`: the same requests, their JSON bodies built before the clock
  starts, sent one after another on one keep-alive connection: what the
  server takes.

Then reads the history back to check every point landed, and prints one
JSON line.
"""
import http.client
import json
import os
import sys
import time
import urllib.parse
import uuid

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

uri, batches = sys.argv[1], int(sys.argv[2])
client = MlflowClient(tracking_uri=uri)
experiment = client.create_experiment(f"throughput-{uuid.uuid4().hex[:8]}")
now = int(time.time() * 1000)


def steps(b, offset):
    return range(offset + b * 1000, offset + (b + 1) * 1000)


# MLflow's client.
run = client.create_run(experiment, run_name="client").info.run_id
payloads = [[Metric("loss", 1.0 / (1 + i), now, i) for i in steps(b, 0)] for b in range(batches)]
client.log_batch(run, metrics=[Metric("warmup", 0.0, now, 0)])
t = time.perf_counter()
for metrics in payloads:
    client.log_batch(run, metrics=metrics)
by_client = time.perf_counter() - t
client.set_terminated(run)
assert len(client.get_metric_history(run, "loss")) == batches * 1000

# The wire.
run = client.create_run(experiment, run_name="wire").info.run_id
bodies = [
    json.dumps({"run_id": run, "metrics": [
        {"key": "loss", "value": 1.0 / (1 + i), "timestamp": now, "step": i} for i in steps(b, 0)
    ]}).encode()
    for b in range(batches)
]
url = urllib.parse.urlparse(uri)
conn = http.client.HTTPConnection(url.hostname, url.port)
headers = {"Content-Type": "application/json"}
if os.environ.get("MLFLOW_TRACKING_TOKEN"):
    headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
t = time.perf_counter()
for body in bodies:
    conn.request("POST", "/api/2.0/mlflow/runs/log-batch", body, headers)
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
by_wire = time.perf_counter() - t
client.set_terminated(run)
assert len(client.get_metric_history(run, "loss")) == batches * 1000

points = batches * 1000
print(json.dumps({"points": points, "client_s": by_client, "wire_s": by_wire,
                  "client": points / by_client, "wire": points / by_wire}))
