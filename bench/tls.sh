#!/usr/bin/env bash
# TLS and HTTP/2 benchmark: Gatehouse, nginx, HAProxy and Caddy terminating TLS in front of the
# same backend, side by side on this machine, interleaved in rounds. Measures, per proxy:
#   - HTTP/1.1 over TLS, keep-alive, at saturation (h2load --h1 -c50): req/s, CPU per request;
#   - HTTP/2 over TLS at saturation (h2load -c50 -m10): req/s, CPU per request;
#   - full TLS handshakes per second (openssl s_time -new): new connections, no resumption;
#   - RSS after the runs.
#
#   bash bench/tls.sh [--quick] [--rounds N] [--only gatehouse,nginx,...] [--no-install]
#                     [--no-build] [--write]
#
# --write puts the tables into docs/benchmarks.md (between the tls-bench markers). Everything
# listens on and sends to 127.0.0.1; every load step is bounded in time. The proxy runs on
# core 0, the load generator and the backend on core 1 (as bench/run.sh does).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COMMAND_LINE="bash bench/tls.sh${*:+ $*}"

QUICK=0 ROUNDS= ONLY= INSTALL=1 BUILD=1 WRITE=0
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --write) WRITE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[[ -z $ROUNDS ]] && { ((QUICK)) && ROUNDS=1 || ROUNDS=3; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "--rounds wants a positive integer" >&2; exit 2; }
if ((QUICK)); then RUN_S=3 WARM_S=1; else RUN_S=10 WARM_S=2; fi

BACKEND_PORT=${BENCH_BACKEND_PORT:-9100}
BACKEND=127.0.0.1:$BACKEND_PORT
PORT_BASE=${BENCH_TLS_PORT_BASE:-9400}
PROXY_CORE=0
LOAD_CORE=1
PY=python3
[[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
GATEHOUSE=$ROOT/target/release/gatehouse
GH_BACKEND=$ROOT/bench/tools/target/release/gh-backend
ALL=(gatehouse nginx haproxy caddy)

# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"

install_deps() {
    local want=(nginx-light haproxy caddy nghttp2-client openssl curl python3) missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if command -v nginx >/dev/null; then
        local m=()
        for p in "${missing[@]}"; do [[ $p == nginx-light ]] || m+=("$p"); done
        missing=("${m[@]}")
    fi
    ((${#missing[@]})) || return 0
    log "installing: ${missing[*]}"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    for p in nginx haproxy caddy; do "${sudo[@]}" service "$p" stop >/dev/null 2>&1 || true; done
}

((INSTALL)) && install_deps
if ((BUILD)); then
    log "building gatehouse and bench/tools (release)"
    cargo build --release --quiet
    cargo build --release --quiet --manifest-path bench/tools/Cargo.toml
fi
for t in "$GATEHOUSE" "$GH_BACKEND"; do [[ -x $t ]] || die "$t is missing (run without --no-build)"; done
for t in h2load openssl curl taskset; do command -v "$t" >/dev/null || die "$t is missing"; done
(($(nproc) >= 2)) || die "needs at least 2 cores"
taskset -cp "$LOAD_CORE" $$ >/dev/null
export GOMAXPROCS=1
ulimit -n 65536 2>/dev/null || true

available() {
    case $1 in
    gatehouse) [[ -x $GATEHOUSE ]] ;;
    *) command -v "$1" >/dev/null ;;
    esac
}
PROXIES=()
if [[ -n $ONLY ]]; then IFS=, read -r -a PROXIES <<<"$ONLY"; else PROXIES=("${ALL[@]}"); fi
avail=()
for p in "${PROXIES[@]}"; do
    if available "$p"; then avail+=("$p"); else warn "$p is not installed: left out"; fi
done
PROXIES=("${avail[@]}")

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$ROOT/bench/results/tls-$STAMP
mkdir -p "$RESULTS/logs" "$RESULTS/raw"
[[ -e $ROOT/bench/results/.gitignore ]] || printf '*\n' >"$ROOT/bench/results/.gitignore"
WORK=$(mktemp -d /tmp/gatehouse-tls-bench.XXXXXX)
mkdir -p "$WORK/nginx-tmp" "$WORK/xdg"
chmod 777 "$WORK/nginx-tmp"
export XDG_DATA_HOME=$WORK/xdg XDG_CONFIG_HOME=$WORK/xdg
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${STARTED[@]}"; do stop_tree "$p" 2; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One certificate for all: ECDSA P-256, the cheapest common choice, the same for everyone.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"

port_of() {
    local i
    for i in "${!ALL[@]}"; do [[ ${ALL[$i]} == "$1" ]] && { echo $((PORT_BASE + i + 1)); return; }; done
}

# write_config NAME PORT: the proxy's config in $WORK, TLS 1.2/1.3, HTTP/2 and HTTP/1.1 by ALPN,
# one worker, no access log, a keep-alive pool to the backend.
write_config() {
    local name=$1 port=$2
    case $name in
    gatehouse)
        cat >"$WORK/gatehouse.toml" <<EOF
workers = 1
[log]
access = false
[timeouts]
shutdown_grace = "2s"
[[listener]]
name = "tls"
listen = "127.0.0.1:$port"
tls = { cert = "$WORK/cert.pem", key = "$WORK/key.pem" }
[upstream.app]
servers = ["$BACKEND"]
keepalive = 256
[[route]]
path = "/"
upstream = "app"
EOF
        ;;
    nginx)
        cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx.pid;
error_log $RESULTS/logs/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    upstream app { server $BACKEND; keepalive 256; keepalive_requests 1000000; }
    server {
        # "listen ... http2" rather than "http2 on": Debian's nginx 1.22 predates the latter.
        listen 127.0.0.1:$port ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
        ;;
    haproxy)
        cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend tls
    bind 127.0.0.1:$port ssl crt $WORK/haproxy.pem alpn h2,http/1.1
    default_backend app
backend app
    server s1 $BACKEND
EOF
        ;;
    caddy)
        cat >"$WORK/caddy.json" <<EOF
{"admin": {"disabled": true},
 "logging": {"logs": {"default": {"level": "ERROR"}}},
 "apps": {
  "http": {"servers": {"tls": {
    "listen": ["127.0.0.1:$port"],
    "protocols": ["h1", "h2"],
    "automatic_https": {"disable": true},
    "tls_connection_policies": [{"certificate_selection": {"any_tag": ["bench"]}}],
    "routes": [{"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": "$BACKEND"}],
      "transport": {"protocol": "http", "keep_alive": {"max_idle_conns_per_host": 256}}}]}]
  }}},
  "tls": {"certificates": {"load_files": [{"certificate": "$WORK/cert.pem", "key": "$WORK/key.pem", "tags": ["bench"]}]}}
 }
}
EOF
        ;;
    esac
}

command_of() {
    case $1 in
    gatehouse) echo "$GATEHOUSE run -c $WORK/gatehouse.toml" ;;
    nginx) echo "nginx -e $RESULTS/logs/nginx-error.log -c $WORK/nginx.conf" ;;
    haproxy) echo "haproxy -db -f $WORK/haproxy.cfg" ;;
    caddy) echo "caddy run --config $WORK/caddy.json" ;;
    esac
}

log "starting gh-backend on $BACKEND"
free_port "$BACKEND_PORT" || die "port $BACKEND_PORT is busy"
"$GH_BACKEND" --listen "$BACKEND" >"$RESULTS/logs/gh-backend.log" 2>&1 &
track $!
proc wait-listen "$BACKEND_PORT" 10 "$!" || die "gh-backend did not start"

RESULTS_FILE=$RESULTS/results.jsonl
: >"$RESULTS_FILE"
record() { printf '{"proxy":"%s","round":%d,"metric":"%s","value":%s}\n' "$1" "$2" "$3" "$4" >>"$RESULTS_FILE"; }

# h2load_run NAME ROUND LABEL PID ARGS...: one saturation run; records req/s and CPU µs/request.
h2load_run() {
    local name=$1 round=$2 label=$3 pid=$4
    shift 4
    local out=$RESULTS/raw/$name-$round-$label.txt c0 c1 hz reqs rps ok
    read -r c0 hz < <(proc cpu "$pid")
    timeout $((RUN_S + WARM_S + 30)) h2load -t1 --warm-up-time="$WARM_S" -D "$RUN_S" "$@" >"$out" 2>&1 || true
    read -r c1 hz < <(proc cpu "$pid")
    # "finished in 10.00s, 41234.50 req/s, ..." and "requests: N total, N started, N done, N succeeded, ..."
    rps=$(awk '/^finished in/ { gsub(/,/, "", $4); print $4; exit }' "$out")
    ok=$(awk '/^requests:/ { print $8; exit }' "$out")
    reqs=$(awk '/^status codes:/ { gsub(/,/, "", $3); print $3; exit }' "$out")
    if [[ -z $rps || -z $ok || ${ok:-0} -eq 0 ]]; then
        warn "$name $label: no successful requests (see ${out#"$ROOT"/})"
        return 0
    fi
    # CPU over the whole run, warm-up included: divided by every request h2load sent.
    local total
    total=$(awk '/^requests:/ { print $4; exit }' "$out")
    record "$name" "$round" "${label}_rps" "$rps"
    record "$name" "$round" "${label}_cpu_us" "$(calc 'a * 1e6 / b / c' "$((c1 - c0))" "$hz" "${total:-1}")"
    record "$name" "$round" "${label}_2xx_share" "$(calc 'a / b' "${reqs:-0}" "${ok:-1}")"
}

# handshakes NAME ROUND PID: full handshakes per second, one at a time (openssl s_time -new).
handshakes() {
    local name=$1 round=$2 pid=$3 out=$RESULTS/raw/$1-$2-handshakes.txt c0 c1 hz n secs
    read -r c0 hz < <(proc cpu "$pid")
    timeout $((RUN_S + 30)) openssl s_time -connect "127.0.0.1:$(port_of "$name")" -new -time "$RUN_S" >"$out" 2>&1 || true
    read -r c1 hz < <(proc cpu "$pid")
    # "1234 connections in 3.05s; 404.59 connections/user sec, ..."
    read -r n secs < <(awk '/connections in [0-9.]+s;/ { s = $4; sub(/s;$/, "", s); print $1, s; exit }' "$out")
    if [[ -z ${n:-} || ${n:-0} -eq 0 ]]; then
        warn "$name: s_time made no connection (see ${out#"$ROOT"/})"
        return 0
    fi
    record "$name" "$round" handshake_per_s "$(calc 'a / b' "$n" "$secs")"
    record "$name" "$round" handshake_cpu_us "$(calc 'a * 1e6 / b / c' "$((c1 - c0))" "$hz" "$n")"
}

for ((round = 1; round <= ROUNDS; round++)); do
    # Rotate the order each round so drift hits all alike.
    order=("${PROXIES[@]:$(((round - 1) % ${#PROXIES[@]}))}" "${PROXIES[@]:0:$(((round - 1) % ${#PROXIES[@]}))}")
    for name in "${order[@]}"; do
        port=$(port_of "$name")
        write_config "$name" "$port"
        free_port "$port" || die "port $port is busy"
        # shellcheck disable=SC2046
        taskset -c "$PROXY_CORE" $(command_of "$name") >>"$RESULTS/logs/$name.log" 2>&1 &
        pid=$!
        track "$pid"
        if ! proc wait-listen "$port" 30 "$pid"; then
            warn "$name did not start (see logs/$name.log)"
            stop_tree "$pid" 2
            continue
        fi
        url=https://127.0.0.1:$port/
        code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 "$url" || true)
        [[ $code == 200 ]] || warn "$name: GET / over TLS gave $code"
        h2=$(curl -sk --http2 -o /dev/null -w '%{http_version}' --max-time 5 "$url" || true)
        log "round $round: $name (ALPN h2: $([[ $h2 == 2 ]] && echo yes || echo no))"
        h2load_run "$name" "$round" h1 "$pid" --h1 -c50 "$url"
        if [[ $h2 == 2 ]]; then
            h2load_run "$name" "$round" h2 "$pid" -c50 -m10 "$url"
        fi
        handshakes "$name" "$round" "$pid"
        record "$name" "$round" rss_kib "$(proc rss "$pid")"
        stop_tree "$pid" 5
        untrack "$pid"
        proc wait-free "$port" 10 || true
    done
done

META=$RESULTS/meta.json
{
    printf '{"command":"%s","stamp":"%s","rounds":%d,"run_s":%d,' "$COMMAND_LINE" "$STAMP" "$ROUNDS" "$RUN_S"
    printf '"commit":"%s",' "$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    printf '"cpu":"%s",' "$(awk -F: '/model name/ { gsub(/^ +/, "", $2); print $2; exit }' /proc/cpuinfo)"
    printf '"versions":{"gatehouse":"%s","nginx":"%s","haproxy":"%s","caddy":"%s","h2load":"%s","openssl":"%s"}}\n' \
        "$("$GATEHOUSE" --version 2>/dev/null | head -n1)" "$(nginx -v 2>&1 | head -n1)" \
        "$(haproxy -v 2>/dev/null | head -n1)" "$(caddy version 2>/dev/null | head -n1 | cut -c1-40)" \
        "$(h2load --version 2>/dev/null | head -n1)" "$(openssl version)"
} >"$META"

"$PY" "$ROOT/bench/lib/tlsreport.py" "$RESULTS" >"$RESULTS/report.md"
cat "$RESULTS/report.md"
if ((WRITE)); then
    "$PY" "$ROOT/bench/lib/tlsreport.py" "$RESULTS" --into "$ROOT/docs/benchmarks.md"
    log "docs/benchmarks.md updated"
fi
