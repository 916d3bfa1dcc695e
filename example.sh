#!/usr/bin/env bash
# The original relay's demo, with this binary: a relay, two echo apps, and a
# client (nc) on each app's relayed port.
#
#   ./example.sh                 registration port 8080 (relayed ports 8081, 8082)
#   REG_PORT=9000 ./example.sh   another registration port
#
# Needs netcat-openbsd (`nc -N`). Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")"

REG_PORT="${REG_PORT:-8080}"
HOST=127.0.0.1
BIN=target/release/tcp-relay

cargo build --release --quiet

LOGS="$(mktemp -d)"
PIDS=()
cleanup() {
    # Apps first, then the relay; each by the pid we started it with.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$LOGS"
}
trap cleanup EXIT

# wait_for LOG PATTERN PID: until LOG has a line matching PATTERN (at most
# 10 s), failing early if process PID has exited.
wait_for() {
    local log=$1 pattern=$2 pid=$3
    for _ in $(seq 100); do
        grep -q "$pattern" "$log" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid exited early; its log:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "timed out waiting for '$pattern' in $log" >&2
    cat "$log" >&2
    return 1
}

echo "== relay: $BIN serve --bind $HOST --reg-port $REG_PORT"
"$BIN" serve --bind "$HOST" --reg-port "$REG_PORT" >"$LOGS/relay.log" 2>&1 &
PIDS+=($!)
# The relay logs this line once its registration port is bound.
wait_for "$LOGS/relay.log" "listening for apps" "${PIDS[-1]}"

PORTS=()
for app in 1 2; do
    echo "== echo app $app: $BIN echo --relay $HOST:$REG_PORT"
    "$BIN" echo --relay "$HOST:$REG_PORT" >"$LOGS/app$app.log" 2>&1 &
    PIDS+=($!)
    wait_for "$LOGS/app$app.log" "relayed port [0-9]" "${PIDS[-1]}"
    port="$(sed -n 's/.*relayed port \([0-9][0-9]*\).*/\1/p' "$LOGS/app$app.log" | head -n 1)"
    echo "   app $app is reachable on relayed port $port"
    PORTS+=("$port")
done

for app in 1 2; do
    port="${PORTS[app - 1]}"
    line="hello app $app, via relayed port $port"
    echo "== client: echo '$line' | nc -N $HOST $port"
    # -N: shut our write half at end of input; the relay carries that
    # half-close to the app, which echoes everything and then closes.
    reply="$(printf '%s\n' "$line" | nc -N -w 5 "$HOST" "$port")"
    echo "   reply: $reply"
    if [[ "$reply" != "$line" ]]; then
        echo "unexpected reply" >&2
        exit 1
    fi
done

echo "== what the relay logged"
cat "$LOGS/relay.log"
