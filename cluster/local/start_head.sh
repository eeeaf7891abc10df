#!/usr/bin/env bash
# Start a local Ray head for development and tests: dashboard (job submission) on loopback,
# token auth (Ray >= 2.59 default for local clusters).
#
#   cluster/local/start_head.sh [extra `ray start` flags, e.g. --num-gpus 1 --object-store-memory N]
#
# Environment (all optional):
#   RAY_PORT                     GCS port                          (default 6379)
#   DASHBOARD_PORT               dashboard + job submission API    (default 8265)
#   DASHBOARD_AGENT_LISTEN_PORT  the node agent's HTTP port        (default 52365, Ray's)
#   RAY_CLIENT_SERVER_PORT       ray:// client server              (default 10001, Ray's)
#   RAY_NUM_CPUS                 logical CPUs (default max(4, nproc): some Ray Data operators
#                                reserve a whole CPU and stall on a 2-CPU node)
#   RAY_TMPDIR                   Ray's own variable: its files go to $RAY_TMPDIR/ray (default
#                                $TMPDIR/ray, else /tmp/ray). Give a separate one, and separate ports, to run beside
#                                another local Ray (e.g. one started by ray.init() in a test).
#
# Loopback: Ray 2.60 turns --node-ip-address 127.0.0.1 into the machine's address, and the GCS,
# raylet, agent, client-server and worker ports listen on all interfaces; only the dashboard
# (job API) is bound to 127.0.0.1.
# Keep such a head behind a firewall (token auth is on, but still).
#
# The head's processes run in a session of their own; its id is written to
# ${RAY_TMPDIR:-${TMPDIR:-/tmp}}/instseg-ray-head-$RAY_PORT.sid so that stop.sh stops this head only.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -x "$repo/.venv/bin/ray" ]]; then
    ray_bin="$repo/.venv/bin/ray"
else
    ray_bin="$(command -v ray)" || { echo "ray not found: run 'make demo' or pip install -e '.[ray]'" >&2; exit 1; }
fi
# `ray job submit -- python ...` runs the `python` found on the head's PATH: make it the one next
# to this `ray` (the venv's), whatever the calling shell has activated
PATH="$(dirname "$ray_bin"):$PATH"
export PATH

ray_port="${RAY_PORT:-6379}"
dashboard_port="${DASHBOARD_PORT:-8265}"
ncpu="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
num_cpus="${RAY_NUM_CPUS:-$(( ncpu > 4 ? ncpu : 4 ))}"
state_dir="${RAY_TMPDIR:-${TMPDIR:-/tmp}}"   # where Ray puts its "ray" dir
sid_file="$state_dir/instseg-ray-head-$ray_port.sid"
mkdir -p "$state_dir"

args=(start --head
      --node-ip-address 127.0.0.1
      --port "$ray_port"
      --num-cpus "$num_cpus"
      --include-dashboard true
      --dashboard-host 127.0.0.1
      --dashboard-port "$dashboard_port"
      --dashboard-agent-listen-port "${DASHBOARD_AGENT_LISTEN_PORT:-52365}"
      --ray-client-server-port "${RAY_CLIENT_SERVER_PORT:-10001}"
      --disable-usage-stats)

if command -v setsid >/dev/null 2>&1; then
    # new session: every Ray process of this head (workers included) inherits its id
    setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$sid_file" "$ray_bin" "${args[@]}" "$@"
else
    echo "setsid not found: stop this head with 'cluster/local/stop.sh --all' (ray stop)" >&2
    "$ray_bin" "${args[@]}" "$@"
fi

gcs_address="$(cat "$state_dir/ray/ray_current_cluster" 2>/dev/null || echo "127.0.0.1:$ray_port")"
cat <<MSG

Ray head is up ($num_cpus logical CPUs, GCS $gcs_address). To use it from this shell:
    export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port   # ray job submit / logs / status / stop
    export RAY_ADDRESS=$gcs_address                    # drivers that call ray.init() themselves
    export RAY_AUTH_MODE=token   # token auth is on: the job CLI and ray.init(address=...) fail with
                                 # "Missing authentication token" unless this is set (token from
                                 # RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
    cluster/submit.sh --input samples --output /tmp/instseg_out --model-dir .cache/demo_model
Dashboard: http://127.0.0.1:$dashboard_port    Stop: cluster/local/stop.sh (same RAY_PORT/RAY_TMPDIR)
MSG
