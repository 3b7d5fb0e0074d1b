"""The figures of scripts/bench.sh --cluster: one of each against the replicas stack, the same
closed loop (the replicas' split over two walletctl processes at once, one per websocket).

A run's rate on the replicas is both processes' purchases over the longer one's time from its
first send until its last purchase was counted (each process's `acked / sustained_counted_per_sec`).
Writes table.md beside the JSON files and prints it.
"""

import json
import pathlib
import statistics
import sys

out = pathlib.Path(sys.argv[1])


def load(name):
    return json.loads((out / name).read_text())


def spread(values):
    values = sorted(values)
    return f"{statistics.median(values):,.0f} ({values[0]:,.0f} to {values[-1]:,.0f})"


single, replicas, single_p99, replicas_p99, exact = [], [], [], [], True
runs = sorted(int(p.stem.split("-")[1]) for p in out.glob("single-*.json"))
for run in runs:
    one = load(f"single-{run}.json")
    single.append(one["sustained_counted_per_sec"])
    single_p99.append(one["ack_latency"]["p99_ms"])
    exact &= one["totals_exact"]
    parts = [load(f"replicas-{run}-{n}.json") for n in (1, 2)]
    elapsed = max(p["acked"] / p["sustained_counted_per_sec"] for p in parts)
    replicas.append(sum(p["acked"] for p in parts) / elapsed)
    replicas_p99.append(max(p["ack_latency"]["p99_ms"] for p in parts))
    exact &= all(p["totals_exact"] for p in parts)

table = "\n".join(
    [
        f"Closed loop, {len(runs)} runs each (median, range); totals exact in every run: {exact}",
        "",
        "| stack | visible purchases/s | ack p99 ms |",
        "|---|---|---|",
        f"| one of each (1 websocket, 1 grpc_kafka, 1 broker, 1 Redis) | {spread(single)} | {spread(single_p99)} |",
        f"| replicas (2 websocket, 3 grpc_kafka, 3 brokers RF 3, Redis Cluster 3+3) | {spread(replicas)} | {spread(replicas_p99)} |",
        f"| ratio replicas / one of each (medians) | {statistics.median(replicas) / statistics.median(single):.2f} | |",
        "",
    ]
)
(out / "table.md").write_text(table)
print(table)
sys.exit(0 if exact else 1)
