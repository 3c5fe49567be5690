#!/usr/bin/env bash
# End-to-end HTTP: the full exit-aware stack vs bare hyper, loaded by wrk
# from a second process on loopback. Installs wrk when missing.
#   benches/http/run.sh                 # 3 rounds of 5 s each
#   DURATION=10s ROUNDS=5 benches/http/run.sh
#   RATE=20000 CONNECTIONS=16 benches/http/run.sh   # fixed rate, with oha
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v wrk >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq wrk
fi
if [ -n "${RATE:-}" ] && ! command -v oha >/dev/null; then
    cargo install oha --locked
fi
cargo bench --bench http_e2e
