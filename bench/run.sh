#!/usr/bin/env bash
# Gatehouse benchmark: Gatehouse, nginx, HAProxy, Caddy and a Pingora proxy, side by side on this
# machine, interleaved in rounds; writes bench/results/<timestamp>/ and docs/benchmarks.md.
# See bench/README.md.
#
#   bash bench/run.sh [--quick] [--rounds N] [--only gatehouse,nginx,...] [--no-large]
#                     [--no-install] [--no-build] [--no-report]
#
# All traffic goes to 127.0.0.1. Every load step is bounded in time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COMMAND_LINE="bash bench/run.sh${*:+ $*}"

QUICK=0
ROUNDS=
ONLY=
LARGE=1
INSTALL=1
BUILD=1
REPORT=1
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
    --rounds=*) ROUNDS=${1#*=} ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --no-large) LARGE=0 ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --no-report) REPORT=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[[ -z $ROUNDS ]] && { ((QUICK)) && ROUNDS=1 || ROUNDS=3; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "--rounds wants a positive integer" >&2; exit 2; }

# Durations (seconds) and sizes.
if ((QUICK)); then
    SAT_S=3 LAT_S=3 WARM_S=1
else
    SAT_S=10 LAT_S=10 WARM_S=2
fi
HOLD_CONNS=10000
STARTUP_TRIES=5
LARGE_N=1000000
SMALL_N=10
CADDY_LOAD_LIMIT_S=60
# body: path, open-loop rate (req/s), connections of the open-loop generator
BODIES=(100 64k 1m)
declare -A BODY_PATH=([100]=/ [64k]=/64k [1m]=/1m)
declare -A BODY_RATE=([100]=5000 [64k]=2000 [1m]=200)
declare -A BODY_CONNS=([100]=64 [64k]=64 [1m]=16)

BACKEND_PORT=${BENCH_BACKEND_PORT:-9100}
BACKEND=127.0.0.1:$BACKEND_PORT
PORT_BASE=${BENCH_PORT_BASE:-9300}   # proxies listen on PORT_BASE+1 ... PORT_BASE+5
PROXY_CORE=0
LOAD_CORE=1

PY=python3
[[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
GATEHOUSE=$ROOT/target/release/gatehouse
TOOLS=$ROOT/bench/tools/target/release
GH_BACKEND=$TOOLS/gh-backend
GH_LOAD=$TOOLS/gh-load
PINGORA=$ROOT/bench/pingora-ref/target/release/pingora-ref

# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"
# shellcheck source=lib/proxies.sh
source "$ROOT/bench/lib/proxies.sh"

# ---------------------------------------------------------------- 1. install and build
install_deps() {
    local want=(nginx-light haproxy caddy wrk nghttp2-client curl python3 libssl-dev pkg-config
        cmake util-linux iproute2)
    local missing=() pkg
    for pkg in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    # nginx-light and nginx (full) both provide /usr/sbin/nginx
    if command -v nginx >/dev/null; then
        local m=() p
        for p in "${missing[@]}"; do [[ $p == nginx-light ]] || m+=("$p"); done
        missing=("${m[@]}")
    fi
    ((${#missing[@]})) || { log "packages: all present"; return 0; }
    log "installing: ${missing[*]}"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts the services of packages it installs where it can; stop the ones this
    # install started: they are not what we measure.
    local svc
    for svc in nginx haproxy caddy; do
        [[ " ${missing[*]} " == *" $svc"[\ -]* ]] || continue
        "${sudo[@]}" service "$svc" stop >/dev/null 2>&1 || true
    done
}

build_all() {
    log "building gatehouse (release)"
    cargo build --release --quiet
    log "building bench/tools (gh-backend, gh-load)"
    cargo build --release --quiet --manifest-path bench/tools/Cargo.toml
    log "building bench/pingora-ref (the first build takes a few minutes)"
    cargo build --release --quiet --manifest-path bench/pingora-ref/Cargo.toml ||
        warn "pingora-ref did not build; it is left out of this run"
}

((INSTALL)) && install_deps
((BUILD)) && build_all
for bin in "$GATEHOUSE" "$GH_BACKEND" "$GH_LOAD"; do
    [[ -x $bin ]] || die "$bin is missing (run without --no-build)"
done
for tool in wrk curl taskset; do command -v "$tool" >/dev/null || die "$tool is missing"; done

# ---------------------------------------------------------------- 2. machine
NPROC=$(nproc)
((NPROC >= 2)) || die "needs at least 2 cores (the proxy on one, load and backend on the other); nproc says $NPROC"
# As many open files as we may have (the idle-connection test holds 10,000 on each side).
HARD=$(ulimit -Hn)
if [[ $HARD == unlimited ]] || ((HARD >= 200000)); then
    ulimit -n 200000
else
    ulimit -n 200000 2>/dev/null || ulimit -n "$HARD"
fi
log "open files limit: $(ulimit -n)"
((HOLD_CONNS + 1000 <= $(ulimit -n))) || die "open files limit $(ulimit -n) is too low to hold $HOLD_CONNS connections"
# This script, and so everything it starts (backend, wrk, gh-load, curl), runs on core 1;
# each proxy is started with taskset -c 0.
taskset -cp "$LOAD_CORE" $$ >/dev/null
export GOMAXPROCS=1   # Caddy's one worker (the only Go program here)

# Which proxies
PROXIES=()
if [[ -n $ONLY ]]; then
    IFS=, read -r -a wanted <<<"$ONLY"
    for p in "${wanted[@]}"; do
        [[ " ${ALL_PROXIES[*]} " == *" $p "* ]] || die "unknown proxy '$p' (known: ${ALL_PROXIES[*]})"
        PROXIES+=("$p")
    done
else
    PROXIES=("${ALL_PROXIES[@]}")
fi
SKIPPED=()
avail=()
for p in "${PROXIES[@]}"; do
    if proxy_available "$p"; then avail+=("$p"); else warn "$p is not installed/built: left out"; SKIPPED+=("$p"); fi
done
PROXIES=("${avail[@]}")
((${#PROXIES[@]})) || die "no proxy to measure"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$ROOT/bench/results/$STAMP
mkdir -p "$RESULTS/logs" "$RESULTS/raw"
[[ -e $ROOT/bench/results/.gitignore ]] || printf '*\n' >"$ROOT/bench/results/.gitignore"
WORK=$(mktemp -d /tmp/gatehouse-bench.XXXXXX)
mkdir -p "$WORK/nginx-tmp" "$WORK/xdg"
chmod 777 "$WORK/nginx-tmp"   # nginx's worker runs as nobody
export XDG_DATA_HOME=$WORK/xdg XDG_CONFIG_HOME=$WORK/xdg   # Caddy's storage, not ~
HOLD_FD=
BACKEND_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n ${HOLD_FD:-} ]]; then exec {HOLD_FD}>&- || true; fi
    local p
    for p in "${STARTED[@]}"; do stop_tree "$p" 2; done
    rm -rf "$WORK"
    if ((rc != 0)); then log "stopped (exit $rc); partial results in ${RESULTS#"$ROOT"/}"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "results: ${RESULTS#"$ROOT"/}; proxies: ${PROXIES[*]}; rounds: $ROUNDS$( ((QUICK)) && echo ' (quick)')"

# ---------------------------------------------------------------- metadata
write_meta() {
    local pingora_version nginx_v haproxy_v caddy_v gh_v wrk_v h2load_v commit dirty
    pingora_version=$(awk '/^name = "pingora"$/ { getline; gsub(/[^0-9.]/, "", $0); print; exit }' \
        bench/pingora-ref/Cargo.lock 2>/dev/null || true)
    nginx_v=$(nginx -v 2>&1 | head -n1 || true)
    haproxy_v=$(haproxy -v 2>/dev/null | head -n1 || true)
    caddy_v=$(caddy version 2>/dev/null | head -n1 || true)
    gh_v=$("$GATEHOUSE" --version 2>/dev/null | head -n1 || true)
    wrk_v=$(wrk -v 2>&1 | head -n1 || true)
    h2load_v=$(h2load --version 2>/dev/null | head -n1 || true)
    commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo yes || echo no)
    M_COMMAND=$COMMAND_LINE M_STAMP=$STAMP M_QUICK=$QUICK M_ROUNDS=$ROUNDS \
        M_PROXIES="${PROXIES[*]}" M_SKIPPED="${SKIPPED[*]}" \
        M_CPU="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)" M_NPROC=$NPROC \
        M_KERNEL="$(uname -r)" M_MEM_KIB="$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)" \
        M_OS="$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")" \
        M_NGINX="$nginx_v" M_HAPROXY="$haproxy_v" M_CADDY="$caddy_v" M_PINGORA="$pingora_version" \
        M_GATEHOUSE="$gh_v" M_COMMIT="$commit" M_DIRTY="$dirty" M_WRK="$wrk_v" M_H2LOAD="$h2load_v" \
        M_SAT_S=$SAT_S M_LAT_S=$LAT_S M_WARM_S=$WARM_S M_HOLD=$HOLD_CONNS M_TRIES=$STARTUP_TRIES \
        M_LARGE=$LARGE M_LARGE_N=$LARGE_N M_SMALL_N=$SMALL_N M_NOFILE="$(ulimit -n)" \
        "$PY" - "$RESULTS/meta.json" <<'EOF'
import json, os, sys
e = os.environ
meta = {
    "command": e["M_COMMAND"], "stamp": e["M_STAMP"], "quick": e["M_QUICK"] == "1",
    "rounds": int(e["M_ROUNDS"]), "proxies": e["M_PROXIES"].split(),
    "skipped": e["M_SKIPPED"].split(),
    "machine": {"cpu": e["M_CPU"], "nproc": int(e["M_NPROC"]), "kernel": e["M_KERNEL"],
                "mem_kib": int(e["M_MEM_KIB"]), "os": e["M_OS"], "nofile": e["M_NOFILE"]},
    "versions": {"nginx": e["M_NGINX"], "haproxy": e["M_HAPROXY"], "caddy": e["M_CADDY"],
                 "pingora": e["M_PINGORA"], "gatehouse": e["M_GATEHOUSE"],
                 "commit": e["M_COMMIT"], "dirty": e["M_DIRTY"] == "yes",
                 "wrk": e["M_WRK"], "h2load": e["M_H2LOAD"]},
    "params": {"saturation_s": int(e["M_SAT_S"]), "latency_s": int(e["M_LAT_S"]),
               "warmup_s": int(e["M_WARM_S"]), "hold_connections": int(e["M_HOLD"]),
               "startup_tries": int(e["M_TRIES"]), "large": e["M_LARGE"] == "1",
               "large_n": int(e["M_LARGE_N"]), "small_n": int(e["M_SMALL_N"]),
               "rates": {"100": 5000, "64k": 2000, "1m": 200},
               "connections": {"100": 64, "64k": 64, "1m": 16}},
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=1)
EOF
}
write_meta

# ---------------------------------------------------------------- 3. the backend
log "starting gh-backend on $BACKEND (core $LOAD_CORE)"
free_port "$BACKEND_PORT" || die "port $BACKEND_PORT is busy"
"$GH_BACKEND" --listen "$BACKEND" >"$RESULTS/logs/gh-backend.log" 2>&1 &
BACKEND_PID=$!
track "$BACKEND_PID"
proc wait-listen "$BACKEND_PORT" 10 "$BACKEND_PID" || die "gh-backend did not start (see logs/gh-backend.log)"
for path in / /64k /1m; do
    [[ $(http_code "http://$BACKEND$path") == 200 ]] || die "gh-backend: GET $path is not 200"
done
backend_stats >/dev/null || die "gh-backend: GET /__stats failed"

# ---------------------------------------------------------------- measurements
# wrk at saturation on PATH: req/s, CPU µs per request of the proxy's process tree, upstream
# connections opened.
measure_saturation() {
    local name=$1 round=$2 body=$3 path=${BODY_PATH[$3]} port out s0 s1 c0 c1 hz
    port=$(proxy_port "$name")
    out=$RESULTS/raw/wrk-$name-$body-r$round.txt
    read -r s0c s0r < <(backend_stats)
    read -r c0 hz < <(proc cpu "$PROXY_PID")
    timeout $((SAT_S + 30)) wrk -t1 -c50 -d"${SAT_S}s" --timeout 5s "http://127.0.0.1:$port$path" >"$out" 2>&1 || true
    read -r c1 hz < <(proc cpu "$PROXY_PID")
    read -r s1c s1r < <(backend_stats)
    local reqs wall rps non2xx errs ticks cpu_us
    reqs=$(awk '/requests in/ { print $1; exit }' "$out")
    wall=$(awk '/requests in/ { sub(/s,$/, "", $4); print $4; exit }' "$out")
    rps=$(awk '/^Requests\/sec:/ { print $2; exit }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$out")
    errs=$(awk '/Socket errors:/ { n = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i; print n; exit }' "$out")
    if [[ -z $reqs || -z $rps || $reqs == 0 ]]; then
        warn "$name $body: wrk gave no result (see ${out#"$ROOT"/})"
        emit saturation round="$round" proxy="$name" body="$body" error="wrk gave no result"
        return 0
    fi
    ticks=$((c1 - c0))
    cpu_us=$(calc 'a * (1000000 / b) / c' "$ticks" "$hz" "$reqs")
    log "  $name $body saturation: $rps req/s, $cpu_us µs CPU/req, $((s1c - s0c - 1)) upstream conns${non2xx:+, non-2xx $non2xx}${errs:+, socket errors $errs}"
    emit saturation round="$round" proxy="$name" body="$body" duration_s="$SAT_S" wall_s="${wall:-$SAT_S}" \
        requests="$reqs" rps="$rps" cpu_ticks="$ticks" hz="$hz" cpu_us_per_req="$cpu_us" \
        non2xx="${non2xx:-0}" socket_errors="${errs:-0}" \
        upstream_conns=$((s1c - s0c - 1)) upstream_requests=$((s1r - s0r - 1))
}

# gh-load open loop at a fixed rate: p50/p99/p99.9 from the intended send times.
# measure_latency NAME ROUND BODY [HOST] [KIND] [extra key=value...]
measure_latency() {
    local name=$1 round=$2 body=$3 host=${4:-} kind=${5:-latency} port out args
    shift 5 2>/dev/null || shift $#
    port=$(proxy_port "$name")
    out=$RESULTS/raw/load-$kind-$name-$body${host:+-hosts}-r$round-$(now_ns).json
    args=(rate --url "http://127.0.0.1:$port${BODY_PATH[$body]}" --rate "${BODY_RATE[$body]}"
        --duration "${LAT_S}s" --warmup "${WARM_S}s" --connections "${BODY_CONNS[$body]}" --json "$out")
    [[ -n $host ]] && args+=(--host "$host")
    # CPU of the proxy over the whole run (warm-up included) per request the backend served:
    # CPU per request at the same fixed load for every proxy.
    local c0 c1 hz s0c s0r s1c s1r
    read -r s0c s0r < <(backend_stats)
    read -r c0 hz < <(proc cpu "$PROXY_PID")
    if ! timeout $((LAT_S + WARM_S + 60)) "$GH_LOAD" "${args[@]}" >"$out.log" 2>&1 || [[ ! -s $out ]]; then
        warn "$name $body: gh-load rate failed: $(tail -n 2 "$out.log" | tr '\n' ' ')"
        emit "$kind" round="$round" proxy="$name" body="$body" error="gh-load rate failed" "$@"
        return 0
    fi
    read -r c1 hz < <(proc cpu "$PROXY_PID")
    read -r s1c s1r < <(backend_stats)
    log "  $name $body at ${BODY_RATE[$body]} req/s${host:+ (Host $host)}: $("$PY" -c '
import json, sys
r = json.load(open(sys.argv[1]))
ms = lambda k: "%.3f" % (r.get(k, 0) / 1000)
print("p50 %s ms, p99 %s ms, p99.9 %s ms, errors %s, late %s" % (ms("p50_us"), ms("p99_us"), ms("p999_us"), r.get("errors"), r.get("late")))
' "$out")"
    emit "$kind" round="$round" proxy="$name" body="$body" rate="${BODY_RATE[$body]}" \
        duration_s="$LAT_S" cpu_ticks=$((c1 - c0)) hz="$hz" upstream_requests=$((s1r - s0r - 1)) \
        upstream_conns=$((s1c - s0c - 1)) "$@" result="@$out"
}

# KiB per idle keep-alive client connection: RSS before and while gh-load holds 10,000.
measure_hold() {
    local name=$1 round=$2 port before after out hpid line ok failed i
    port=$(proxy_port "$name")
    out=$RESULTS/raw/hold-$name-r$round.txt
    before=$(proc rss "$PROXY_PID")
    rm -f "$WORK/hold.fifo"
    mkfifo "$WORK/hold.fifo"
    "$GH_LOAD" hold --addr "127.0.0.1:$port" --connections "$HOLD_CONNS" --path / --hold-for 120s \
        <"$WORK/hold.fifo" >"$out" 2>&1 &
    hpid=$!
    track "$hpid"
    exec {HOLD_FD}<>"$WORK/hold.fifo"   # read-write: never blocks; closing it is the EOF
    line=
    for ((i = 0; i < 900; i++)); do   # 90 s at most
        line=$(grep -m1 '^ready' "$out" 2>/dev/null || true)
        [[ -n $line ]] && break
        alive "$hpid" || break
        sleep 0.1
    done
    if [[ -z $line ]]; then
        warn "$name: gh-load hold never said ready: $(tail -n 2 "$out" | tr '\n' ' ')"
        exec {HOLD_FD}>&-
        HOLD_FD=
        stop_tree "$hpid" 2
        emit hold round="$round" proxy="$name" error="gh-load hold never ready"
        return 0
    fi
    sleep 1
    after=$(proc rss "$PROXY_PID")
    read -r _ ok failed <<<"$line"
    exec {HOLD_FD}>&-
    HOLD_FD=
    for ((i = 0; i < 300; i++)); do alive "$hpid" || break; sleep 0.1; done
    stop_tree "$hpid" 2
    local per
    per=$(calc '(b - a) / (c > 0 ? c : 1)' "$before" "$after" "${ok:-0}")
    log "  $name idle connections: ${ok:-0} held (${failed:-0} failed), RSS $before -> $after KiB, $per KiB each"
    emit hold round="$round" proxy="$name" connections="$HOLD_CONNS" ok="${ok:-0}" failed="${failed:-0}" \
        rss_before_kib="$before" rss_after_kib="$after" kib_per_conn="$per"
}

measure_proxy() {
    local name=$1 round=$2 port rss pss
    port=$(proxy_port "$name")
    log "round $round: $name on 127.0.0.1:$port"
    proxy_start "$name" 0 30 || { emit error round="$round" proxy="$name" what="did not start"; return 1; }
    sleep 1
    rss=$(proc rss "$PROXY_PID")
    pss=$(proc pss "$PROXY_PID")
    log "  $name idle RSS: $rss KiB, PSS $pss KiB (listening ${LOAD_MS} ms after exec)"
    emit idle round="$round" proxy="$name" rss_kib="$rss" pss_kib="$pss" listen_ms="$LOAD_MS"
    local sc sr ec er
    read -r sc sr < <(backend_stats)
    if ! wait_200 "http://127.0.0.1:$port/" "" 10; then
        emit error round="$round" proxy="$name" what="no 200 through the proxy"
        proxy_stop
        return 1
    fi
    # warm-up: connections, pools, caches
    timeout 30 wrk -t1 -c50 -d1s "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
    local body
    measure_saturation "$name" "$round" 100
    measure_latency "$name" "$round" 100
    for body in 64k 1m; do
        measure_saturation "$name" "$round" "$body"
        measure_latency "$name" "$round" "$body"
    done
    read -r ec er < <(backend_stats)
    # every /__stats call between the two readings counts one connection and one request
    local calls=$((2 * 3 + 2 * 3 + 1))
    emit reuse round="$round" proxy="$name" upstream_conns=$((ec - sc - calls)) \
        upstream_requests=$((er - sr - calls))
    log "  $name upstream: $((ec - sc - calls)) connections for $((er - sr - calls)) requests"
    measure_hold "$name" "$round"
    proxy_stop
}

# Time from exec to the first proxied 200 (gh-load first200 starts the proxy itself), median of
# STARTUP_TRIES.
measure_startup() {
    local name=$1 round=$2 port i out ms list=()
    port=$(proxy_port "$name")
    proxy_prepare "$name" 0
    for ((i = 1; i <= STARTUP_TRIES; i++)); do
        free_port "$port" || { warn "$name: port $port stays busy"; break; }
        out=$(timeout 30 "$GH_LOAD" first200 --url "http://127.0.0.1:$port/" --timeout 10s -- \
            taskset -c "$PROXY_CORE" "${PROXY_CMD[@]}" 2>>"$RESULTS/logs/first200-$name.log") || true
        ms=$(grep -o '"ms": *[0-9.]*' <<<"$out" | grep -o '[0-9.]*$' || true)
        [[ -n $ms ]] && list+=("$ms") || warn "$name first200 try $i: no result ($out)"
        free_port "$port" || true
    done
    local joined
    joined=$(IFS=,; echo "${list[*]}")
    log "  $name first proxied 200 after exec (ms): ${joined:-none}"
    emit startup round="$round" proxy="$name" ms="[${joined}]"
}

CADDY_LARGE_N=
# The large in-memory state run: the proxy holds N host routes; open-loop latency with requests
# for one existing host.
measure_large() {
    local name=$1 round=$2 n=$3 port rss timeout=300 k
    port=$(proxy_port "$name")
    local sizes=("$n")
    if [[ $name == caddy && $n == "$LARGE_N" ]]; then
        timeout=$CADDY_LOAD_LIMIT_S
        if [[ -n $CADDY_LARGE_N ]]; then sizes=("$CADDY_LARGE_N"); else sizes=("$n" 300000 100000 30000); fi
    fi
    local size started=0
    for size in "${sizes[@]}"; do
        ((size == n)) || log "  caddy: trying $size hosts"
        proxy_prepare "$name" "$size"   # writes the config before the clock starts
        if proxy_start "$name" "$size" "$timeout"; then started=1; break; fi
        emit large_fail round="$round" proxy="$name" hosts="$size" limit_s="$timeout"
    done
    if ((!started)); then
        emit error round="$round" proxy="$name" what="large state: did not start with $n hosts"
        return 1
    fi
    [[ $name == caddy && $n == "$LARGE_N" ]] && CADDY_LARGE_N=$size
    sleep 1
    rss=$(proc rss "$PROXY_PID")
    k=$((RANDOM * 32768 + RANDOM))
    k=$((k % size))
    log "  $name with $size host routes: listening after $LOAD_MS ms, RSS $rss KiB"
    if wait_200 "http://127.0.0.1:$port/" "h$k.example.com" 10; then
        measure_latency "$name" "$round" 100 "h$k.example.com" large hosts="$size" \
            requested_hosts="$n" load_ms="$LOAD_MS" rss_kib="$rss"
    else
        emit large round="$round" proxy="$name" hosts="$size" requested_hosts="$n" \
            load_ms="$LOAD_MS" rss_kib="$rss" error="no 200 for h$k.example.com"
    fi
    proxy_stop
}

# ---------------------------------------------------------------- 4. rounds
T_START=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
    n=${#PROXIES[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${PROXIES[$(((i + round - 1) % n))]}"); done
    log "=== round $round of $ROUNDS: ${order[*]}"
    # The backend alone, no proxy in between: the floor under every latency figure (the load
    # generator and the backend share core 1).
    log "round $round: the backend alone (no proxy)"
    PROXY_PID=$BACKEND_PID
    for body in "${BODIES[@]}"; do measure_latency direct "$round" "$body"; done
    PROXY_PID=
    for p in "${order[@]}"; do
        measure_proxy "$p" "$round" || warn "$p: round $round incomplete"
    done
    log "--- round $round: startup time (first proxied 200)"
    for p in "${order[@]}"; do measure_startup "$p" "$round" || warn "$p: startup not measured"; done
    if ((LARGE)); then
        log "--- round $round: large in-memory state ($SMALL_N vs $LARGE_N host routes)"
        for p in "${order[@]}"; do
            for nh in "$SMALL_N" "$LARGE_N"; do
                measure_large "$p" "$round" "$nh" || warn "$p: large state ($nh) not measured"
            done
        done
    fi
done
log "measurements done in $(($(date +%s) - T_START)) s"
stop_tree "$BACKEND_PID" 5

if ((REPORT)); then
    "$PY" "$ROOT/bench/report.py" "$RESULTS"
    log "wrote docs/benchmarks.md and docs/bench-latency.svg"
fi
log "raw results: ${RESULTS#"$ROOT"/}"
