#!/usr/bin/env bash
# Stop the local Ray head that start_head.sh started (same RAY_PORT and RAY_TMPDIR), and only it.
#
#   cluster/local/stop.sh [-f|--force] [-g|--grace-period SECONDS]
#   cluster/local/stop.sh --all [ray stop flags...]     # plain `ray stop`
#
# Sends SIGTERM, then SIGKILL to what is left after the grace period (default 5 s; the GCS of
# Ray 2.60 often takes longer, flushing metrics to agents that are already gone). --force sends
# SIGKILL at once. --all runs `ray stop`, which stops EVERY Ray process of this user
# on this machine (it matches process names), including clusters started by ray.init() in other
# programs and other people's heads on a shared machine; hence it is not the default.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -x "$repo/.venv/bin/ray" ]]; then
    ray_bin="$repo/.venv/bin/ray"
else
    ray_bin="$(command -v ray || echo ray)"
fi

force=0 grace=5 all=0 rest=()
while (( $# )); do
    case "$1" in
        --all) all=1 ;;
        -f|--force) force=1; rest+=("$1") ;;
        -g|--grace-period) grace="$2"; rest+=("$1" "$2"); shift ;;
        *) rest+=("$1") ;;
    esac
    shift
done
if (( all )); then
    exec "$ray_bin" stop ${rest[@]+"${rest[@]}"}
fi

sid_file="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/instseg-ray-head-${RAY_PORT:-6379}.sid"
if [[ ! -f "$sid_file" ]]; then
    echo "no head recorded in $sid_file (check RAY_PORT/RAY_TMPDIR); 'stop.sh --all' runs 'ray stop'" >&2
    exit 1
fi
sid="$(cat "$sid_file")"
[[ "$sid" =~ ^[0-9]+$ ]] || { echo "bad session id in $sid_file" >&2; exit 1; }

head_pids() {
    # processes of that session whose command line mentions ray (guards against a reused id)
    ps -e -o pid=,sid=,args= | awk -v s="$sid" -v me="$$" '$2 == s && $1 != me && /ray/ {print $1}'
}

pids="$(head_pids)"
if [[ -z "$pids" ]]; then
    echo "no Ray process left in session $sid"
elif (( force )); then
    echo "killing $(echo $pids | wc -w) Ray process(es) of session $sid"
    kill -KILL $pids 2>/dev/null || true
else
    echo "stopping $(echo $pids | wc -w) Ray process(es) of session $sid"
    kill -TERM $pids 2>/dev/null || true
    for (( i = 0; i < grace * 4; i++ )); do
        [[ -z "$(head_pids)" ]] && break
        sleep 0.25
    done
    left="$(head_pids)"
    if [[ -n "$left" ]]; then
        echo "killing $(echo $left | wc -w) process(es) still alive after ${grace}s:"
        ps -o pid=,args= -p "$(echo $left | tr ' ' ',')" | cut -c1-120 || true
        kill -KILL $left 2>/dev/null || true
    fi
fi
for (( i = 0; i < 20; i++ )); do [[ -z "$(head_pids)" ]] && break; sleep 0.25; done
rm -f "$sid_file"
# forget this head as the default address for ray.init(address="auto"), as `ray stop` does
addr_file="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"
if [[ -f "$addr_file" ]] && grep -q ":${RAY_PORT:-6379}\$" "$addr_file"; then rm -f "$addr_file"; fi
echo "stopped"
