#!/usr/bin/env bash
# Does the HTTP demo leak per client hang-up? Starts it, then 6 times: 1,000
# hang-ups (8 clients, each sending /slow and closing after 5 ms), and prints
# its resident memory and open file descriptors. Loopback only; stops by
# itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example http
port=${PORT:-18082}
target/release/examples/http --listen "127.0.0.1:$port" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
sleep 0.5
status() { echo "$1: RSS $(awk '/VmRSS/ {print $2}' /proc/$pid/status) KiB, $(ls /proc/$pid/fd | wc -l) fds"; }
status "idle"
for round in 1 2 3 4 5 6; do
    python3 - "$port" <<'PY'
import socket, sys, threading, time
port = int(sys.argv[1])
def client():
    for _ in range(125):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(0.005)
        s.close()
threads = [threading.Thread(target=client) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
PY
    sleep 1.2 # the last /slow requests end (1 s)
    status "after $((round * 1000)) hang-ups"
done
