#!/usr/bin/env bash
# benches/nginx_pool.rs: the reliability suite's nginx keep-alive pool run
# (2 workers at max_requests 50, SIGHUP every 2 s, 8 clients, 50,000 GETs
# and POSTs) against tower-exit's FastCGI and HTTP prefork and gunicorn's
# sync and gthread workers behind the same nginx. Installs nginx and
# gunicorn when missing. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq nginx
fi
if ! command -v gunicorn >/dev/null; then
    python3 -m pip install -q gunicorn || python3 -m pip install -q --break-system-packages gunicorn
fi
cargo build -q --release --all-features --examples
cargo bench -q --all-features --bench nginx_pool
