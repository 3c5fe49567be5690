# What benches/prefork/run.sh and ops.sh share: wrk and gunicorn installed
# when missing, the prefork demo built for release, a free loopback port,
# and a wait until a port accepts. Sourced from the repository root.

need() { command -v "$1" >/dev/null; }
if ! need wrk; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq wrk
fi
if ! need gunicorn; then
    python3 -m pip install -q gunicorn
fi
cargo build -q --release --example prefork

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
# Up to 10 s.
wait_port() { for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
