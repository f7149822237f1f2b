#!/usr/bin/env bash
# Operations figures for docs/operations.md: config reloads and binary upgrades under keep-alive
# load, through Gatehouse and through nginx side by side, plus Gatehouse's own upgrade test.
# Everything runs on 127.0.0.1 and every load is bounded in count and time. Prints a Markdown
# table; with --write, also rewrites the generated part of docs/operations.md.
#
#   bash bench/operations.sh [--write] [--no-install]
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="bash bench/operations.sh${*:+ $*}"

write=0
install=1
for arg in "$@"; do
  case $arg in
    --write) write=1 ;;
    --no-install) install=0 ;;
    *) echo "usage: bash bench/operations.sh [--write] [--no-install]" >&2; exit 2 ;;
  esac
done

if ((install)) && ! command -v nginx >/dev/null && ! [ -x /usr/sbin/nginx ]; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq nginx-light >/dev/null
fi

cargo build --release --locked
mkdir -p bench/results
out=bench/results/operations-$(date -u +%Y%m%dT%H%M%SZ).log
echo "full output: $out"
# One test at a time: the figures are about what a reload or an upgrade does to the clients,
# not about two tests sharing two cores.
status=0
cargo test --release --locked --test main operations:: -- --ignored --nocapture \
  --test-threads=1 >"$out" 2>&1 || status=1
cargo test --release --locked --test main upgrade::upgrades_under_load -- --nocapture \
  --test-threads=1 >>"$out" 2>&1 || status=1
# With one test thread, a test's first line of output continues its "test NAME ... " line.
grep -oE '(operations|detail) \|.*|test result.*|panicked at.*' "$out" || true
if ((status)) || [ "$(grep -c 'test result: ok' "$out")" -ne 2 ]; then
  echo "operations tests failed; see $out" >&2
  exit 1
fi

nginx_version=$( (nginx -v 2>&1 || /usr/sbin/nginx -v 2>&1) | sed 's/^nginx version: //' || true)
commit=$(git rev-parse --short=12 HEAD)
dirty=$(git status --porcelain --untracked-files=no | grep -qv 'docs/operations.md' && echo " (with uncommitted changes)" || true)
python3 - "$out" "$write" "$nginx_version" "$commit$dirty" "$command_line" <<'PY'
import datetime, os, pathlib, re, sys

log, write, nginx, commit, command = sys.argv[1], sys.argv[2] == "1", *sys.argv[3:6]
rows = []
for line in pathlib.Path(log).read_text().splitlines():
    m = re.search(r"operations \| (.*)", line)
    if not m:
        continue
    parts = [p.strip() for p in m.group(1).split(" | ")]
    what, proxy, fields = parts[0], parts[1], {}
    for p in parts[2:]:
        if p.startswith("served "):
            fields["served"] = p[len("served "):]
        elif "=" in p:
            k, v = p.split("=", 1)
            fields[k] = v
        else:
            fields["note"] = p
    rows.append((what, proxy, fields))

def done(what, f):
    if "reloads" in f:
        return f"{f['reloads']} ({f['applied']} applied, {f['rejected']} broken, refused)"
    return f.get("upgrades", "")

def ran(f):
    ms = f.get("elapsed_ms")
    return f"{int(ms) / 1000:.1f}" if ms else ""

def effect(f):
    p50 = f.get("in_force_p50_ms") or f.get("done_p50_ms")
    mx = f.get("in_force_max_ms") or f.get("done_max_ms")
    return f"{p50} / {mx}" if p50 else ""

md = [
    f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC from commit "
    f"`{commit}` (nginx {nginx or 'not installed'}), release build, one test at a time, "
    f"{os.cpu_count()} CPUs, by:",
    "",
    "```sh",
    command,
    "```",
    "",
    "| Operation | Proxy | Requests sent | Failed | Refused | Reset | Other | Done | Took effect p50 / max, ms | Load ran, s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for what, proxy, f in rows:
    if "note" in f and "sent" not in f:
        md.append(f"| {what} | {proxy} | {f['note']} | | | | | | | |")
        continue
    md.append(
        f"| {what} | {proxy} | {f.get('sent', '')} | **{f.get('failed', '')}** | {f.get('refused', '')} "
        f"| {f.get('reset', '')} | {f.get('other', '')} | {done(what, f)} | {effect(f)} | {ran(f)} |"
    )
md.append("")
text = "\n".join(md) + "\n"
print(text)
if write:
    doc = pathlib.Path("docs/operations.md")
    old = doc.read_text()
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    a, b = old.index(start) + len(start), old.index(end)
    doc.write_text(old[:a] + "\n" + text + old[b:])
    print("wrote docs/operations.md")
PY
