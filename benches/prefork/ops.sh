#!/usr/bin/env bash
# Operations, tower-exit prefork vs gunicorn (sync workers), same machine,
# loopback only, same load generator (wrk, a new connection per request):
#
# - reload: SIGHUP under load; time until every old worker is gone, and
#   failed requests (socket errors + non-2xx) in the load run around it;
# - upgrade: SIGUSR2 under load; tower-exit: until the old master exits by
#   itself; gunicorn: its documented procedure (USR2, then TERM to the old
#   master once the new master's workers run); failed requests;
# - recycle latency: `--workers 1 --max-requests 1`, one client, one request
#   at a time: each request needs a fresh worker (fork to first accept,
#   plus one request);
# - throughput with an exact `max_requests 1`, 2 workers, 32 connections.
#
#   benches/prefork/ops.sh            # installs wrk and gunicorn if missing
set -euo pipefail
cd "$(dirname "$0")/../.."

. benches/prefork/common.sh
children() { pgrep -P "$1" | sort || true; }
now() { date +%s.%N; }
# wrk: requests/s and failed requests (socket errors + non-2xx).
wrk_run() {
    local out
    out=$(wrk -t2 -c"$3" -d"$2" -H "Connection: close" "http://127.0.0.1:$1/" 2>&1)
    local rps non2xx errs
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    errs=$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' <<<"$out")
    echo "$rps $(( ${non2xx:-0} + ${errs:-0} ))"
}
# Waits until none of the pids in "$1" is alive; prints how long it took.
wait_gone() {
    local start=$2
    while true; do
        local left=0
        for pid in $1; do [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)" != Z ] && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.005
    done
    python3 -c "print(f'{($(now) - $start) * 1000:.0f}')"
}

start_ours() { RUST_LOG=warn target/release/examples/prefork --listen "127.0.0.1:$1" "${@:2}" >/dev/null 2>/tmp/ops-ours.log & echo $!; }
start_theirs() {
    gunicorn --chdir "$PWD/benches/prefork" -k sync -b "127.0.0.1:$1" --log-level warning "${@:2}" hello:app >/dev/null 2>/tmp/ops-theirs.log &
    echo $!
}
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

reload() { # $1 master pid, $2 port; prints "ms failed"
    sleep 1
    local old; old=$(children "$1")
    wrk_run "$2" 4s 16 >/tmp/ops-wrk & local w=$!
    sleep 1
    local t0; t0=$(now)
    kill -HUP "$1"
    local ms; ms=$(wait_gone "$old" "$t0")
    wait $w
    echo "$ms $(awk '{print $2}' /tmp/ops-wrk)"
}

echo "| measure | tower-exit prefork | gunicorn 27 sync |"
echo "|---|---:|---:|"

# ONLY=reload|upgrade|latency|throughput runs one section.
want() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }

# Reload.
if want reload; then
port=$(free_port); pid=$(start_ours "$port" --workers 2); wait_port "$port"
read -r ours_ms ours_failed < <(reload "$pid" "$port"); stop "$pid"
port=$(free_port); pid=$(start_theirs "$port" -w 2); wait_port "$port"
read -r theirs_ms theirs_failed < <(reload "$pid" "$port"); stop "$pid"
echo "| SIGHUP: old workers gone after (ms) | $ours_ms | $theirs_ms |"
echo "| SIGHUP: failed requests under load | $ours_failed | $theirs_failed |"
fi

# Upgrade.
if want upgrade; then
port=$(free_port); pid=$(start_ours "$port" --workers 2); wait_port "$port"; sleep 1
wrk_run "$port" 4s 16 >/tmp/ops-wrk & w=$!
sleep 1; t0=$(now); kill -USR2 "$pid"
while [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' /proc/$pid/stat)" != Z ]; do sleep 0.005; done
ours_ms=$(python3 -c "print(f'{($(now) - $t0) * 1000:.0f}')")
wait $w; ours_failed=$(awk '{print $2}' /tmp/ops-wrk)
wait "$pid" 2>/dev/null || true
newpid=$(pgrep -f "examples/prefork --listen 127.0.0.1:$port" | head -1); stop "${newpid:-0}"; sleep 0.5

port=$(free_port); pid=$(start_theirs "$port" -w 2); wait_port "$port"; sleep 1
wrk_run "$port" 4s 16 >/tmp/ops-wrk & w=$!
sleep 1; t0=$(now); kill -USR2 "$pid"
# gunicorn's new master is a child of the old one; once it has its workers,
# the operator sends TERM to the old master.
newmaster=""
deadline=$(( $(date +%s) + 20 ))
while [ -z "$newmaster" ] && [ "$(date +%s)" -lt "$deadline" ]; do
    for c in $(children "$pid"); do [ -n "$(children "$c")" ] && [ "$(children "$c" | wc -l)" -ge 2 ] && newmaster=$c; done
    sleep 0.005
done
kill -TERM "$pid"
while [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' /proc/$pid/stat)" != Z ]; do sleep 0.005; done
theirs_ms=$(python3 -c "print(f'{($(now) - $t0) * 1000:.0f}')")
wait $w; theirs_failed=$(awk '{print $2}' /tmp/ops-wrk)
wait "$pid" 2>/dev/null || true; stop "$newmaster"; sleep 0.5
echo "| SIGUSR2: old master gone after (ms) | $ours_ms | $theirs_ms (USR2, then TERM by hand once the new workers run) |"
echo "| SIGUSR2: failed requests under load | $ours_failed | $theirs_failed |"
fi

# Recycle latency: one client, one request at a time, a fresh worker each.
latency() { # $1 port; prints the mean ms per request over 200 requests
    python3 - "$1" <<'PY'
import socket, sys, time
port = int(sys.argv[1]); n = 200
t0 = time.monotonic()
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    while s.recv(4096): pass
    s.close()
print(f"{(time.monotonic() - t0) / n * 1000:.2f}")
PY
}
if want latency; then
port=$(free_port); pid=$(start_ours "$port" --workers 1 --max-requests 1); wait_port "$port"
ours_lat=$(latency "$port"); stop "$pid"
port=$(free_port); pid=$(start_theirs "$port" -w 1 --max-requests 1); wait_port "$port"
theirs_lat=$(latency "$port"); stop "$pid"
echo "| max_requests 1, 1 worker, one request at a time: ms per request (a fork each) | $ours_lat | $theirs_lat |"
fi

# Throughput with an exact max_requests 1.
if want throughput; then
port=$(free_port); pid=$(start_ours "$port" --workers 2 --max-requests 1); wait_port "$port"
read -r ours_rps ours_failed < <(wrk_run "$port" 10s 32); stop "$pid"
port=$(free_port); pid=$(start_theirs "$port" -w 2 --max-requests 1); wait_port "$port"
read -r theirs_rps theirs_failed < <(wrk_run "$port" 10s 32); stop "$pid"
echo "| max_requests 1, 2 workers, 32 connections: req/s (failed) | $ours_rps ($ours_failed) | $theirs_rps ($theirs_failed) |"
fi
