#!/usr/bin/env bash
# Runs issue 4's comparison on this machine and prints one table: every
# measure of examples/load.rs on five paths to the same echo service, in the
# same run, measure by measure (so drift of a shared machine hits all paths
# of a measure alike):
#
#   direct   client -> echo server                        (load echo-server)
#   relay    client -> relay -> `tcp-relay echo`          (relay only)
#   tunnel   client -> relay -> `tcp-relay expose --ready $READY` -> echo server
#   bore     client -> bore server -> `bore local` -> echo server
#   rathole  client -> rathole server -> rathole client -> echo server
#
# The measures: bulk (1 and 8 streams), rr, churn, issue 9's burst (BURST
# clients connecting at once, each streaming BURST_BYTES full duplex:
# clients lost, MiB/s, peak RSS of server and agent; benches/burst.sh runs it
# repeatedly on fresh processes, with the user's flags) and idle.
#
# Everything listens on 127.0.0.1, on ports picked free at run time (but
# bore's control port, fixed at 7835, which must be free); every process
# started here is stopped on exit. bore and rathole are installed with
# `cargo install bore-cli` / `cargo install rathole` when missing (rathole
# builds for several minutes); a peer that does not install reads n/a.
# rathole runs from two TOML files written here (plain TCP transport, its
# default). Takes about 4 minutes (2.5 before rathole and the burst).
#
# Knobs (environment): SECS (rr and churn duration, 5), RR_CONNS (100),
# CHURN_THREADS (4), BULK1 (bytes each way, 1 stream, 1 GiB), BULK8 (bytes
# each way per stream, 8 streams, 128 MiB), BURST (clients, 1000; 0 skips
# it), BURST_BYTES (each way per client, 4 MiB), IDLE (connections held,
# 8000), PATHS (subset of "direct relay tunnel bore rathole"), READY
# (dial-ins `expose` keeps ready, 8; 0 for the plain protocol), SPLICE=0
# (relays and expose copy through rings instead of splicing), RELAY_ARGS
# (more `serve` flags for both relays, e.g. RELAY_ARGS="--allow-clients
# 127.0.0.0/8 --allow-apps 127.0.0.1 --client-rate 100000/s" to measure
# the access checks; words split on spaces), PROXY (v1 or v2: the tunnel's
# `expose` asks for PROXY headers on its dial-ins, and its echo server, a
# second one, reads and drops them), KEEP=1 keeps the raw outputs.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
SECS=${SECS:-5}
RR_CONNS=${RR_CONNS:-100}
CHURN_THREADS=${CHURN_THREADS:-4}
BULK1=${BULK1:-$((1 << 30))}
BULK8=${BULK8:-$((128 << 20))}
IDLE=${IDLE:-8000}
BURST=${BURST:-1000}
BURST_BYTES=${BURST_BYTES:-$((4 << 20))}
PATHS=${PATHS:-direct relay tunnel bore rathole}
READY=${READY:-8}
# SPLICE=0: relays and expose copy through rings (--no-splice) instead of
# splice(2), the default.
NO_SPLICE=()
[ "${SPLICE:-1}" = 0 ] && NO_SPLICE=(--no-splice)
read -r -a EXTRA_RELAY_ARGS <<<"${RELAY_ARGS:-}"

# shellcheck source=benches/lib.sh
. benches/lib.sh
bench_begin compare

if ! command -v bore >/dev/null; then
    note "bore missing: cargo install bore-cli"
    cargo install --quiet bore-cli || note "bore-cli did not install; bore column skipped"
fi
if ! command -v rathole >/dev/null; then
    note "rathole missing: cargo install rathole (several minutes)"
    cargo install --quiet rathole || note "rathole did not install; rathole column skipped"
fi

# Pids, set by start.
echo_server="" relay1="" echo_app="" relay2="" expose="" bore_server="" bore_local=""
rathole_server="" rathole_client=""
declare -A ADDR PROC
start echo_server "$LOAD" echo-server --listen 127.0.0.1:0 --secs 900
ECHO_ADDR=$(first_line "$OUT/echo_server.out") || { note "echo server did not start"; exit 1; }
ECHO_PORT=${ECHO_ADDR##*:}
ADDR[direct]=$ECHO_ADDR
PROC[direct]=$echo_server

# Relay only: its own relay process, with the built-in echo app.
REG1=$("$LOAD" free-port)
start relay1 "$RELAY" --log-level warn serve --bind 127.0.0.1 --reg-port "$REG1" --relay-style random "${NO_SPLICE[@]}" "${EXTRA_RELAY_ARGS[@]}"
wait_port "$REG1" || { note "relay did not start"; exit 1; }
start echo_app "$RELAY" --log-level warn echo --relay "127.0.0.1:$REG1"
ADDR[relay]=$(first_line "$OUT/echo_app.out") || { note "echo app did not register"; exit 1; }
PROC[relay]="$relay1 $echo_app"

# Tunnel: a second relay, with `expose` forwarding to the echo server (with
# PROXY, to an echo server of its own that expects the headers).
TUNNEL_ECHO=$ECHO_ADDR
PROXY_ARGS=()
if [ -n "${PROXY:-}" ]; then
    start echo_proxy "$LOAD" echo-server --listen 127.0.0.1:0 --secs 900 --proxy-header
    TUNNEL_ECHO=$(first_line "$OUT/echo_proxy.out") || { note "echo server did not start"; exit 1; }
    PROXY_ARGS=(--proxy-protocol "$PROXY")
fi
REG2=$("$LOAD" free-port)
start relay2 "$RELAY" --log-level warn serve --bind 127.0.0.1 --reg-port "$REG2" --relay-style random "${NO_SPLICE[@]}" "${EXTRA_RELAY_ARGS[@]}"
wait_port "$REG2" || { note "relay did not start"; exit 1; }
start expose "$RELAY" --log-level warn expose --relay "127.0.0.1:$REG2" --local "$TUNNEL_ECHO" --no-reconnect --ready "$READY" "${NO_SPLICE[@]}" "${PROXY_ARGS[@]}"
ADDR[tunnel]=$(first_line "$OUT/expose.out") || { note "expose did not register"; exit 1; }
PROC[tunnel]="$relay2 $expose"

if command -v bore >/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
    start bore_server bore server --bind-addr 127.0.0.1
    wait_port 7835 || note "bore server did not start"
    BORE_PORT=$("$LOAD" free-port)
    start bore_local bore local "$ECHO_PORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$BORE_PORT"
    if wait_port "$BORE_PORT"; then
        ADDR[bore]=127.0.0.1:$BORE_PORT
        PROC[bore]="$bore_server $bore_local"
    else
        note "bore local did not open its port"
    fi
else
    note "bore unavailable (not installed, or port 7835 taken)"
fi

# rathole: a server with one service, a client forwarding it to the echo
# server; its control channel and the service on ports free right now.
if command -v rathole >/dev/null; then
    RH_CTRL=$("$LOAD" free-port)
    RH_PORT=$("$LOAD" free-port)
    cat >"$OUT/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$RH_CTRL"

[server.services.echo]
token = "compare-bench"
bind_addr = "127.0.0.1:$RH_PORT"
EOF
    cat >"$OUT/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$RH_CTRL"

[client.services.echo]
token = "compare-bench"
local_addr = "$ECHO_ADDR"
EOF
    start rathole_server env RUST_LOG=warn rathole --server "$OUT/rathole-server.toml"
    wait_port "$RH_CTRL" || note "rathole server did not start"
    start rathole_client env RUST_LOG=warn rathole --client "$OUT/rathole-client.toml"
    if wait_port "$RH_PORT"; then
        ADDR[rathole]=127.0.0.1:$RH_PORT
        PROC[rathole]="$rathole_server $rathole_client"
    else
        note "rathole did not open its service port"
    fi
else
    note "rathole unavailable (not installed)"
fi
note "echo ${ADDR[direct]}, relay ${ADDR[relay]}, tunnel ${ADDR[tunnel]}, bore ${ADDR[bore]:-n/a}," \
    "rathole ${ADDR[rathole]:-n/a}"

# Idle footprint before any load: the relays with their app registered.
"$LOAD" stat --pid "$relay1" --pid "$relay2" --secs 2 >"$OUT/stat_idle.out"
[ -n "${PROC[bore]:-}" ] && "$LOAD" stat --pid "$bore_server" --secs 2 >"$OUT/stat_bore.out"
[ -n "${PROC[rathole]:-}" ] && "$LOAD" stat --pid "$rathole_server" --secs 2 >"$OUT/stat_rathole.out"

# Reads key $3 of the first RESULT line that has it (and pid $4, if given)
# of run $1.$2.
value() {
    local file="$OUT/$1.$2.out" key=$3 pid=${4:-}
    [ -f "$file" ] || return 0
    grep "^RESULT.* $key=" "$file" | { if [ -n "$pid" ]; then grep " pid=$pid "; else cat; fi; } |
        head -1 | tr ' ' '\n' | sed -n "s/^$key=//p"
}

# Runs one load mode on every path, one after the other.
measure() {
    local name=$1
    shift
    for path in $PATHS; do
        [ -n "${ADDR[$path]:-}" ] || continue
        note "$name on $path"
        if ! "$LOAD" "$@" --addr "${ADDR[$path]}" >"$OUT/$name.$path.out" 2>&1; then
            note "$name on $path FAILED: $(tail -1 "$OUT/$name.$path.out")"
            echo "RESULT failed" >>"$OUT/$name.$path.out"
        fi
        sleep 1 # let the previous run's connections finish closing
    done
}

measure bulk1 bulk --streams 1 --bytes "$BULK1"
measure bulk8 bulk --streams 8 --bytes "$BULK8"
measure rr rr --conns "$RR_CONNS" --secs "$SECS" --size 64
measure rr1 rr --conns 1 --secs 3 --size 64
measure churn churn --conns "$CHURN_THREADS" --secs "$SECS"
# The processes of path $1 as --pid arguments, in the array PIDARGS.
pid_args() {
    PIDARGS=()
    for p in ${PROC[$1]}; do PIDARGS+=(--pid "$p"); done
}
if [ "$BURST" -gt 0 ]; then
    for path in $PATHS; do
        [ -n "${ADDR[$path]:-}" ] || continue
        pid_args "$path"
        note "burst $BURST x $BURST_BYTES B on $path"
        "$LOAD" burst --addr "${ADDR[$path]}" --clients "$BURST" --bytes "$BURST_BYTES" \
            --deadline-secs 60 "${PIDARGS[@]}" >"$OUT/burst.$path.out" 2>&1 || {
            note "burst on $path FAILED: $(tail -1 "$OUT/burst.$path.out")"
            echo "RESULT failed" >>"$OUT/burst.$path.out"
        }
        sleep 2 # the burst's connections finish closing
    done
fi
for path in $PATHS; do
    [ -n "${ADDR[$path]:-}" ] || continue
    pid_args "$path"
    note "idle $IDLE on $path"
    "$LOAD" idle --addr "${ADDR[$path]}" --conns "$IDLE" "${PIDARGS[@]}" >"$OUT/idle.$path.out" 2>&1 ||
        note "idle on $path FAILED: $(tail -1 "$OUT/idle.$path.out")"
    sleep 2
done
"$LOAD" stat --pid "$relay1" --pid "$relay2" --secs 2 >"$OUT/stat_after.out"

# ---- the table ---------------------------------------------------------------

# A row: label, then the value on each path, then tunnel/bore, tunnel/rathole
# and relay/direct (not for counts, with RATIOS=0).
row() {
    local label=$1 d=$2 r=$3 t=$4 b=$5 h=$6
    ratio() {
        awk -v a="$1" -v b="$2" -v on="${RATIOS:-1}" \
            'BEGIN { if (!on || a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'
    }
    printf '%-34s %10s %10s %10s %10s %10s %9s %9s %9s\n' "$label" "${d:--}" "${r:--}" "${t:--}" "${b:--}" \
        "${h:--}" "$(ratio "$t" "$b")" "$(ratio "$t" "$h")" "$(ratio "$r" "$d")"
}
# A row of one RESULT key of one run, on every path.
mrow() {
    row "$1" "$(value "$2" direct "$3")" "$(value "$2" relay "$3")" \
        "$(value "$2" tunnel "$3")" "$(value "$2" bore "$3")" "$(value "$2" rathole "$3")"
}
first_pid() { echo "${PROC[$1]:-}" | awk '{print $1}'; }
# shellcheck disable=SC2317 # called by name, through $which
second_pid() { echo "${PROC[$1]:-}" | awk '{print $2}'; }
# A row of one per-process RESULT key of run $2 (idle or burst): the server's
# (which=first_pid) or the agent's (second_pid; direct has none).
prow() {
    local label=$1 run=$2 key=$3 which=$4
    local d r t b h
    d=$(value "$run" direct "$key" "$(first_pid direct)")
    r=$(value "$run" relay "$key" "$($which relay)")
    t=$(value "$run" tunnel "$key" "$($which tunnel)")
    b=$(value "$run" bore "$key" "$($which bore)")
    h=$(value "$run" rathole "$key" "$($which rathole)")
    [ "$which" = second_pid ] && d=""
    row "$label" "$d" "$r" "$t" "$b" "$h"
}
statv() { grep "^RESULT stat pid=$2 " "$OUT/$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$3=//p"; }

echo
echo "tcp-relay comparison, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  direct ${ADDR[direct]}  relay ${ADDR[relay]}  tunnel ${ADDR[tunnel]}  bore ${ADDR[bore]:-n/a}" \
    " rathole ${ADDR[rathole]:-n/a}"
echo
printf '%-34s %10s %10s %10s %10s %10s %9s %9s %9s\n' measure direct relay tunnel bore rathole \
    tun/bore tun/rat rel/dir
mrow "bulk 1 stream, MiB/s up" bulk1 up_mib_s
mrow "bulk 1 stream, MiB/s echoed" bulk1 down_mib_s
mrow "bulk 8 streams, MiB/s up" bulk8 up_mib_s
mrow "bulk 8 streams, MiB/s echoed" bulk8 down_mib_s
mrow "rr ${RR_CONNS}x64B, req/s" rr req_per_s
mrow "rr p50, us" rr p50_us
mrow "rr p99, us" rr p99_us
mrow "rr p99.9, us" rr p999_us
mrow "rr 1 conn (unloaded) p50, us" rr1 p50_us
mrow "rr 1 conn (unloaded) p99, us" rr1 p99_us
mrow "churn ($CHURN_THREADS threads), conn/s" churn conn_per_s
mrow "churn p99, us" churn p99_us
if [ "$BURST" -gt 0 ]; then
    RATIOS=0 mrow "burst $BURST x $((BURST_BYTES >> 20)) MiB: clients lost" burst lost
    RATIOS=0 mrow "burst: clients failed" burst failed
    mrow "burst: MiB/s echoed" burst mib_s
    mrow "burst: client time p99, ms" burst p99_ms
    prow "burst: server RSS peak, KiB" burst peak_rss_kib first_pid
    prow "burst: agent RSS peak, KiB" burst peak_rss_kib second_pid
    RATIOS=0 mrow "burst: kernel TCP mem, % pressure" burst tcp_mem_peak_pct
    RATIOS=0 mrow "burst: accept queue overflows" burst listen_overflows
fi
prow "idle $IDLE: server RSS held, KiB" idle rss_held_kib first_pid
prow "idle $IDLE: server B/client" idle per_client_b first_pid
prow "idle $IDLE: agent B/client" idle per_client_b second_pid
prow "idle $IDLE: server CPU held, %" idle cpu_held_pct first_pid
echo
echo "server = echo server (direct), relay process (relay, tunnel), bore server (bore),"
echo "rathole server (rathole); agent = tcp-relay echo (relay), tcp-relay expose (tunnel),"
echo "bore local (bore), rathole client (rathole). burst: clients lost = reset, refused or"
echo "ended before their first echoed byte; RSS peak sampled every 10 ms, of processes"
echo "that already served the measures above (benches/burst.sh: fresh ones, repeated);"
echo "kernel TCP mem: system-wide peak in % of tcp_mem's pressure mark (at 100 % and"
echo "over, loopback drops segments and every path stalls and loses clients alike)."
echo "idle relay RSS, app registered, before load: relay-only $(statv stat_idle.out "$relay1" rss_kib) KiB" \
    "(CPU $(statv stat_idle.out "$relay1" cpu_pct) %), tunnel relay $(statv stat_idle.out "$relay2" rss_kib) KiB" \
    "(CPU $(statv stat_idle.out "$relay2" cpu_pct) %); bore server ${bore_server:+$(statv stat_bore.out "$bore_server" rss_kib)} KiB;" \
    "rathole server ${rathole_server:+$(statv stat_rathole.out "$rathole_server" rss_kib)} KiB"
echo "relay RSS after all runs: relay-only $(statv stat_after.out "$relay1" rss_kib) KiB," \
    "tunnel relay $(statv stat_after.out "$relay2" rss_kib) KiB"
failed=$(grep -l '^RESULT failed' "$OUT"/*.out 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
[ -n "$failed" ] && echo "FAILED runs: $failed"
exit 0
