#!/usr/bin/env bash
# Issue 9's scenario, RUNS times on each path: CLIENTS clients connect at
# once and each streams BYTES full duplex through a tunnel to an echo server
# (`load burst`: every byte echoed and checked). Prints a table per run and a
# summary: clients lost (reset or ended before their first echoed byte),
# failed (cut off later), MiB/s echoed, and the peak RSS of the server and of
# the agent process.
#
#   tunnel        `tcp-relay serve --bind 127.0.0.1` + `tcp-relay expose --local <echo>`
#                 (the user's exact flags, no --ready), CLIENTS clients
#   tunnel-ready  the same with `expose --ready $READY`, CLIENTS_BIG clients
#   bore          `bore server` + `bore local`, CLIENTS and CLIENTS_BIG clients
#   rathole       rathole server + client (TOML written here), both counts
#
# Every case starts its own echo server, server and agent, all on loopback
# ports picked free at run time (bore's control port is fixed at 7835, which
# must be free), and stops them after its run, so each run sees processes as
# fresh as the user's; every process started here is stopped on exit. bore
# and rathole are installed with `cargo install bore-cli` / `cargo install
# rathole` when missing (rathole builds for several minutes); a path that
# cannot start reads n/a.
#
# Read the tcpmem column first. 4 MiB in flight per client over three TCP
# hops is more socket memory than a small machine's tcp_mem allows: on a
# 24 GB machine (tcp_mem pressure mark 1.5 GB) 1,000 such clients take
# the kernel over it on every path, loopback then drops segments, RTOs back
# off for seconds and bore and rathole lose clients too. BYTES=1048576
# keeps 1,000 clients under it. On 2 cores a run takes about 4 minutes with
# the defaults (over the mark; a case ends at DEADLINE), so 5 runs take
# about 20; with BYTES=1048576 a run takes about 40 s.
#
# Knobs (environment): RUNS (5), CLIENTS (1000), CLIENTS_BIG (2000), BYTES
# (each way per client, 4 MiB), READY (8), PATHS (subset of "tunnel
# tunnel-ready bore rathole"), CASES (overrides both: "path:clients ...",
# e.g. "tunnel:1000 tunnel-ready:1000"), RAMP (seconds to spread the
# connects over, 0), IO_TIMEOUT (seconds one read or write may block, 10),
# DEADLINE (seconds after which a case's unfinished
# clients are cut off and counted, 60), RELAY_ARGS (more `serve` flags,
# e.g. "--max-waiting 1024"; words split on spaces), KEEP=1 keeps the raw
# outputs.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
RUNS=${RUNS:-5}
CLIENTS=${CLIENTS:-1000}
CLIENTS_BIG=${CLIENTS_BIG:-2000}
BYTES=${BYTES:-$((4 << 20))}
READY=${READY:-8}
read -r -a EXTRA_RELAY_ARGS <<<"${RELAY_ARGS:-}"
PATHS=${PATHS:-tunnel tunnel-ready bore rathole}
RAMP=${RAMP:-0}
DEADLINE=${DEADLINE:-60}
IO_TIMEOUT=${IO_TIMEOUT:-10}
if [ -z "${CASES:-}" ]; then
    CASES=""
    for path in $PATHS; do
        case $path in
            tunnel) CASES+=" tunnel:$CLIENTS" ;;
            tunnel-ready) CASES+=" tunnel-ready:$CLIENTS_BIG" ;;
            *) CASES+=" $path:$CLIENTS $path:$CLIENTS_BIG" ;;
        esac
    done
fi

# shellcheck source=benches/lib.sh
. benches/lib.sh
bench_begin burst

case " $CASES " in *" bore:"*)
    command -v bore >/dev/null || { note "bore missing: cargo install bore-cli"; cargo install --quiet bore-cli; } ;;
esac
case " $CASES " in *" rathole:"*)
    command -v rathole >/dev/null || { note "rathole missing: cargo install rathole"; cargo install --quiet rathole; } ;;
esac

# Stops every process started so far and waits for them to be gone (so the
# next case can bind bore's fixed port, and sees an unloaded machine).
stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    PIDS=()
}


server="" agent="" # pids, set by start

# Starts one path in front of the echo server on port $2: sets ADDR (the
# clients' target), SERVER and AGENT (the pids whose RSS is sampled).
# Returns non-zero when the path cannot start.
start_path() {
    local path=$1 echo_port=$2 reg port ctrl
    case $path in
        tunnel | tunnel-ready)
            local ready=()
            [ "$path" = tunnel-ready ] && ready=(--ready "$READY")
            reg=$("$LOAD" free-port)
            start server "$RELAY" --log-level warn serve --bind 127.0.0.1 --reg-port "$reg" "${EXTRA_RELAY_ARGS[@]}"
            wait_port "$reg" || return 1
            start agent "$RELAY" --log-level warn expose --relay "127.0.0.1:$reg" \
                --local "127.0.0.1:$echo_port" "${ready[@]}"
            ADDR=$(first_line "$OUT/agent.out") || return 1
            ;;
        bore)
            command -v bore >/dev/null || return 1
            port_open 7835 && { note "port 7835 taken: no bore"; return 1; }
            start server bore server --bind-addr 127.0.0.1
            wait_port 7835 || return 1
            port=$("$LOAD" free-port)
            start agent bore local "$echo_port" --local-host 127.0.0.1 --to 127.0.0.1 --port "$port"
            wait_port "$port" || return 1
            ADDR=127.0.0.1:$port
            ;;
        rathole)
            command -v rathole >/dev/null || return 1
            ctrl=$("$LOAD" free-port)
            port=$("$LOAD" free-port)
            write_rathole_config "$ctrl" "$port" "$echo_port"
            start server env RUST_LOG=warn rathole --server "$OUT/rathole-server.toml"
            wait_port "$ctrl" || return 1
            start agent env RUST_LOG=warn rathole --client "$OUT/rathole-client.toml"
            wait_port "$port" || return 1
            ADDR=127.0.0.1:$port
            ;;
        *)
            note "unknown path $path"
            return 1
            ;;
    esac
    SERVER=$server
    AGENT=$agent
}

# rathole's two configuration files: control channel on $1, the service
# published on $2, forwarded to the echo server on $3. Plain TCP transport
# (rathole's default), as bore's and tcp-relay's.
write_rathole_config() {
    cat >"$OUT/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$1"

[server.services.echo]
token = "burst-bench"
bind_addr = "127.0.0.1:$2"
EOF
    cat >"$OUT/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$1"

[client.services.echo]
token = "burst-bench"
local_addr = "127.0.0.1:$3"
EOF
}

# Reads key $2 of the first RESULT line of file $1 that starts with $3.
value() {
    grep "^RESULT $3" "$1" 2>/dev/null | head -1 | tr ' ' '\n' | sed -n "s/^$2=//p"
}

# The peak RSS of pid $2 in file $1, in KiB: the higher of the sampled VmRSS
# and VmHWM (the process is fresh, so its VmHWM is this run's peak, including
# spikes between samples).
peak_kib() {
    local sampled hwm
    sampled=$(value "$1" peak_rss_kib "burst_rss pid=$2 ")
    hwm=$(value "$1" hwm_kib "burst_rss pid=$2 ")
    awk -v s="$sampled" -v h="$hwm" 'BEGIN { if (s == "") print ""; else print (h ~ /^[0-9]+$/ && h + 0 > s + 0) ? h : s }'
}

mib_of() { awk -v k="$1" 'BEGIN { if (k == "") print "n/a"; else printf "%.1f", k / 1024 }'; }

RESULTS=$OUT/results # one line per case and run, for the summary
# A row of the per-run table.
row() { printf '%-13s %7s %7s %6s %6s %5s %6s %7s %8s %8s %6s %7s\n' "$@"; }

# One case of one run: fresh echo server, path, burst; prints its row.
run_case() {
    local run=$1 path=$2 clients=$3 file="$OUT/run$1.$2.$3.out" echo_addr
    start echo_server "$LOAD" echo-server --listen 127.0.0.1:0 --secs 900
    echo_addr=$(first_line "$OUT/echo_server.out") || { note "echo server did not start"; exit 1; }
    if ! start_path "$path" "${echo_addr##*:}"; then
        note "$path did not start; see $OUT (KEEP=1)"
        row "$path" "$clients" n/a n/a n/a n/a n/a n/a n/a n/a n/a n/a
        stop_all
        return
    fi
    note "run $run: $path, $clients clients x $BYTES B at $ADDR"
    "$LOAD" burst --addr "$ADDR" --clients "$clients" --bytes "$BYTES" --ramp-secs "$RAMP" \
        --deadline-secs "$DEADLINE" --io-timeout-secs "$IO_TIMEOUT" \
        --pid "$SERVER" --pid "$AGENT" >"$file" 2>&1
    stop_all
    local v k
    declare -A v
    for k in served lost failed cut_at_deadline mib_s secs; do v[$k]=$(value "$file" "$k" "burst "); done
    for k in tcp_mem_peak_pct listen_overflows; do v[$k]=$(value "$file" "$k" "burst_kernel "); done
    v[srv]=$(peak_kib "$file" "$SERVER")
    v[agt]=$(peak_kib "$file" "$AGENT")
    [ -n "${v[served]}" ] || note "$path: no result: $(tail -1 "$file")"
    row "$path" "$clients" "${v[served]:-n/a}" "${v[lost]:-n/a}" "${v[failed]:-n/a}" \
        "${v[cut_at_deadline]:-n/a}" "${v[mib_s]:-n/a}" "${v[secs]:-n/a}" "$(mib_of "${v[srv]}")" \
        "$(mib_of "${v[agt]}")" "${v[tcp_mem_peak_pct]:-?}%" "${v[listen_overflows]:-?}"
    [ -n "${v[served]}" ] && echo "$path $clients ${v[lost]} ${v[failed]} ${v[mib_s]} ${v[srv]:-0}" \
        "${v[agt]:-0} ${v[tcp_mem_peak_pct]:-0}" >>"$RESULTS"
    if [ "${v[lost]:-0}" != 0 ] || [ "${v[failed]:-0}" != 0 ]; then
        grep -E '^  (lost by cause|client )' "$file" | head -2 | sed 's/^/    /'
    fi
    sleep 1 # let the closed connections' last segments go
}

echo "burst: $BYTES B each way per client; cases:$CASES; $RUNS runs; $(nproc) cores;" \
    "tcp_mem $(tr '\t' ' ' </proc/sys/net/ipv4/tcp_mem) pages"
for run in $(seq "$RUNS"); do
    echo
    echo "run $run/$RUNS, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
    row path clients served lost failed cut MiB/s secs "srv MiB" "agt MiB" tcpmem lstnovf
    for c in $CASES; do
        run_case "$run" "${c%%:*}" "${c##*:}"
    done
done

# ---- the summary -------------------------------------------------------------

echo
echo "summary over $RUNS runs: runs that lost clients; lost and failed clients (total,"
echo "and min-max per run); MiB/s, peak RSS and kernel TCP memory: median (min-max)"
SFMT='%-13s %7s %5s %16s %6s %15s %18s %18s %14s\n'
# shellcheck disable=SC2059 # the format is ours
printf "$SFMT" path clients lossy lost failed MiB/s "server MiB" "agent MiB" "tcpmem %"
for c in $CASES; do
    awk -v path="${c%%:*}" -v clients="${c##*:}" -v fmt="$SFMT" '
        function sort(a, n,   i, j, t) {
            for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        }
        function span(a, n, scale, f,   m) {
            sort(a, n)
            m = n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            return sprintf(f " (" f "-" f ")", m / scale, a[1] / scale, a[n] / scale)
        }
        $1 == path && $2 == clients {
            n++; lost += $3; failed += $4; lossy += ($3 > 0)
            l[n] = $3; r[n] = $5; s[n] = $6; g[n] = $7; k[n] = $8
        }
        END {
            if (n == 0) { printf fmt, path, clients, "n/a", "", "", "", "", "", ""; exit }
            sort(l, n)
            printf fmt, path, clients, lossy "/" n, lost " (" l[1] "-" l[n] ")", failed,
                span(r, n, 1, "%.0f"), span(s, n, 1024, "%.1f"), span(g, n, 1024, "%.1f"), span(k, n, 1, "%.0f")
        }' "$RESULTS" 2>/dev/null
done
echo
echo "lost: reset, refused or ended before the first echoed byte (a connect may"
echo "retry SYNs for 30 s before it counts); failed: cut off after some bytes (a"
echo "read or write blocked ${IO_TIMEOUT} s, or the ${DEADLINE} s deadline: column cut), wrong"
echo "bytes, or no end of stream after the echo. MiB/s: bytes echoed by all clients"
echo "over the wall time from release to the last client's end. srv/agt: peak RSS"
echo "(the higher of sampled VmRSS and VmHWM) of server (relay, bore server, rathole"
echo "server) and agent (tcp-relay expose, bore local, rathole client). tcpmem: the"
echo "kernel's peak TCP memory, system-wide, in % of tcp_mem's pressure mark: at 100 %"
echo "and over, loopback drops segments and every path stalls and loses clients"
echo "alike; lstnovf: accept-queue overflows (SYNs or handshake ACKs dropped)."
exit 0
