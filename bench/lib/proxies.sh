# The proxies under benchmark: their ports, configs and command lines. Sourced by run.sh.
# Every proxy runs with one worker, no access log, and a keep-alive pool of at least 128 idle
# connections to the one backend.

ALL_PROXIES=(gatehouse nginx haproxy caddy pingora)

proxy_port() {
    case $1 in
    gatehouse) echo $((PORT_BASE + 1)) ;;
    nginx) echo $((PORT_BASE + 2)) ;;
    haproxy) echo $((PORT_BASE + 3)) ;;
    caddy) echo $((PORT_BASE + 4)) ;;
    pingora) echo $((PORT_BASE + 5)) ;;
    direct) echo "$BACKEND_PORT" ;;   # the backend alone: the floor of the latency figures
    *) die "unknown proxy $1" ;;
    esac
}

# proxy_available NAME: is its binary there?
proxy_available() {
    case $1 in
    gatehouse) [[ -x $GATEHOUSE ]] ;;
    nginx) command -v nginx >/dev/null ;;
    haproxy) command -v haproxy >/dev/null ;;
    caddy) command -v caddy >/dev/null ;;
    pingora) [[ -x $PINGORA ]] ;;
    esac
}

# proxy_prepare NAME HOSTS: writes the config (once per NAME and HOSTS) and sets PROXY_CMD,
# the command line that runs the proxy in the foreground. HOSTS=0: every request on "/" goes
# to the backend; HOSTS=N: only h0.example.com ... h<N-1>.example.com do.
proxy_prepare() {
    local name=$1 hosts=$2 port conf
    port=$(proxy_port "$name")
    case $name in
    gatehouse) conf=$WORK/gatehouse-$hosts.toml ;;
    nginx) conf=$WORK/nginx-$hosts.conf ;;
    haproxy) conf=$WORK/haproxy-$hosts.cfg ;;
    caddy) conf=$WORK/caddy-$hosts.json ;;
    pingora) conf= ;;
    esac
    if [[ -n $conf && ! -s $conf ]]; then
        "$PY" "$ROOT/bench/lib/genconf.py" "$name" --port "$port" --backend "$BACKEND" \
            --dir "$WORK" --logdir "$RESULTS/logs" --hosts "$hosts" --out "$conf" || die "could not write $conf"
    fi
    case $name in
    gatehouse) PROXY_CMD=("$GATEHOUSE" run -c "$conf") ;;
    nginx) PROXY_CMD=(nginx -e "$RESULTS/logs/nginx-error.log" -c "$conf") ;;
    haproxy) PROXY_CMD=(haproxy -db -f "$conf") ;;
    # GOMAXPROCS=1 is exported by run.sh; the .json name makes Caddy read the file as JSON
    caddy) PROXY_CMD=(caddy run --config "$conf") ;;
    pingora) PROXY_CMD=("$PINGORA" --listen "127.0.0.1:$port" --upstream "$BACKEND" --threads 1 --hosts "$hosts") ;;
    esac
}

# proxy_start NAME HOSTS [TIMEOUT_S]: starts it pinned to core 0 and waits until it listens
# (read from /proc/net/tcp, no packet sent). Sets PROXY_PID and LOAD_MS (exec to listening).
proxy_start() {
    local name=$1 hosts=$2 timeout=${3:-30} port t0 t1 logf
    port=$(proxy_port "$name")
    proxy_prepare "$name" "$hosts"
    free_port "$port" || die "port $port is busy (another program listens there)"
    logf=$RESULTS/logs/$name-$hosts.log
    t0=$(now_ns)
    taskset -c "$PROXY_CORE" "${PROXY_CMD[@]}" >>"$logf" 2>&1 &
    PROXY_PID=$!
    track "$PROXY_PID"
    if ! proc wait-listen "$port" "$timeout" "$PROXY_PID"; then
        warn "$name (hosts=$hosts) did not listen on $port within ${timeout}s; last lines of $logf:"
        tail -n 5 "$logf" >&2 || true
        stop_tree "$PROXY_PID" 2
        PROXY_PID=
        return 1
    fi
    t1=$(now_ns)
    LOAD_MS=$(ms_between "$t0" "$t1")
}

proxy_stop() {
    [[ -n ${PROXY_PID:-} ]] || return 0
    stop_tree "$PROXY_PID" 5
    PROXY_PID=
}
