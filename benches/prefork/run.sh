#!/usr/bin/env bash
# tower-exit prefork vs gunicorn (sync workers, max_requests), same route,
# same load generator (wrk), same run, loopback only. Each server gets
# WORKERS workers and recycles them every 1 and every 1,000 requests.
#
#   benches/prefork/run.sh            # 10 s per measurement
#   DURATION=30s benches/prefork/run.sh
#
# Prints one table line per setting: requests/s of each and the ratio. Two
# client modes: `close` (a new connection per request, as gunicorn's sync
# workers serve anyway: the headline) and `keep-alive` (wrk's default).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10s}
WORKERS=${WORKERS:-2}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}

. benches/prefork/common.sh

# wrk's "Requests/sec" and its error/non-2xx counts.
load() {
    local out
    local header=()
    if [ "$2" = close ]; then header=(-H "Connection: close"); fi
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" "${header[@]}" "http://127.0.0.1:$1/")
    local rps errors non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    errors=$(awk '/Socket errors/ {print $0}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "$rps|${non2xx:-0}|${errors:-none}"
}

stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

echo "| client | max_requests | tower-exit prefork req/s | gunicorn sync req/s | ratio | notes |"
echo "|---|---:|---:|---:|---:|---|"
for mode in close keep-alive; do
for max in 1 1000; do
    port=$(free_port)
    RUST_LOG=warn target/release/examples/prefork --listen "127.0.0.1:$port" --workers "$WORKERS" --max-requests "$max" >/dev/null 2>/tmp/prefork-bench.log &
    ours_pid=$!
    wait_port "$port"
    IFS='|' read -r ours ours_non2xx ours_errors < <(load "$port" "$mode")
    stop "$ours_pid"

    port=$(free_port)
    gunicorn --chdir benches/prefork -w "$WORKERS" -k sync --max-requests "$max" \
        -b "127.0.0.1:$port" --log-level warning hello:app 2>/tmp/gunicorn-bench.log &
    theirs_pid=$!
    wait_port "$port"
    IFS='|' read -r theirs theirs_non2xx theirs_errors < <(load "$port" "$mode")
    stop "$theirs_pid"

    ratio=$(python3 -c "print(f'{float(\"$ours\") / max(float(\"$theirs\"), 1e-9):.1f}')")
    echo "| $mode | $max | $ours | $theirs | ${ratio}x | non-2xx: $ours_non2xx / $theirs_non2xx; ${ours_errors# } / ${theirs_errors# } |"
done
done
