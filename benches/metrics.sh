#!/usr/bin/env bash
# What the status endpoint costs (issue 12): two relays side by side, one
# without --metrics and one with it, each with the built-in echo app; the
# load tool's bulk and rr runs alternate between them RUNS times while a
# scraper fetches /metrics (and /status) from the second once a second.
# Prints each run's figures (which relay goes first alternates), the
# medians and their ratio (on/off), and the idle RSS of both relays after
# the runs (the one with --metrics after being scraped all along).
#
# Knobs (environment): RUNS (5), BULK (bytes each way, 1 stream, 512 MiB),
# SECS (rr duration, 5), RR_CONNS (100), SCRAPE_EVERY (seconds, 1).
# Everything listens on 127.0.0.1 on ports picked free at run time; every
# process started here is stopped on exit.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
RUNS=${RUNS:-5}
BULK=${BULK:-$((512 << 20))}
SECS=${SECS:-5}
RR_CONNS=${RR_CONNS:-100}
SCRAPE_EVERY=${SCRAPE_EVERY:-1}

# shellcheck source=benches/lib.sh
. benches/lib.sh
bench_begin metrics

# relay_with_echo NAME ARGS...: a relay with the echo app; sets ADDR_NAME
# and PID_NAME.
relay_with_echo() {
    local name=$1 reg
    shift
    reg=$("$LOAD" free-port)
    "$RELAY" --log-level warn serve --bind 127.0.0.1 --reg-port "$reg" --relay-style random "$@" \
        >"$OUT/$name.relay.out" 2>&1 &
    PIDS+=("$!")
    printf -v "PID_$name" '%s' "$!"
    wait_port "$reg" || { note "relay $name did not start"; exit 1; }
    "$RELAY" --log-level warn echo --relay "127.0.0.1:$reg" >"$OUT/$name.echo.out" 2>&1 &
    PIDS+=("$!")
    printf -v "ADDR_$name" '%s' "$(first_line "$OUT/$name.echo.out")" ||
        { note "echo app $name did not register"; exit 1; }
}

METRICS_PORT=$("$LOAD" free-port)
relay_with_echo off
relay_with_echo on --metrics "127.0.0.1:$METRICS_PORT"
# shellcheck disable=SC2154 # set by start through printf -v
note "off ${ADDR_off}, on ${ADDR_on} (metrics on 127.0.0.1:$METRICS_PORT)"

# One HTTP/1.1 GET of $1 from the status endpoint, over bash's /dev/tcp.
scrape() {
    exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' "$1" >&3
    cat <&3 >/dev/null
    exec 3<&-
}
(
    while true; do
        scrape /metrics && scrape /status
        sleep "$SCRAPE_EVERY"
    done
) &
SCRAPER=$!
PIDS+=("$SCRAPER")

key() { tr ' ' '\n' <"$1" | sed -n "s/^$2=//p" | head -1; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

for run in $(seq "$RUNS"); do
    # Which relay goes first alternates, so that drift within a pair (a
    # warmer cache, a neighbour's job) favours neither.
    order="off on"
    [ $((run % 2)) = 0 ] && order="on off"
    for side in $order; do
        addr_var=ADDR_$side
        "$LOAD" bulk --addr "${!addr_var}" --streams 1 --bytes "$BULK" | grep '^RESULT' >"$OUT/bulk.$side.$run"
        "$LOAD" rr --addr "${!addr_var}" --conns "$RR_CONNS" --secs "$SECS" --size 64 |
            grep '^RESULT' >"$OUT/rr.$side.$run"
        printf 'run %d %-3s bulk %6s MiB/s  rr %8s req/s  p99 %7s us\n' "$run" "$side" \
            "$(key "$OUT/bulk.$side.$run" up_mib_s)" "$(key "$OUT/rr.$side.$run" req_per_s)" \
            "$(key "$OUT/rr.$side.$run" p99_us)"
        sleep 1
    done
done
kill "$SCRAPER" 2>/dev/null
scrapes_ok=$(scrape /metrics && echo yes || echo no)

echo
printf '%-22s %12s %12s %8s\n' measure off on on/off
for m in "bulk up_mib_s" "rr req_per_s" "rr p99_us"; do
    read -r mode k <<<"$m"
    off=$(for r in $(seq "$RUNS"); do key "$OUT/$mode.off.$r" "$k"; done | median)
    on=$(for r in $(seq "$RUNS"); do key "$OUT/$mode.on.$r" "$k"; done | median)
    printf '%-22s %12s %12s %8s\n' "$mode $k (median)" "$off" "$on" \
        "$(awk -v a="$on" -v b="$off" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "-" }')"
done
# shellcheck disable=SC2154 # set by start through printf -v
"$LOAD" stat --pid "$PID_off" --pid "$PID_on" --secs 2 | grep '^RESULT' |
    sed "s/pid=$PID_off/relay=off/; s/pid=$PID_on/relay=on(--metrics)/"
echo "endpoint still answering after the runs: $scrapes_ok"
