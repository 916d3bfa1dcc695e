# shellcheck shell=bash
# What benches/compare.sh, burst.sh and metrics.sh share; sourced, not run.
# `bench_begin NAME` makes the output directory ($OUT), the list of started
# processes ($PIDS, all stopped on exit), `note`, and builds the release
# binaries ($RELAY, $LOAD).

# Starts everything for a script named $1: a temp dir, the exit trap, the
# build. KEEP=1 keeps the raw outputs.
bench_begin() {
    BENCH=$1
    OUT=$(mktemp -d "/tmp/relay-$BENCH.XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    note "building (release)"
    cargo build --release --quiet --bin tcp-relay --example load || exit 1
    local target=${CARGO_TARGET_DIR:-target}/release
    # shellcheck disable=SC2034 # RELAY and LOAD are for the sourcing script
    RELAY=$target/tcp-relay LOAD=$target/examples/load
}

# shellcheck disable=SC2317 # reached through the trap
bench_cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "raw outputs kept in $OUT" >&2; else rm -rf "$OUT"; fi
}

note() { echo "$BENCH: $*" >&2; }

# Starts a background process with its stdout in $OUT/$1.out and stderr in
# $OUT/$1.err; its pid lands in the variable named $1 and in PIDS. The files
# are emptied here first: the background job's own redirection happens when
# it gets to run, and until then a reader would see an earlier run's lines.
start() {
    local name=$1
    shift
    : >"$OUT/$name.out"
    "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" &
    PIDS+=("$!")
    printf -v "$name" '%s' "$!"
}

# First line of a file once it has one (a process printing its address).
first_line() {
    for _ in $(seq 100); do
        [ -s "$1" ] && { head -1 "$1"; return 0; }
        sleep 0.1
    done
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits until something accepts on 127.0.0.1:$1 (10 s at most).
wait_port() {
    for _ in $(seq 100); do
        port_open "$1" && return 0
        sleep 0.1
    done
    return 1
}
