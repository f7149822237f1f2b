#!/usr/bin/env bash
# Failure figures for docs/resilience.md: Gatehouse's resilience tests, then the same failures
# under the same load through Gatehouse and through nginx, side by side. Everything runs on
# 127.0.0.1 and every load is bounded in count. Prints Markdown tables; with --write, also
# rewrites the generated part of docs/resilience.md.
#
#   bash bench/resilience.sh [--write] [--no-install]
set -euo pipefail
cd "$(dirname "$0")/.."

write=0
install=1
for arg in "$@"; do
  case $arg in
    --write) write=1 ;;
    --no-install) install=0 ;;
    *) echo "usage: bash bench/resilience.sh [--write] [--no-install]" >&2; exit 2 ;;
  esac
done

if ((install)) && ! command -v nginx >/dev/null && ! [ -x /usr/sbin/nginx ]; then
  apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null
fi

mkdir -p bench/results
out=bench/results/resilience-$(date -u +%Y%m%dT%H%M%SZ).log
echo "full output: $out"
# One test at a time: the figures are about failure handling, not about two tests sharing
# two cores.
cargo test --release --locked --test main resilience -- --include-ignored --nocapture \
  --test-threads=1 >"$out" 2>&1 || true
# With one test thread, a test's output continues the "test NAME ... " line.
grep -oE '(figure|sidebyside) .*|test result.*|panicked at.*' "$out" || true
grep -q 'test result: ok' "$out" || { echo "resilience tests failed" >&2; exit 1; }

nginx_version=$( (nginx -v 2>&1 || /usr/sbin/nginx -v 2>&1) | sed 's/^nginx version: //' || true)
commit=$(git rev-parse --short=12 HEAD)
python3 - "$out" "$write" "$nginx_version" "$commit" <<'PY'
import re, sys, datetime, pathlib
log, write, nginx, commit = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
found = re.findall(r"(figure|sidebyside) (.*)", pathlib.Path(log).read_text())
side = [rest.lstrip("| ").split(" | ") for kind, rest in found if kind == "sidebyside"]
figs = [rest for kind, rest in found if kind == "figure"]
md = []
md.append(f"Generated {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC from commit `{commit}` "
          f"(nginx {nginx or 'not installed'}), release build, one test at a time.\n")
md.append("| Scenario | Proxy | Requests | Failed | Error rate | p50 ms | p99 ms | Requests per server | Slower than 1 s |")
md.append("|---|---|---|---|---|---|---|---|---|")
for f in side:
    if len(f) >= 8:
        scenario, proxy, n, failed, rate, p50, p99, shares, extra = (f + [""])[:9]
        slow = extra.replace("slow>1s: ", "")
        md.append(f"| {scenario} | {proxy} | {n} | {failed} | {rate} | {p50} | {p99} | {shares} | {slow} |")
md.append("")
md.append("Gatehouse alone (resilience tests; counts are asserted by the tests, times are only measured):\n")
for f in figs:
    md.append(f"- **{f.split(':', 1)[0]}**:{f.split(':', 1)[1] if ':' in f else ''}")
text = "\n".join(md) + "\n"
print(text)
if write:
    doc = pathlib.Path("docs/resilience.md")
    old = doc.read_text()
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    a, b = old.index(start) + len(start), old.index(end)
    doc.write_text(old[:a] + "\n" + text + old[b:])
    print("wrote docs/resilience.md")
PY
