#!/usr/bin/env bash
# Submit a batch-labelling job to a Ray cluster; arguments go to `python -m jobs.batch_predict`.
#
#   cluster/submit.sh --input s3://bucket/images/ --output s3://bucket/labels/run1/ \
#       --model Mask-RT-DETR-L --num-gpus-per-actor 0.5 --num-actors 8
#
# Environment:
#   RAY_API_SERVER_ADDRESS  job server (dashboard) URL   (default http://127.0.0.1:${DASHBOARD_PORT:-8265})
#   SUBMISSION_ID           job id                       (default instseg-<UTC date-time>)
#   RAY_JOB_FLAGS           extra `ray job submit` flags, e.g. "--no-wait" or "--entrypoint-num-cpus 0"
# Token auth: RAY_AUTH_MODE=token is set here; the token comes from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (written by `ray start` on a local head).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"   # working_dir "." in the runtime env and --working-dir . mean the repo root
if [[ -x "$repo/.venv/bin/ray" ]]; then ray_bin="$repo/.venv/bin/ray"; else ray_bin="ray"; fi

address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:${DASHBOARD_PORT:-8265}}"
submission_id="${SUBMISSION_ID:-instseg-$(date -u +%Y%m%d-%H%M%S)}"

# shellcheck disable=SC2086  # RAY_JOB_FLAGS is a list of flags
RAY_AUTH_MODE=token exec "$ray_bin" job submit \
    --address "$address" \
    --submission-id "$submission_id" \
    --runtime-env cluster/runtime_env.yaml \
    --working-dir . \
    ${RAY_JOB_FLAGS:-} \
    -- python -m jobs.batch_predict "$@"
