#!/usr/bin/env python3
"""Turn one benchmark run (bench/results/<stamp>/) into docs/benchmarks.md and
docs/bench-latency.svg. Standard library only.

    python3 bench/report.py bench/results/<stamp> [--docs DIR]

Every figure is the median across rounds, and its ratio to nginx is the median of the
per-round ratios (each proxy against nginx measured in the same round). The section between
<!-- log:start --> and <!-- log:end --> of the existing docs/benchmarks.md (the optimisation
log) is carried over unchanged.
"""
import argparse
import html
import json
import math
import re
import os
import statistics
import sys
from collections import defaultdict

ORDER = ["gatehouse", "nginx", "haproxy", "caddy", "pingora"]
LABEL = {"gatehouse": "Gatehouse", "nginx": "nginx", "haproxy": "HAProxy", "caddy": "Caddy",
         "pingora": "Pingora (pingora-ref)"}
SHORT = {"direct": "no proxy", "gatehouse": "Gatehouse", "nginx": "nginx", "haproxy": "HAProxy", "caddy": "Caddy",
         "pingora": "Pingora"}
COLOR = {"direct": "#888888", "gatehouse": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4", "caddy": "#9467bd",
         "pingora": "#ff7f0e"}
BODY_LABEL = {"100": "100 B", "64k": "64 KiB", "1m": "1 MiB"}
BODIES = ["100", "64k", "1m"]
LOG_START, LOG_END = "<!-- log:start -->", "<!-- log:end -->"
DEFAULT_LOG = ("_No optimisation recorded yet. Add one entry per change: what was slow (with the "
               "profile that showed it), what changed, and the figures before and after, each "
               "from a run of `bash bench/run.sh`._")
NOISE = 1.15  # differences under ~15% are within this machine's noise (issue 3)


# ---------------------------------------------------------------- loading
def load(results_dir):
    with open(os.path.join(results_dir, "meta.json")) as f:
        meta = json.load(f)
    recs = []
    path = os.path.join(results_dir, "results.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        print(f"report.py: skipping a bad line in {path}", file=sys.stderr)
    return meta, recs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Figure:
    """Per-proxy, per-round values of one figure; medians and ratios to nginx."""

    def __init__(self):
        self.by = defaultdict(dict)  # proxy -> round -> value

    def add(self, proxy, rnd, value):
        if value is not None:
            self.by[proxy][rnd] = value

    def median(self, proxy):
        return med(self.by.get(proxy, {}).values())

    def ratio(self, proxy, base="nginx"):
        mine, ref = self.by.get(proxy, {}), self.by.get(base, {})
        ratios = [mine[r] / ref[r] for r in mine if r in ref and ref[r]]
        return med(ratios)

    def rounds(self, proxy):
        return len(self.by.get(proxy, {}))


def collect(recs):
    figs = defaultdict(Figure)
    lat_runs = defaultdict(list)  # proxy -> [(round, result)] for the 100 B fixed-rate run
    large = defaultdict(lambda: defaultdict(dict))  # proxy -> round -> {"small"/"large": rec}
    errors = []
    for r in recs:
        kind, p, rnd = r.get("kind"), r.get("proxy"), r.get("round")
        if "body" in r:
            r["body"] = str(r["body"])
        if r.get("error") or kind == "error":
            errors.append(r)
            if kind == "error":
                continue
        if kind == "idle":
            figs["idle_rss_mib"].add(p, rnd, r["rss_kib"] / 1024)
            if r.get("pss_kib"):
                figs["idle_pss_mib"].add(p, rnd, r["pss_kib"] / 1024)
        elif kind == "saturation" and not r.get("error"):
            b = r["body"]
            figs[f"cpu_{b}"].add(p, rnd, r["cpu_us_per_req"])
            figs[f"rps_{b}"].add(p, rnd, r["rps"])
            if isinstance(r.get("wall_s"), (int, float)) and r["wall_s"] > 0:
                figs[f"busy_{b}"].add(p, rnd, 100 * r["cpu_ticks"] / r["hz"] / r["wall_s"])
        elif kind == "latency" and r.get("result"):
            b, res = r["body"], r["result"]
            for q in ("p50", "p99", "p999"):
                v = res.get(f"{q}_us")
                figs[f"{q}_{b}"].add(p, rnd, v / 1000 if v is not None else None)
            figs[f"errors_{b}"].add(p, rnd, (res.get("errors") or 0))
            if b == "100":
                lat_runs[p].append((rnd, res))
            if r.get("upstream_requests", 0) > 0 and r.get("hz"):
                figs[f"fcpu_{b}"].add(p, rnd, r["cpu_ticks"] * (1e6 / r["hz"]) / r["upstream_requests"])
        elif kind == "reuse":
            reqs, conns = r["upstream_requests"], r["upstream_conns"]
            if reqs > 0:
                figs["conns_per_1k"].add(p, rnd, 1000 * conns / reqs)
                figs["reuse_pct"].add(p, rnd, 100 * (1 - conns / reqs))
        elif kind == "hold" and not r.get("error"):
            figs["kib_per_conn"].add(p, rnd, r["kib_per_conn"])
            figs["held"].add(p, rnd, r["ok"])
        elif kind == "startup":
            figs["first200_ms"].add(p, rnd, med(r.get("ms") or []))
        elif kind == "large" and r.get("result"):
            which = "large" if r["requested_hosts"] > 100 else "small"
            large[p][rnd][which] = r
        elif kind == "large_fail":
            errors.append(dict(r, error=f"did not listen within {r.get('limit_s')} s with "
                                        f"{r.get('hosts')} hosts"))
    for p, rounds in large.items():
        for rnd, pair in rounds.items():
            if "small" in pair and "large" in pair:
                s, l = pair["small"]["result"], pair["large"]["result"]
                for q in ("p99", "p999"):
                    if s.get(f"{q}_us") and l.get(f"{q}_us") is not None:
                        figs[f"tail_{q}"].add(p, rnd, l[f"{q}_us"] / s[f"{q}_us"])
                    figs[f"large_{q}_small"].add(p, rnd, (s.get(f"{q}_us") or 0) / 1000)
                    figs[f"large_{q}_large"].add(p, rnd, (l.get(f"{q}_us") or 0) / 1000)
            for which in ("small", "large"):
                if which in pair:
                    rec = pair[which]
                    figs[f"load_ms_{which}"].add(p, rnd, rec.get("load_ms"))
                    figs[f"large_rss_{which}"].add(p, rnd, rec.get("rss_kib", 0) / 1024)
                    figs[f"hosts_{which}"].add(p, rnd, rec.get("hosts"))
    return figs, lat_runs, errors


# ---------------------------------------------------------------- formatting
def fmt(v, digits=None):
    if v is None:
        return "—"
    if digits is None:
        a = abs(v)
        digits = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else 3
    return f"{v:,.{digits}f}"


def cell(fig, proxy, digits=None, ratio=True):
    v = fig.median(proxy)
    if v is None:
        return "—"
    s = fmt(v, digits)
    if ratio:
        r = fig.ratio(proxy)
        if r is not None:
            s += f" ({r:.2f}×)"
    return s


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- the chart
def svg_chart(lat_runs, proxies, path, title):
    """Latency by percentile, both axes logarithmic; one polyline per proxy."""
    W, H = 760, 440
    L, R, T, B = 70, 170, 40, 55
    pw, ph = W - L - R, H - T - B
    series = {}
    for p in proxies:
        runs = lat_runs.get(p)
        if not runs:
            continue
        # the round whose p99 is the median one: a representative run, not a best or worst
        runs = sorted(runs, key=lambda rr: rr[1].get("p99_us") or 0)
        res = runs[(len(runs) - 1) // 2][1]
        cdf = res.get("cdf") or []
        if not cdf:
            continue
        scale = 100.0 if max(pc for _, pc in cdf) <= 1.0 else 1.0
        pts = []
        for lat_us, pc in cdf:
            pc *= scale
            if 50 <= pc <= 99.99 and lat_us > 0:
                pts.append((math.log10(100 / (100 - pc)), lat_us / 1000))
        if pts:
            series[p] = sorted(pts)
    xmin, xmax = math.log10(2), 4.0
    if series:
        lats = [y for pts in series.values() for _, y in pts]
        ymin, ymax = min(lats), max(lats)
    else:
        ymin, ymax = 0.1, 10
    lo = math.floor(math.log10(ymin) * 2) / 2  # half-decades
    hi = math.ceil(math.log10(ymax) * 2) / 2
    if hi - lo < 1:
        hi = lo + 1

    def X(x):
        return L + (x - xmin) / (xmax - xmin) * pw

    def Y(ms):
        return T + ph - (math.log10(ms) - lo) / (hi - lo) * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L + pw / 2}" y="22" text-anchor="middle" font-size="14" '
         f'font-weight="bold">{html.escape(title)}</text>']
    # grid and ticks
    for pc in (50, 75, 90, 95, 99, 99.5, 99.9, 99.99):
        x = X(math.log10(100 / (100 - pc)))
        o.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#ddd"/>')
        o.append(f'<text x="{x:.1f}" y="{T + ph + 16}" text-anchor="middle">p{pc:g}</text>')
    ticks = []
    for d in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** d
            if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                ticks.append(v)
    for v in ticks:
        y = Y(v)
        o.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        label = f"{v:g}"
        o.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    o.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    o.append(f'<text x="{L + pw / 2}" y="{H - 14}" text-anchor="middle">percentile '
             f'(log scale of 1/(1 − p))</text>')
    o.append(f'<text x="16" y="{T + ph / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {T + ph / 2})">latency, ms (log scale)</text>')
    # lines
    for p in sorted(series, key=lambda q: q == "gatehouse"):  # Gatehouse drawn last, on top
        pts = series[p]
        coords = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        width = 3 if p == "gatehouse" else 2
        dash = ' stroke-dasharray="6 4"' if p == "direct" else ""
        o.append(f'<polyline fill="none" stroke="{COLOR.get(p, "#000")}" stroke-width="{width}"'
                 f'{dash} stroke-linejoin="round" points="{coords}"/>')
    # legend
    ly = T + 10
    for p in series:
        dash = ' stroke-dasharray="6 4"' if p == "direct" else ""
        o.append(f'<line x1="{L + pw + 15}" y1="{ly}" x2="{L + pw + 40}" y2="{ly}" '
                 f'stroke="{COLOR.get(p, "#000")}" stroke-width="3"{dash}/>')
        o.append(f'<text x="{L + pw + 46}" y="{ly + 4}">{html.escape(SHORT.get(p, p))}</text>')
        ly += 20
    if not series:
        o.append(f'<text x="{L + pw / 2}" y="{T + ph / 2}" text-anchor="middle">no data</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


# ---------------------------------------------------------------- the document
def old_log(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return DEFAULT_LOG
    a, b = text.find(LOG_START), text.find(LOG_END)
    if a < 0 or b < a:
        return DEFAULT_LOG
    return text[a + len(LOG_START):b].strip("\n") or DEFAULT_LOG


TLS_START, TLS_END = "<!-- tls:start -->", "<!-- tls:end -->"


def old_tls(path):
    """The TLS/HTTP/2 section bench/tls.sh wrote, kept as it is (it has its own run)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    a, b = text.find(TLS_START), text.find(TLS_END)
    if a < 0 or b < a:
        return ""
    return text[a:b + len(TLS_END)]


def targets(figs, meta):
    g = "gatehouse"
    rows = []

    def verdict(ok):
        return "—" if ok is None else ("**met**" if ok else "**not met**")

    def ratios(prefix):
        return [figs[f"{prefix}_{b}"].ratio(g) for b in BODIES]

    def ratio_text(rs):
        return ", ".join(f"{BODY_LABEL[b]} {r:.2f}×" if r is not None else f"{BODY_LABEL[b]} —"
                         for b, r in zip(BODIES, rs))

    def all_le(rs, limit):
        known = [r for r in rs if r is not None]
        return None if not known else all(r <= limit for r in known)

    cpu = ratios("cpu")
    rows.append(["CPU per request ≤ nginx, aiming at 0.8×",
                 f"{fmt(figs['cpu_100'].median(g))} µs at 100 B; vs nginx: {ratio_text(cpu)}",
                 verdict(all_le(cpu, 1.0)) + (" (0.8× reached)" if all_le(cpu, 0.8) else "")])
    for q, name in (("p99", "p99"), ("p999", "p99.9")):
        rs = ratios(q)
        rows.append([f"fixed-rate {name} ≤ nginx",
                     f"{fmt(figs[f'{q}_100'].median(g))} ms at 100 B; vs nginx: {ratio_text(rs)}",
                     verdict(all_le(rs, 1.0))])
    k = figs["kib_per_conn"]
    rows.append(["KiB per idle client connection ≤ nginx",
                 f"{fmt(k.median(g))} KiB (nginx {fmt(k.median('nginx'))})"
                 + (f", {k.ratio(g):.2f}×" if k.ratio(g) is not None else ""),
                 verdict(None if k.ratio(g) is None else k.ratio(g) <= 1.0)])
    rss = figs["idle_rss_mib"].median(g)
    rows.append(["idle RSS ≤ 5 MiB", f"{fmt(rss)} MiB", verdict(None if rss is None else rss <= 5)])
    f2 = figs["first200_ms"].median(g)
    rows.append(["first proxied 200 within 5 ms of exec", f"{fmt(f2)} ms",
                 verdict(None if f2 is None else f2 <= 5)])
    reuse = figs["reuse_pct"].median(g)
    rows.append(["upstream reuse ≥ 99.9%",
                 f"{fmt(reuse, 3)}% ({fmt(figs['conns_per_1k'].median(g), 3)} connections "
                 f"per 1,000 requests)" if reuse is not None else "—",
                 verdict(None if reuse is None else reuse >= 99.9)])
    t99, t999 = figs["tail_p99"].median(g), figs["tail_p999"].median(g)
    n = figs["hosts_large"].median(g)
    rows.append([f"no tail movement with a million entries (p99.9 of 1M / 10 ≤ {NOISE:.2f}, "
                 "the noise band)",
                 (f"p99.9 {fmt(t999)}× (p99 {fmt(t99)}×) with {fmt(n, 0)} host routes"
                  if t999 is not None else "—"),
                 verdict(None if t999 is None else t999 <= NOISE)])
    return rows


def render(meta, figs, lat_runs, errors, log_text, svg_name, tls_text=""):
    proxies = [p for p in ORDER if p in meta.get("proxies", [])] or ORDER
    m, v, prm = meta["machine"], meta["versions"], meta["params"]
    have_nginx = "nginx" in proxies
    date = meta["stamp"]
    date_h = f"{date[0:4]}-{date[4:6]}-{date[6:8]} {date[9:11]}:{date[11:13]} UTC"
    L = []
    L.append("# Benchmarks")
    L.append("")
    L.append("<!-- Generated by bench/report.py from bench/results/"
             f"{date}/. Edit only the optimisation log; the rest is rewritten on every run. -->")
    L.append("")
    L.append("Gatehouse against nginx, HAProxy, Caddy and a minimal Pingora proxy, measured side by "
             "side on one machine in one run. Reproduce with:")
    L.append("")
    L.append("```sh")
    L.append(meta["command"])
    L.append("```")
    L.append("")
    if meta.get("quick"):
        L.append("> **Quick run** (`--quick`): one round with short durations "
                 f"({prm['saturation_s']} s saturation, {prm['latency_s']} s fixed rate). The "
                 "figures are indicative only; differences under about 15% are noise here even "
                 "with full rounds.")
        L.append("")
    L.append(f"- **Date:** {date_h}; {meta['rounds']} round(s), proxies interleaved.")
    L.append(f"- **Machine:** {m['cpu']}, {m['nproc']} cores, {m['mem_kib'] / 1048576:.1f} GiB "
             f"memory, Linux {m['kernel']} ({m.get('os', '')}), open-files limit {m.get('nofile')}.")
    gh = v.get("gatehouse") or "gatehouse"
    nginx_v = (v.get("nginx") or "nginx ?").replace("nginx version: ", "")
    haproxy_v = re.sub(r"\s+-\s+https?://\S+", "", v.get("haproxy") or "HAProxy ?").replace(
        "HAProxy version", "HAProxy")
    wrk_m = re.search(r"wrk\s+(\S+)", v.get("wrk") or "")
    wrk_v = f"wrk {wrk_m.group(1)}" if wrk_m else "wrk"
    L.append(f"- **Versions:** {gh} at commit `{v.get('commit')}`"
             + (" (with uncommitted changes)" if v.get("dirty") else "")
             + f"; {nginx_v}; {haproxy_v}; Caddy {v.get('caddy')}; "
             f"pingora {v.get('pingora') or '?'} (bench/pingora-ref); {wrk_v}.")
    if meta.get("skipped"):
        L.append(f"- **Left out** (not installed or not built): {', '.join(meta['skipped'])}.")
    L.append("")
    L.append("## Method")
    L.append("")
    L.append(
        "Each proxy runs with one worker (Gatehouse `workers = 1`, nginx `worker_processes 1`, "
        "HAProxy `nbthread 1`, Caddy with `GOMAXPROCS=1`, pingora-ref `--threads 1`), pinned to "
        "core 0 with `taskset`; the backend (`gh-backend`, a fixed-body HTTP/1.1 keep-alive server) "
        "and every load generator run on core 1. No access logs. Every proxy keeps a pool of "
        "idle keep-alive connections to the one backend (nginx `keepalive 128` with HTTP/1.1 "
        "upstream, HAProxy `http-reuse always`, Caddy `max_idle_conns_per_host 128`, Gatehouse "
        "`keepalive = 256`, pingora's pool), and keeps client connections alive without a request "
        "cap. Configs: `bench/configs/`. Each round starts every proxy fresh, one at a time, in "
        "an order rotated by one per round, so that drift of the machine hits all of them alike. "
        "Every figure below is the **median across rounds**, and the ratio in parentheses is "
        "the **median of the per-round ratios to nginx** measured in the same round (below 1 is "
        "better than nginx, except for req/s).")
    L.append("")
    L.append(
        f"- **CPU per request** and **req/s**: `wrk -t1 -c50 -d{prm['saturation_s']}s` on "
        "keep-alive connections drives the proxy to saturation (its core at 100%); CPU per "
        "request is the growth of utime+stime of the proxy's whole process tree "
        "(`/proc/PID/stat`, all threads and worker processes) divided by the requests wrk "
        "completed.")
    L.append(
        f"- **Latency at a fixed rate**: `gh-load rate` sends {prm['rates']['100']:,} req/s "
        f"(100 B), {prm['rates']['64k']:,} (64 KiB), {prm['rates']['1m']:,} (1 MiB) on "
        f"{prm['connections']['100']} connections ({prm['connections']['1m']} for 1 MiB) for "
        f"{prm['latency_s']} s after {prm['warmup_s']} s of warm-up. It is an open-loop "
        "generator: requests leave on a fixed schedule whatever the proxy does, and each "
        "latency is measured from the request's *intended* send time. A closed-loop tool like wrk "
        "waits for a response before sending the next request, so a stall delays the requests "
        "that should have been sent meanwhile and they never count as slow (coordinated "
        "omission); here they do. The *backend alone* row is the same run straight to the "
        "backend, no proxy: the floor that the load generator and backend, sharing core 1, "
        "put under every figure.")
    L.append(
        "- **Idle RSS**: the sum of VmRSS over the proxy's process tree 1 s after it starts "
        "listening, before any request (pages shared between an nginx master and its worker are "
        "counted in both; the PSS column splits them instead). **KiB per idle connection**: "
        f"`gh-load hold` opens {prm['hold_connections']:,} "
        "keep-alive client connections, sends one request on each and leaves them idle; "
        "(RSS while held − RSS before) / connections held.")
    L.append(
        "- **Upstream connections per 1,000 requests**: from the backend's own count of accepted "
        "connections and requests (`GET /__stats`) over the proxy's whole life up to the idle "
        "test; reuse = 1 − connections / requests.")
    L.append(
        f"- **First proxied 200**: `gh-load first200` execs the proxy (through `taskset`) and polls "
        f"until a request through it returns 200; the median of {prm['startup_tries']} tries.")
    L.append(
        f"- **Large in-memory state**: each proxy is started with {prm['small_n']} host routes "
        f"(`h0.example.com` …) and then with {prm['large_n']:,}, and gets 100 B requests at "
        f"{prm['rates']['100']:,} req/s for one existing host; the *tail movement* is the "
        "1M run's p99 (p99.9) divided by the 10 run's. Gatehouse: 1M `[[route]]` tables with "
        "`host`; nginx: `server_name`s of one server block (its hash); HAProxy: a `map_str` "
        "lookup in a 1M-line map file; Caddy: one route whose `host` matcher lists 1M names "
        "(sorted, binary search); pingora-ref: a `HashMap` of 1M names.")
    L.append("- Differences under about 15% are within this machine's noise: compare rounds "
             "(bench/results/) before believing one.")
    L.append("")

    def ratio_header(name):
        return f"{name} (×nginx)" if have_nginx else name

    L.append("## CPU per request and throughput at saturation")
    L.append("")
    rows = []
    for p in proxies:
        rows.append([LABEL[p]] + [cell(figs[f"cpu_{b}"], p) for b in BODIES]
                    + [cell(figs[f"rps_{b}"], p, digits=0) for b in BODIES])
    L.append(table(["Proxy"] + [ratio_header(f"µs CPU/req, {BODY_LABEL[b]}") for b in BODIES]
                   + [ratio_header(f"req/s, {BODY_LABEL[b]}") for b in BODIES], rows))
    L.append("")
    L.append("CPU per request at the fixed rates of the latency runs below (the same load for "
             "every proxy; CPU over the run, warm-up included, divided by the requests the "
             "backend served; the clock-tick resolution of `/proc` makes it coarser than the "
             "saturation figure):")
    L.append("")
    rows = [[LABEL[p]] + [cell(figs[f"fcpu_{b}"], p) for b in BODIES] for p in proxies]
    L.append(table(["Proxy"] + [ratio_header(f"µs CPU/req at {prm['rates'][b]:,} req/s, "
                                             f"{BODY_LABEL[b]}") for b in BODIES], rows))
    L.append("")
    L.append("How busy the proxy's core was during those runs (CPU time / wall time; below "
             "100% the load side, not the proxy, set the pace and req/s says little about the "
             "proxy; CPU per request still holds):")
    L.append("")
    rows = [[LABEL[p]] + [fmt(figs[f"busy_{b}"].median(p), 0) + "%"
                          if figs[f"busy_{b}"].median(p) is not None else "—" for b in BODIES]
            for p in proxies]
    L.append(table(["Proxy"] + [f"core busy, {BODY_LABEL[b]}" for b in BODIES], rows))
    L.append("")
    L.append("## Latency at a fixed request rate (open loop)")
    L.append("")
    L.append(f"![Latency by percentile at {prm['rates']['100']:,} req/s, 100-byte responses]"
             f"({svg_name})")
    L.append("")
    for b in BODIES:
        L.append(f"**{BODY_LABEL[b]} responses at {prm['rates'][b]:,} req/s** (ms)")
        L.append("")
        rows = []
        for p in proxies:
            errs = figs[f"errors_{b}"].median(p)
            rows.append([LABEL[p]] + [cell(figs[f"{q}_{b}"], p) for q in ("p50", "p99", "p999")]
                        + [fmt(errs, 0)])
        if figs[f"p50_{b}"].median("direct") is not None:
            rows.append(["*backend alone, no proxy*"]
                        + [cell(figs[f"{q}_{b}"], "direct", ratio=False)
                           for q in ("p50", "p99", "p999")]
                        + [fmt(figs[f"errors_{b}"].median("direct"), 0)])
        L.append(table(["Proxy", ratio_header("p50"), ratio_header("p99"), ratio_header("p99.9"),
                        "errors"], rows))
        L.append("")
    L.append("## Memory")
    L.append("")
    rows = []
    for p in proxies:
        rows.append([LABEL[p], cell(figs["idle_rss_mib"], p), cell(figs["idle_pss_mib"], p),
                     cell(figs["kib_per_conn"], p), fmt(figs["held"].median(p), 0)])
    L.append(table(["Proxy", ratio_header("idle RSS, MiB"), ratio_header("idle PSS, MiB"),
                    ratio_header("KiB per idle client connection"), "connections held"], rows))
    L.append("")
    L.append("## Upstream connection reuse and start-up")
    L.append("")
    rows = []
    for p in proxies:
        reuse = figs["reuse_pct"].median(p)
        rows.append([LABEL[p], fmt(figs["conns_per_1k"].median(p), 3),
                     f"{reuse:.3f}%" if reuse is not None else "—",
                     cell(figs["first200_ms"], p)])
    L.append(table(["Proxy", "upstream connections per 1,000 requests", "reuse",
                    ratio_header("first proxied 200, ms")], rows))
    L.append("")
    L.append("## Large in-memory state")
    L.append("")
    rows = []
    for p in proxies:
        if figs["hosts_large"].median(p) is None and figs["hosts_small"].median(p) is None:
            rows.append([LABEL[p]] + ["—"] * 7)
            continue
        load = figs["load_ms_large"].median(p)
        rows.append([
            LABEL[p], fmt(figs["hosts_large"].median(p), 0),
            fmt(load / 1000 if load is not None else None, 2),
            fmt(figs["large_rss_large"].median(p), 0),
            f"{fmt(figs['large_p99_small'].median(p))} → {fmt(figs['large_p99_large'].median(p))}",
            f"{fmt(figs['large_p999_small'].median(p))} → {fmt(figs['large_p999_large'].median(p))}",
            fmt(figs["tail_p99"].median(p)), fmt(figs["tail_p999"].median(p))])
    L.append(table(["Proxy", "host routes", "load time, s", "RSS, MiB", "p99 ms, 10 → many",
                    "p99.9 ms, 10 → many", "p99 movement", "p99.9 movement"], rows))
    L.append("")
    L.append("Load time: from exec until the proxy listens. Movement: the many-routes run's "
             "percentile over the 10-routes run's (1.00 = no movement).")
    caddy_n = figs["hosts_large"].median("caddy")
    if caddy_n is not None and caddy_n < meta["params"]["large_n"]:
        L.append("")
        L.append(f"Caddy did not start with {meta['params']['large_n']:,} hosts within 60 s; "
                 f"the row shows the largest size that did ({caddy_n:,.0f}).")
    L.append("")
    L.append("## Targets (issue 3)")
    L.append("")
    L.append(table(["Target", "Gatehouse, measured", "Status"], targets(figs, meta)))
    L.append("")
    if errors:
        L.append("## Problems during the run")
        L.append("")
        for e in errors[:30]:
            what = e.get("error") or e.get("what") or "error"
            extra = f", {BODY_LABEL.get(e.get('body'), e.get('body'))}" if e.get("body") else ""
            L.append(f"- round {e.get('round')}, {LABEL.get(e.get('proxy'), e.get('proxy'))}"
                     f"{extra} ({e.get('kind')}): {what}")
        L.append("")
    if tls_text:
        L.append(tls_text)
        L.append("")
    L.append("## Optimisation log")
    L.append("")
    L.append(LOG_START)
    L.append(log_text)
    L.append(LOG_END)
    L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results_dir")
    ap.add_argument("--docs", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "docs"))
    a = ap.parse_args()
    meta, recs = load(a.results_dir)
    figs, lat_runs, errors = collect(recs)
    os.makedirs(a.docs, exist_ok=True)
    md_path = os.path.join(a.docs, "benchmarks.md")
    svg_name = "bench-latency.svg"
    proxies = [p for p in ORDER if p in meta.get("proxies", [])] or ORDER
    rate = meta["params"]["rates"]["100"]
    svg_chart(lat_runs, proxies + ["direct"], os.path.join(a.docs, svg_name),
              f"Latency by percentile, 100 B responses at {rate:,} req/s (open loop)")
    text = render(meta, figs, lat_runs, errors, old_log(md_path), svg_name, old_tls(md_path))
    with open(md_path, "w") as f:
        f.write(text)
    print(f"report.py: wrote {md_path} and {os.path.join(a.docs, svg_name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
