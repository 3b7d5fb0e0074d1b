"""The benchmark report: reads the JSON figures of scripts/bench.sh from a folder, prints one table
(figure, value, ceiling or goal, ratio) and writes it to table.md, and draws the open-loop sweep
as latency.svg. Figures only: nothing here passes or fails."""

import glob
import json
import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


machine = load("machine.json")
pg = load("ceiling-pg-outbox.json")
pg_only = load("ceiling-pg-only.json")
kafka = load("ceiling-kafka.json")
redis = load("ceiling-redis.json")
closed = load("closed.json")
pg_writes = load("pg-writes.json")
read = load("read.json")
idle = load("idle.json")
soak = load("soak.json")
ghz1 = load("ghz-1.json")
ghz50 = load("ghz-50.json")
sweep = sorted(
    (load(os.path.basename(p)) for p in glob.glob(os.path.join(out, "open-*.json"))),
    key=lambda f: f["offered_per_sec"],
)


def ghz_p(report, pct):
    for entry in report.get("latencyDistribution") or []:
        if entry["percentage"] == pct:
            return entry["latency"] / 1e6
    return float("nan")


rows = []


def row(figure, value, unit, reference, reference_text, higher_is_better=True):
    if reference:
        ratio = value / reference if higher_is_better else reference / value if value else float("inf")
        ratio_text = f"{ratio:.2f}"
    else:
        ratio_text = ""
    rows.append((figure, f"{value:,.1f} {unit}", reference_text, ratio_text))


# The pipeline writes one purchases row per purchase (no outbox): its PostgreSQL ceiling is the
# purchases-only shape.
ceiling = min(pg_only["purchases_per_sec"], kafka["produce_per_sec"], redis["events_per_sec"])
row(f"sustained, acked and counted (closed loop, {closed['connections']} conn x {closed['in_flight']} in flight)",
    closed["sustained_counted_per_sec"], "/s", ceiling,
    f"ceiling {ceiling:,.0f}/s (lowest of PostgreSQL, Kafka, Redis); goal 40,000/s")
row("  acked (same run)", closed["acked_per_sec"], "/s", pg_only["purchases_per_sec"],
    f"PostgreSQL ceiling {pg_only['purchases_per_sec']:,.0f}/s")
row("  ack latency p99 (same run)", closed["ack_latency"]["p99_ms"], "ms", None, "")
light = [f for f in sweep if f["offered_per_sec"] <= 5000]
if light:
    f = light[-1]
    rate = f["offered_per_sec"]
    row(f"open loop at {rate:,.0f}/s: ack latency p99 (from intended send time)",
        f["ack_latency"]["p99_ms"], "ms", 10.0, "goal <= 10 ms", higher_is_better=False)
    row(f"open loop at {rate:,.0f}/s: ack-to-visible in gRPC p99",
        f["ack_to_visible"]["p99_ms"], "ms", 100.0, "goal <= 100 ms", higher_is_better=False)
row("GetTotalSpent, 1 client (ghz): p99", ghz_p(ghz1, 99), "ms", 1.0, "goal <= 1 ms", higher_is_better=False)
row("GetTotalSpent, 1 client (ghz): rate", ghz1["rps"], "calls/s", None, "")
row("GetTotalSpent, 50 concurrent over 4 connections (ghz)", ghz50["rps"], "calls/s", 30000.0, "goal >= 30,000/s")
row("  p99 (same run)", ghz_p(ghz50, 99), "ms", 5.0, "goal <= 5 ms", higher_is_better=False)
row("GetTotalSpent, 50 concurrent over 4 connections (walletctl)", read["calls_per_sec"], "calls/s", 30000.0, "goal >= 30,000/s")
if pg_writes:
    # One purchases row per purchase and one bookkeeping row per relay round; the outbox of a
    # deployment still moving from it would show here as an insert and a delete per purchase.
    n = max(pg_writes["purchases"], 1)
    parts = []
    for table in ("purchases", "purchase_outbox", "relay_rounds"):
        b, a = pg_writes["before"].get(table, [0, 0, 0]), pg_writes["after"].get(table, [0, 0, 0])
        ins, upd, dele = (a[i] - b[i] for i in range(3))
        parts.append(f"{table} {ins / n:.3f} ins, {upd / n:.3f} upd, {dele / n:.3f} del")
    rows.append((f"PostgreSQL row writes per purchase (closed loop, {pg_writes['purchases']:,} purchases)",
                 "; ".join(parts), "1 purchases row, no outbox, 1 round row per batch", ""))
row("idle WebSocket connection, server memory", idle["kib_per_connection"], "KiB", 20.0,
    f"goal <= 20 KiB ({idle['connections']} connections)", higher_is_better=False)
row("ceiling: PostgreSQL, purchases + outbox rows, the old path (pgbench, 4 clients)", pg["purchases_per_sec"], "/s", None, "")
row("ceiling: PostgreSQL, purchases only (pgbench, 4 clients)", pg_only["purchases_per_sec"], "/s", None, "")
row("ceiling: Kafka produce, acks=all, 180 B (ProducerPerformance)", kafka["produce_per_sec"], "/s", None, "")
row("ceiling: Kafka consume (ConsumerPerformance)", kafka["consume_per_sec"], "/s", None, "")
row("ceiling: Redis, the project's counting script, one record per call", redis["events_per_sec"], "/s", None, "")
if soak:
    ws, grpc = soak["websocket_rss_kib"], soak["grpc_kafka_rss_kib"]
    rows.append((f"soak {soak['secs']} s at {soak['rate']:,}/s: RSS start -> end",
                 f"websocket {ws[0]:,} -> {ws[1]:,} KiB, grpc_kafka {grpc[0]:,} -> {grpc[1]:,} KiB", "flat", ""))

lines = [
    f"Machine: {machine['cpus']} cores, {machine['memory_kib'] // 1024:,} MiB; everything on one box"
    + (" (SMOKE RUN: tiny and short, figures meaningless)" if machine["smoke"] else ""),
    "",
    "| figure | value | ceiling or goal | ratio |",
    "|---|---|---|---|",
]
lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
lines += ["", "Open-loop sweep (20 connections; latency from each purchase's intended send time):", "",
          "| offered/s | achieved ack/s | ack p50 ms | ack p99 ms | ack p99.9 ms | ack-to-visible p50 ms | p99 ms | visible/s |",
          "|---|---|---|---|---|---|---|---|"]
for f in sweep:
    a, v = f["ack_latency"], f["ack_to_visible"]
    lines.append(f"| {f['offered_per_sec']:,.0f} | {f['achieved_ack_per_sec']:,.0f} | {a['p50_ms']} | {a['p99_ms']} | "
                 f"{a['p999_ms']} | {v['p50_ms']} | {v['p99_ms']} | {f['visible_per_sec']:,.0f} |")
table = "\n".join(lines)
print(table)
open(os.path.join(out, "table.md"), "w").write(table + "\n")

# The plot: ack p50/p99 and ack-to-visible p99 against offered load, log-scaled latency.
import math

W, H, L, B, T, R = 720, 420, 70, 50, 30, 170
xs = [f["offered_per_sec"] for f in sweep]
series = [
    ("ack p50", "#1f77b4", [f["ack_latency"]["p50_ms"] for f in sweep]),
    ("ack p99", "#d62728", [f["ack_latency"]["p99_ms"] for f in sweep]),
    ("ack-to-visible p99", "#2ca02c", [f["ack_to_visible"]["p99_ms"] for f in sweep]),
]
values = [max(v, 0.1) for _, _, vs in series for v in vs] or [1]
lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
hi = max(hi, lo + 1)
xmax = max(xs or [1])


def px(x):
    return L + (W - L - R) * x / xmax


def py(v):
    return H - B - (H - B - T) * (math.log10(max(v, 0.1)) - lo) / (hi - lo)


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{L}" y="18" font-size="14">Latency versus offered load (open loop, {machine["cpus"]} cores)</text>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
for e in range(lo, hi + 1):
    y = py(10 ** e)
    svg.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#ddd"/>')
    svg.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:g} ms</text>')
for x in xs:
    svg.append(f'<text x="{px(x):.1f}" y="{H - B + 18}" text-anchor="middle">{x / 1000:g}k</text>')
svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">offered purchases per second</text>')
for i, (name, color, vs) in enumerate(series):
    points = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in zip(xs, vs))
    svg.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
    for x, v in zip(xs, vs):
        svg.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"/>')
    svg.append(f'<line x1="{W - R + 15}" y1="{T + 20 * i + 10}" x2="{W - R + 35}" y2="{T + 20 * i + 10}" stroke="{color}" stroke-width="2"/>')
    svg.append(f'<text x="{W - R + 40}" y="{T + 20 * i + 14}">{name}</text>')
svg.append("</svg>")
open(os.path.join(out, "latency.svg"), "w").write("\n".join(svg) + "\n")
print(f"\nwritten: {out}/table.md, {out}/latency.svg")
