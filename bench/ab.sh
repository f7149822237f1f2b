#!/usr/bin/env bash
# A/B of two Gatehouse binaries: req/s and CPU µs per request at saturation (wrk), 1 and 3 servers.
#
#   bash bench/ab.sh OLD_BIN NEW_BIN [ROUNDS] [SECONDS]      (defaults: 4 rounds, 5 s per run)
#
# Each round runs OLD then NEW (NEW then OLD in even rounds, to cancel drift) for each variant:
# "1srv" (one upstream server) and "3srv" (three gh-backend instances in one upstream).
# All traffic goes to 127.0.0.1. Every run is bounded in time. See bench/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
(($# >= 2 && $# <= 4)) || { usage >&2; exit 2; }
OLD_BIN=$(realpath "$1")
NEW_BIN=$(realpath "$2")
ROUNDS=${3:-4}
SECS=${4:-5}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS wants a positive integer" >&2; exit 2; }
[[ $SECS =~ ^[1-9][0-9]*$ ]] || { echo "SECONDS wants a positive integer" >&2; exit 2; }

BACKEND_PORT=${AB_BACKEND_PORT:-9500}   # gh-backend on BACKEND_PORT, +1, +2
PROXY_PORT=${AB_PROXY_PORT:-9510}
QUIET_WAIT_S=${AB_QUIET_WAIT_S:-900}    # longest wait for someone else's build to finish
PROXY_CORE=0
LOAD_CORE=1
BACKEND=127.0.0.1:$BACKEND_PORT
PY=python3
[[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
GH_BACKEND=$ROOT/bench/tools/target/release/gh-backend

WORK=$(mktemp -d /tmp/gatehouse-ab.XXXXXX)   # configs, wrk outputs, logs, results.tsv: kept
RESULTS=$WORK
# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"   # log, warn, die, calc, proc, track, stop_tree, free_port

for bin in "$OLD_BIN" "$NEW_BIN" "$GH_BACKEND"; do [[ -x $bin ]] || die "$bin is missing or not executable"; done
for tool in wrk curl taskset "$PY"; do command -v "$tool" >/dev/null || die "$tool is missing"; done
(($(nproc) >= 2)) || die "needs at least 2 cores"
HZ=$(getconf CLK_TCK)

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${STARTED[@]}"; do stop_tree "$p" 2; done
    log "raw outputs kept in $WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# This script and everything it starts (backends, wrk, curl) runs on the load core.
taskset -cp "$LOAD_CORE" $$ >/dev/null

# ---------------------------------------------------------------- backends and configs
for i in 0 1 2; do
    port=$((BACKEND_PORT + i))
    free_port "$port" || die "port $port is busy"
    taskset -c "$LOAD_CORE" "$GH_BACKEND" --listen "127.0.0.1:$port" >"$WORK/gh-backend-$i.log" 2>&1 &
    track $!
    proc wait-listen "$port" 10 $! || die "gh-backend on $port did not start"
    [[ $(http_code "http://127.0.0.1:$port/") == 200 ]] || die "gh-backend on $port: GET / is not 200"
done
free_port "$PROXY_PORT" || die "port $PROXY_PORT is busy"

# The full benchmark's gatehouse config (bench/configs/gatehouse.toml.in, route "/"), with
# SERVERS as the upstream's server list.
write_conf() {
    local out=$1 servers=$2
    sed -e "s|@PORT@|$PROXY_PORT|" -e "s|\[\"@BACKEND@\"\]|[$servers]|" -e "s|@ROUTES@|[[route]]\npath = \"/\"\nupstream = \"app\"|" \
        "$ROOT/bench/configs/gatehouse.toml.in" >"$out"
    grep -q '@[A-Z_][A-Z_]*@' "$out" && die "unfilled field in $out"
    return 0
}
write_conf "$WORK/1srv.toml" "\"$BACKEND\""
write_conf "$WORK/3srv.toml" "\"$BACKEND\", \"127.0.0.1:$((BACKEND_PORT + 1))\", \"127.0.0.1:$((BACKEND_PORT + 2))\""
for v in 1srv 3srv; do
    for b in OLD NEW; do
        bin=$OLD_BIN; [[ $b == NEW ]] && bin=$NEW_BIN
        "$bin" check -c "$WORK/$v.toml" >/dev/null 2>&1 ||
            die "$b rejects $WORK/$v.toml: $("$bin" check -c "$WORK/$v.toml" 2>&1 | tail -n 3)"
    done
done

# ---------------------------------------------------------------- helpers
# utime stime (clock ticks) of PID, all its threads
ticks() {
    local s
    s=$(<"/proc/$1/stat")
    s=${s##*) }
    local f
    read -r -a f <<<"$s"
    echo "${f[11]} ${f[12]}"
}
# requests served by each backend, space separated
backend_reqs() {
    local i out=()
    for i in 0 1 2; do
        out+=("$(curl -sS --max-time 5 "http://127.0.0.1:$((BACKEND_PORT + i))/__stats" | grep -o '"requests":[0-9]*' | cut -d: -f2)")
    done
    echo "${out[*]}"
}
# Is a cargo/rustc (anyone's build, test or clippy) running?
building() {
    local c n
    for c in /proc/[0-9]*/comm; do
        read -r n 2>/dev/null <"$c" || continue
        case $n in cargo | cargo-clippy | rustc | clippy-driver | rustdoc) return 0 ;; esac
    done
    return 1
}
# Wait while a cargo/rustc runs (someone else's build would spoil the figures), bounded.
wait_quiet() {
    local t0=$SECONDS said=0
    while building; do
        ((said)) || { log "a cargo/rustc is running; waiting for it to finish (at most ${QUIET_WAIT_S}s)"; said=1; }
        ((SECONDS - t0 < QUIET_WAIT_S)) || { warn "still running after ${QUIET_WAIT_S}s; going on"; return 0; }
        sleep 5
    done
    ((said)) && { log "quiet again after $((SECONDS - t0))s"; sleep 2; }
    return 0
}

printf 'round\tvariant\tbuild\trps\trequests\tcpu_us\tuser_us\tsys_us\tproxy_core\terrors\tbackend_split\n' >"$WORK/results.tsv"

# run_one ROUND VARIANT BUILD BIN: start, warm up, measure, stop; appends a line to results.tsv
run_one() {
    local round=$1 variant=$2 build=$3 bin=$4 pid out logf
    out=$WORK/wrk-r$round-$variant-$build.txt
    logf=$WORK/gatehouse-r$round-$variant-$build.log
    free_port "$PROXY_PORT" || die "port $PROXY_PORT stays busy"
    taskset -c "$PROXY_CORE" "$bin" run -c "$WORK/$variant.toml" >"$logf" 2>&1 &
    pid=$!
    track "$pid"
    proc wait-listen "$PROXY_PORT" 30 "$pid" || { tail -n 5 "$logf" >&2; die "$build ($variant) did not listen on $PROXY_PORT"; }
    wait_200 "http://127.0.0.1:$PROXY_PORT/" "" 10 || die "$build ($variant): no 200 through the proxy"
    # warm-up: client and upstream connections, pools (as bench/run.sh does)
    timeout 30 taskset -c "$LOAD_CORE" wrk -t1 -c50 -d1s "http://127.0.0.1:$PROXY_PORT/" >/dev/null 2>&1 || true
    local u0 s0 u1 s1 b0 b1
    b0=$(backend_reqs)
    read -r u0 s0 < <(ticks "$pid")
    timeout $((SECS + 30)) taskset -c "$LOAD_CORE" wrk -t1 -c50 -d"${SECS}s" --timeout 5s \
        "http://127.0.0.1:$PROXY_PORT/" >"$out" 2>&1 || true
    read -r u1 s1 < <(ticks "$pid")
    b1=$(backend_reqs)
    stop_tree "$pid" 5
    local reqs wall rps non2xx errs
    reqs=$(awk '/requests in/ { print $1; exit }' "$out")
    wall=$(awk '/requests in/ { sub(/s,$/, "", $4); print $4; exit }' "$out")
    rps=$(awk '/^Requests\/sec:/ { print $2; exit }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$out")
    errs=$(awk '/Socket errors:/ { n = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i; print n; exit }' "$out")
    [[ -n $reqs && -n $rps && $reqs != 0 ]] || die "$build ($variant) round $round: wrk gave no result (see $out)"
    local split
    split=$(awk -v a="$b0" -v b="$b1" 'BEGIN { n = split(a, x, " "); split(b, y, " ");
        for (i = 1; i <= n; i++) printf "%s%d", (i > 1 ? "/" : ""), y[i] - x[i] }')   # /__stats is not counted
    local us=$((1000000 / HZ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$variant" "$build" "$rps" "$reqs" \
        "$(calc '(a + b) * d / c' $((u1 - u0)) $((s1 - s0)) "$reqs" "$us")" \
        "$(calc 'a * d / c' $((u1 - u0)) 0 "$reqs" "$us")" \
        "$(calc 'b * d / c' 0 $((s1 - s0)) "$reqs" "$us")" \
        "$(calc 'a * b / c / 10000' $((u1 - u0 + s1 - s0)) "$us" "${wall:-$SECS}")%" \
        $((${non2xx:-0} + ${errs:-0})) "$split" >>"$WORK/results.tsv"
}

# proxy_core: the proxy's CPU time over wrk's wall time (100% = core 0 saturated; below it, the
# load core running wrk and the backends is the limit, and req/s says little about the proxy).

# ---------------------------------------------------------------- rounds
log "OLD=$OLD_BIN"
log "NEW=$NEW_BIN"
log "$ROUNDS rounds, ${SECS}s per wrk run (-t1 -c50), proxy on core $PROXY_CORE, wrk and backends on core $LOAD_CORE; raw: $WORK"
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then order=(OLD NEW); else order=(NEW OLD); fi
    for ((try = 1; ; try++)); do
        wait_quiet
        spoiled=0
        for variant in 1srv 3srv; do
            for build in "${order[@]}"; do
                bin=$OLD_BIN; [[ $build == NEW ]] && bin=$NEW_BIN
                run_one "$round" "$variant" "$build" "$bin"
                building && spoiled=1
            done
        done
        # a build that started during the round spoils it: run the round again (3 tries)
        ((spoiled && try < 3)) || break
        warn "round $round: a cargo/rustc ran during it; running it again"
        awk -F'\t' -v r="$round" '$1 != r' "$WORK/results.tsv" >"$WORK/results.tmp" && mv "$WORK/results.tmp" "$WORK/results.tsv"
    done
    ((spoiled)) && warn "round $round: a cargo/rustc ran during it (3rd try); kept anyway"
    echo
    echo "round $round (${order[*]}):"
    awk -F'\t' -v r="$round" 'NR == 1 || $1 == r' "$WORK/results.tsv" | column -t -s $'\t'
done

# ---------------------------------------------------------------- summary
echo
"$PY" - "$WORK/results.tsv" <<'EOF'
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
keys = ["rps", "cpu_us", "user_us", "sys_us"]
print("medians over %d rounds (and NEW/OLD: ratio of medians; median of per-round ratios [min..max])" % len({r["round"] for r in rows}))
print("%-5s %-4s %10s %9s %9s %9s" % ("var", "build", "req/s", "cpu_us", "user_us", "sys_us"))
for v in ("1srv", "3srv"):
    med = {}
    for b in ("OLD", "NEW"):
        sel = [r for r in rows if r["variant"] == v and r["build"] == b]
        med[b] = {k: st.median(float(r[k]) for r in sel) for k in keys}
        print("%-5s %-4s %10.0f %9.2f %9.2f %9.2f" % (v, b, *(med[b][k] for k in keys)))
    per = {k: [] for k in keys}
    for rnd in sorted({r["round"] for r in rows}, key=int):
        o = next(r for r in rows if r["variant"] == v and r["build"] == "OLD" and r["round"] == rnd)
        n = next(r for r in rows if r["variant"] == v and r["build"] == "NEW" and r["round"] == rnd)
        for k in keys:
            per[k].append(float(n[k]) / float(o[k]) if float(o[k]) else float("nan"))
    print("%-5s %-4s %10.3f %9.3f %9.3f %9.3f   (ratio of medians)" % (v, "N/O", *(med["NEW"][k] / med["OLD"][k] for k in keys)))
    print("%-5s %-4s %10.3f %9.3f %9.3f %9.3f   (median per-round ratio)" % (v, "N/O", *(st.median(per[k]) for k in keys)))
    print("%-5s %-4s %s" % (v, "", "   ".join("%s %.3f..%.3f" % (k, min(per[k]), max(per[k])) for k in keys)))
    errs = sum(int(r["errors"]) for r in rows if r["variant"] == v)
    if errs:
        print("%-5s WARNING: %d non-2xx responses or socket errors in total" % (v, errs))
    print()
EOF
