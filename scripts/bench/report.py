"""The benchmark report: reads the JSON figures of scripts/bench.sh from a folder, prints one table
(figure, value, ceiling or goal, ratio) and writes it to table.md, and draws the open-loop sweep
as latency.svg. Figures only: nothing here passes or fails."""

import csv
import glob
import json
import os
import statistics
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
pg_writes = load("pg-writes.json")
idle = load("idle.json")
soak = load("soak.json")
soak_load = load("soak-load.json")


def runs(pattern):
    """The figures of every run whose file matches `pattern`, in run order."""
    paths = glob.glob(os.path.join(out, pattern))
    return [json.load(open(p)) for p in sorted(paths, key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))]


closed = runs("closed-[0-9]*.json")
reads = runs("read-[0-9]*.json")
ghz1 = runs("ghz-1-[0-9]*.json")
ghz50 = runs("ghz-50-[0-9]*.json")
by_rate = {}
for path in glob.glob(os.path.join(out, "open-*-*.json")):
    figures = json.load(open(path))
    by_rate.setdefault(figures["offered_per_sec"], []).append(figures)
rates = sorted(by_rate)


def ghz_p(report, pct):
    for entry in report.get("latencyDistribution") or []:
        if entry["percentage"] == pct:
            return entry["latency"] / 1e6
    return float("nan")


rows = []


def row(figure, values, unit, reference, reference_text, higher_is_better=True):
    """One figure: the median of its runs, with the minimum and maximum when there are several;
    the ratio is the median's."""
    values = [v for v in values if v == v]
    if not values:
        rows.append((figure, "no figure", reference_text, ""))
        return
    value = statistics.median(values)
    if reference:
        ratio = value / reference if higher_is_better else reference / value if value else float("inf")
        ratio_text = f"{ratio:.2f}"
    else:
        ratio_text = ""
    text = f"{value:,.1f} {unit}"
    if len(values) > 1:
        text += f" ({min(values):,.1f} to {max(values):,.1f}, {len(values)} runs)"
    rows.append((figure, text, reference_text, ratio_text))


def median_of(figures, *path):
    values = []
    for f in figures:
        for key in path:
            f = f[key]
        values.append(f)
    return statistics.median(values)


# The pipeline writes one purchases row per purchase (no outbox): its PostgreSQL ceiling is the
# purchases-only shape.
ceiling = min(pg_only["purchases_per_sec"], kafka["produce_per_sec"], redis["events_per_sec"])
shape = f"{closed[0]['connections']} conn x {closed[0]['in_flight']} in flight"
row(f"visible in gRPC: acked and counted (closed loop, {shape}; run 1 right after start-up)",
    [c["sustained_counted_per_sec"] for c in closed], "/s", 40000.0,
    f"goal >= 40,000/s; ceiling {ceiling:,.0f}/s (lowest of PostgreSQL, Kafka, Redis)")
rows.append(("  by run, in order", ", ".join(f"{c['sustained_counted_per_sec']:,.0f}/s" for c in closed), "", ""))
row("  acked (same runs)", [c["acked_per_sec"] for c in closed], "/s", pg_only["purchases_per_sec"],
    f"PostgreSQL ceiling {pg_only['purchases_per_sec']:,.0f}/s")
row("  last ack to last counted (same runs)", [c["counted_secs_after_last_ack"] for c in closed], "s", None, "")
row("  ack latency p99 (same runs)", [c["ack_latency"]["p99_ms"] for c in closed], "ms", None, "")
light = [r for r in rates if r <= 5000]
if light:
    rate = light[-1]
    at = by_rate[rate]
    row(f"open loop at {rate:,.0f}/s: ack latency p50 (from intended send time)",
        [f["ack_latency"]["p50_ms"] for f in at], "ms", 2.0, "goal <= 2 ms", higher_is_better=False)
    row(f"open loop at {rate:,.0f}/s: ack latency p99",
        [f["ack_latency"]["p99_ms"] for f in at], "ms", 10.0, "goal <= 10 ms", higher_is_better=False)
    row(f"open loop at {rate:,.0f}/s: ack-to-visible in gRPC p99",
        [f["ack_to_visible"]["p99_ms"] for f in at], "ms", 50.0, "goal <= 50 ms", higher_is_better=False)
# The knee: the highest offered rate up to which every rate's median ack-to-visible p99 is at most
# 250 ms.
KNEE_MS = 250.0
knee = 0
for rate in rates:
    if median_of(by_rate[rate], "ack_to_visible", "p99_ms") > KNEE_MS:
        break
    knee = rate
beyond = [r for r in rates if r > knee]
rows.append(("open-loop sweep: highest offered rate with ack-to-visible p99 <= 250 ms (the knee)",
             f"{knee:,} /s" + (f" (next step, {beyond[0]:,}/s: p99 {median_of(by_rate[beyond[0]], 'ack_to_visible', 'p99_ms'):,.0f} ms)" if beyond else " (every rate offered)"),
             "goal >= 35,000/s", f"{knee / 35000:.2f}"))
row("GetTotalSpent, 1 client (ghz): p99", [ghz_p(g, 99) for g in ghz1], "ms", 1.0, "goal <= 1 ms", higher_is_better=False)
row("GetTotalSpent, 1 client (ghz): rate", [g["rps"] for g in ghz1], "calls/s", None, "")
row("GetTotalSpent, 50 concurrent over 4 connections (ghz)", [g["rps"] for g in ghz50], "calls/s", 30000.0, "goal >= 30,000/s")
row("  p99 (same runs)", [ghz_p(g, 99) for g in ghz50], "ms", 5.0, "goal <= 5 ms", higher_is_better=False)
row("GetTotalSpent, 50 concurrent over 4 connections (walletctl)", [r["calls_per_sec"] for r in reads], "calls/s", 30000.0, "goal >= 30,000/s")
row("  p99 (same runs)", [r["latency"]["p99_ms"] for r in reads], "ms", 5.0, "goal <= 5 ms", higher_is_better=False)
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
row("idle WebSocket connection, server memory", [idle["kib_per_connection"]], "KiB", 20.0,
    f"goal <= 20 KiB ({idle['connections']} connections)", higher_is_better=False)
row("ceiling: PostgreSQL, purchases + outbox rows, the old path (pgbench, 4 clients)", [pg["purchases_per_sec"]], "/s", None, "")
row("ceiling: PostgreSQL, purchases only (pgbench, 4 clients)", [pg_only["purchases_per_sec"]], "/s", None, "")
fsync = load("ceiling-fsync.json")
if fsync:
    row("ceiling: fdatasync, one 8 kB write, where PostgreSQL keeps its data (pg_test_fsync)",
        [fsync["fdatasync_usecs"]], "µs", None, "the floor of a commit's wait")
row("ceiling: Kafka produce, acks=all, 180 B (ProducerPerformance)", [kafka["produce_per_sec"]], "/s", None, "")
row("ceiling: Kafka consume (ConsumerPerformance)", [kafka["consume_per_sec"]], "/s", None, "")
row("ceiling: Redis, the project's counting script, one record per call", [redis["events_per_sec"]], "/s", None, "")
if soak:
    ws, grpc = soak["websocket_rss_kib"], soak["grpc_kafka_rss_kib"]
    rows.append((f"soak {soak['secs']} s at {soak['rate']:,}/s: RSS start -> end",
                 f"websocket {ws[0]:,} -> {ws[1]:,} KiB, grpc_kafka {grpc[0]:,} -> {grpc[1]:,} KiB", "flat", ""))
if soak_load:
    minutes = soak_load.get("ack_to_visible_per_minute", [])
    worst = max((m["p99_ms"] for m in minutes), default=float("nan"))
    rows.append(("soak: ack-to-visible p99, worst minute", f"{worst:,.1f} ms ({len(minutes)} minutes)",
                 "goal <= 250 ms in every minute", f"{250 / worst:.2f}" if worst else ""))

lines = [
    f"Machine: {machine['cpus']} cores, {machine['memory_kib'] // 1024:,} MiB; everything on one box"
    + (" (SMOKE RUN: tiny and short, figures meaningless)" if machine["smoke"] else ""),
    "",
    "| figure | value (median of runs; minimum to maximum) | ceiling or goal | ratio |",
    "|---|---|---|---|",
]
lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
runs_per_rate = max((len(v) for v in by_rate.values()), default=0)
lines += ["", f"Open-loop sweep (20 connections; latency from each purchase's intended send time; median of "
          f"{runs_per_rate} runs per rate, the range of the p99s beside them):", "",
          "| offered/s | achieved ack/s | ack p50 ms | ack p99 ms | ack p99.9 ms | ack-to-visible p50 ms | p99 ms | visible/s |",
          "|---|---|---|---|---|---|---|---|"]


def p99_range(figures, key):
    values = [f[key]["p99_ms"] for f in figures]
    return f"{statistics.median(values)} ({min(values)} to {max(values)})" if len(values) > 1 else f"{values[0]}"


for rate in rates:
    fs = by_rate[rate]
    lines.append(f"| {rate:,.0f} | {median_of(fs, 'achieved_ack_per_sec'):,.0f} | {median_of(fs, 'ack_latency', 'p50_ms')} | "
                 f"{p99_range(fs, 'ack_latency')} | {median_of(fs, 'ack_latency', 'p999_ms')} | "
                 f"{median_of(fs, 'ack_to_visible', 'p50_ms')} | {p99_range(fs, 'ack_to_visible')} | "
                 f"{median_of(fs, 'visible_per_sec'):,.0f} |")
if soak_load and soak_load.get("ack_to_visible_per_minute"):
    lines += ["", "Soak, ack-to-visible p99 per minute (ms): "
              + " ".join(f"{m['p99_ms']:g}" for m in soak_load["ack_to_visible_per_minute"])]
# The services' resident memory at the end of each minute of the soak (the sampler's last
# reading in that minute): flat, a plateau, or growth.
soak_csv = os.path.join(out, "backlog-soak.csv")
if os.path.exists(soak_csv):
    with open(soak_csv) as f:
        samples = [r for r in csv.DictReader(f) if r.get("grpc_kafka_rss_kib")]
    last = {}
    for r in samples:
        last[int(float(r["secs"]) // 60)] = r
    if last:
        ends = [last[m] for m in sorted(last)]
        lines += ["", "Soak, RSS at the end of each minute (MiB), websocket: "
                  + " ".join(f"{int(r['websocket_rss_kib']) / 1024:.0f}" for r in ends),
                  "Soak, RSS at the end of each minute (MiB), grpc_kafka: "
                  + " ".join(f"{int(r['grpc_kafka_rss_kib']) / 1024:.0f}" for r in ends),
                  "Soak, consumer lag at the end of each minute (records): "
                  + " ".join(r["consumer_lag"] for r in ends)]
table = "\n".join(lines)
print(table)
open(os.path.join(out, "table.md"), "w").write(table + "\n")

# The plot: ack p50/p99 and ack-to-visible p99 against offered load, log-scaled latency.
import math

W, H, L, B, T, R = 720, 420, 70, 50, 30, 170
xs = rates
series = [
    ("ack p50", "#1f77b4", [median_of(by_rate[r], "ack_latency", "p50_ms") for r in rates]),
    ("ack p99", "#d62728", [median_of(by_rate[r], "ack_latency", "p99_ms") for r in rates]),
    ("ack-to-visible p99", "#2ca02c", [median_of(by_rate[r], "ack_to_visible", "p99_ms") for r in rates]),
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


# The backlog after the ack over time in each closed-loop run: purchases committed but not yet
# relayed, and records in Kafka not yet counted (linear scale; sampled every half second).
def backlog_svg():
    curves = []
    for path in sorted(glob.glob(os.path.join(out, "backlog-closed-*.csv"))):
        run = path.rsplit("-", 1)[1].split(".")[0]
        with open(path) as f:
            samples = [r for r in csv.DictReader(f) if r["relay_backlog"] != ""]
        t = [float(r["secs"]) for r in samples]
        curves.append((f"run {run}: relay backlog", "#d62728", t, [float(r["relay_backlog"]) for r in samples], int(run)))
        curves.append((f"run {run}: consumer lag", "#1f77b4", t, [float(r["consumer_lag"]) for r in samples], int(run)))
    if not curves:
        return
    xmax = max((max(c[2], default=0) for c in curves), default=1) or 1
    ymax = max((max(c[3], default=0) for c in curves), default=1) or 1
    W, H, L, B, T, R = 720, 420, 80, 50, 30, 200
    X = lambda x: L + (W - L - R) * x / xmax
    Y = lambda y: H - B - (H - B - T) * y / ymax
    dashes = {1: "", 2: "6,3", 3: "2,3"}
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">Backlog after the ack over time (closed loop, each run)</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{L - 8}" y="{T + 4}" text-anchor="end">{ymax:,.0f}</text>',
           f'<text x="{L - 8}" y="{H - B + 4}" text-anchor="end">0</text>',
           f'<text x="{W - R}" y="{H - B + 18}" text-anchor="end">{xmax:.0f} s</text>',
           f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">seconds since the run started</text>']
    for i, (name, color, t, v, run) in enumerate(curves):
        points = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(t, v))
        dash = dashes.get(run, "1,1")
        svg.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5" stroke-dasharray="{dash}"/>')
        svg.append(f'<line x1="{W - R + 10}" y1="{T + 18 * i + 10}" x2="{W - R + 30}" y2="{T + 18 * i + 10}" stroke="{color}" stroke-dasharray="{dash}"/>')
        svg.append(f'<text x="{W - R + 35}" y="{T + 18 * i + 14}">{name}</text>')
    svg.append("</svg>")
    open(os.path.join(out, "backlog.svg"), "w").write("\n".join(svg) + "\n")


backlog_svg()
print(f"\nwritten: {out}/table.md, {out}/latency.svg, {out}/backlog.svg")
