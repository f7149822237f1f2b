# Helpers for bench/run.sh: logging, process tracking, JSON lines, /proc figures.
# Sourced, not run. Expects ROOT, WORK, RESULTS and PY to be set by run.sh.

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() { log "ERROR: $*"; exit 1; }

now_ns() { date +%s%N; }
# ms between two now_ns values, 1 decimal
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'; }
# awk arithmetic on arguments: calc 'expression in a, b, c...' a b c
calc() { local e=$1; shift; awk -v a="${1:-0}" -v b="${2:-0}" -v c="${3:-0}" -v d="${4:-0}" "BEGIN { printf \"%.4f\", $e }"; }

proc() { "$PY" "$ROOT/bench/lib/proc.py" "$@"; }

# ---------------------------------------------------------------- processes we started
# Every long-lived process started by run.sh is recorded here (its pid); the EXIT trap ends
# each of them and its descendants. Nothing else is ever signalled.
STARTED=()
track() { STARTED+=("$1"); }
untrack() {
    local p keep=()
    for p in "${STARTED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}
alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# stop_tree PID [GRACE_S]: SIGTERM to PID and its descendants, SIGKILL to what is left after
# GRACE_S seconds (default 5), then reap.
stop_tree() {
    local pid=$1 grace=${2:-5} pids p i
    pids=$(proc tree "$pid" 2>/dev/null || echo "$pid")
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < grace * 20; i++)); do
        local any=0
        for p in $pids; do alive "$p" && any=1; done
        ((any)) || break
        sleep 0.05
    done
    for p in $pids; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
    wait "$pid" 2>/dev/null || true
    untrack "$pid"
}

# free_port PORT: make sure nothing we started still listens on PORT (after a first-200 try,
# for instance, where gh-load started the proxy); those processes are found by their listening
# socket and signalled by pid.
free_port() {
    local port=$1 p
    proc wait-free "$port" 5 && return 0
    for p in $(proc listen-pids "$port"); do
        warn "pid $p still listens on $port; stopping it"
        kill -TERM "$p" 2>/dev/null || true
    done
    proc wait-free "$port" 5 && return 0
    for p in $(proc listen-pids "$port"); do kill -KILL "$p" 2>/dev/null || true; done
    proc wait-free "$port" 5
}

# ---------------------------------------------------------------- JSON lines
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/ }
    printf '"%s"' "$s"
}

# emit KIND key=value ...: one JSON line in $RESULTS/results.jsonl. A value that is a number is
# written as a number, "@FILE" as the JSON held in FILE (null when empty), "null" as null, a
# value in [brackets] as is (a JSON array of numbers), anything else as a string.
emit() {
    local kind=$1 kv k v line
    shift
    line="{\"kind\":$(json_str "$kind")"
    for kv in "$@"; do
        k=${kv%%=*}
        v=${kv#*=}
        if [[ $v == @* ]]; then
            v=$(tr -d '\n' <"${v#@}" 2>/dev/null || true)
            [[ -n $v ]] || v=null
        elif [[ $v =~ ^-?(0|[1-9][0-9]*)(\.[0-9]+)?$ || $v == null || $v =~ ^\[[0-9.,]*\]$ ]]; then
            :
        else
            v=$(json_str "$v")
        fi
        line+=",$(json_str "$k"):$v"
    done
    printf '%s}\n' "$line" >>"$RESULTS/results.jsonl"
}

# ---------------------------------------------------------------- backend and HTTP checks
# backend_stats: prints "CONNECTIONS REQUESTS" from gh-backend's GET /__stats
backend_stats() {
    local body
    body=$(curl -sS --max-time 5 "http://$BACKEND/__stats") || { echo "0 0"; return 1; }
    local c r
    c=$(grep -o '"connections":[0-9]*' <<<"$body" | cut -d: -f2)
    r=$(grep -o '"requests":[0-9]*' <<<"$body" | cut -d: -f2)
    echo "${c:-0} ${r:-0}"
}

# http_code URL [HOST]: the status code of one GET (000 when none came back)
http_code() {
    local url=$1 host=${2:-}
    if [[ -n $host ]]; then
        curl -s -o /dev/null --max-time 5 -H "Host: $host" -w '%{http_code}' "$url" || true
    else
        curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$url" || true
    fi
}

# wait_200 URL [HOST] [SECS]: retry until a 200 comes back
wait_200() {
    local url=$1 host=${2:-} secs=${3:-10} i code
    for ((i = 0; i < secs * 10; i++)); do
        code=$(http_code "$url" "$host")
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    warn "$url (Host: ${host:-default}) answered $code, not 200"
    return 1
}
