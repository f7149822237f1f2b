#!/usr/bin/env python3
"""Turn one bench/tls.sh run (bench/results/tls-<stamp>/) into a Markdown section.

  tlsreport.py RESULTS_DIR                 print the section
  tlsreport.py RESULTS_DIR --into FILE     put it into FILE between <!-- tls:start --> and
                                           <!-- tls:end --> (appended when the markers are
                                           missing); bench/report.py keeps that part as it is

Each figure is the median over the rounds. Ratios are Gatehouse's figure over nginx's.
"""
import argparse
import json
import os
import statistics
import sys

START, END = "<!-- tls:start -->", "<!-- tls:end -->"
ORDER = ["gatehouse", "nginx", "haproxy", "caddy"]
LABEL = {"gatehouse": "Gatehouse", "nginx": "nginx", "haproxy": "HAProxy", "caddy": "Caddy"}
# metric, column title, format, whether lower is better
COLUMNS = [
    ("h1_rps", "HTTP/1.1 req/s", "{:,.0f}", False),
    ("h1_cpu_us", "HTTP/1.1 CPU µs/req", "{:.1f}", True),
    ("h2_rps", "HTTP/2 req/s", "{:,.0f}", False),
    ("h2_cpu_us", "HTTP/2 CPU µs/req", "{:.1f}", True),
    ("handshake_per_s", "full handshakes/s", "{:,.0f}", False),
    ("handshake_cpu_us", "CPU µs/handshake", "{:.0f}", True),
    ("rss_kib", "RSS after the runs (MiB)", "{:.1f}", True),
]


def load(results):
    with open(os.path.join(results, "meta.json")) as f:
        meta = json.load(f)
    figs = {}
    with open(os.path.join(results, "results.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            figs.setdefault((r["proxy"], r["metric"]), []).append(float(r["value"]))
    med = {k: statistics.median(v) for k, v in figs.items()}
    return meta, med


def shown(metric, fmt, value):
    if value is None:
        return "—"
    if metric == "rss_kib":
        value /= 1024
    return fmt.format(value)


def render(meta, med):
    proxies = [p for p in ORDER if any((p, c[0]) in med for c in COLUMNS)]
    L = [START, "## TLS and HTTP/2 (bench/tls.sh)", ""]
    L.append(f"Produced by `{meta['command']}` at commit `{meta['commit']}` ({meta['stamp']}), "
             f"{meta['rounds']} round(s) of {meta['run_s']} s per run, on {meta['cpu']}. "
             "Each proxy terminates TLS (one ECDSA P-256 certificate, TLS 1.3 negotiated) with one "
             "worker on core 0 and proxies to the same HTTP/1.1 backend (`gh-backend`, 100-byte "
             "responses) over a keep-alive pool; `h2load` and `openssl s_time` run on core 1. "
             "HTTP/1.1: `h2load --h1 -c50` (keep-alive); HTTP/2: `h2load -c50 -m10` (50 "
             "connections, 10 streams each); handshakes: `openssl s_time -new`, one full "
             "handshake after another, no resumption. CPU is the proxy's own (utime+stime of its "
             "process tree) divided by the requests or handshakes done. Medians over the rounds. "
             "A dash: the proxy does not offer that protocol.")
    L.append("")
    L.append("| | " + " | ".join(c[1] for c in COLUMNS) + " |")
    L.append("|---|" + "---:|" * len(COLUMNS))
    for p in proxies:
        cells = [shown(m, fmt, med.get((p, m))) for m, _, fmt, _ in COLUMNS]
        L.append(f"| {LABEL.get(p, p)} | " + " | ".join(cells) + " |")
    L.append("")
    if "gatehouse" in proxies and "nginx" in proxies:
        L.append("Gatehouse ÷ nginx (below 1 is better for CPU and memory, above 1 for rates):")
        L.append("")
        L.append("| | " + " | ".join(c[1] for c in COLUMNS) + " |")
        L.append("|---|" + "---:|" * len(COLUMNS))
        cells = []
        for m, _, _, _ in COLUMNS:
            g, n = med.get(("gatehouse", m)), med.get(("nginx", m))
            cells.append(f"{g / n:.2f}" if g is not None and n else "—")
        L.append("| ratio | " + " | ".join(cells) + " |")
        L.append("")
    versions = meta.get("versions", {})
    L.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items() if v) + ".")
    L.append(END)
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--into")
    a = ap.parse_args()
    meta, med = load(a.results)
    text = render(meta, med)
    if not a.into:
        print(text)
        return 0
    try:
        with open(a.into) as f:
            doc = f.read()
    except OSError:
        doc = ""
    i, j = doc.find(START), doc.find(END)
    if i >= 0 and j > i:
        doc = doc[:i] + text + doc[j + len(END):]
    else:
        # Before the optimisation log, which bench/report.py keeps last.
        k = doc.find("## Optimisation log")
        doc = (doc[:k] + text + "\n\n" + doc[k:]) if k >= 0 else (doc.rstrip("\n") + "\n\n" + text + "\n")
    with open(a.into, "w") as f:
        f.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
