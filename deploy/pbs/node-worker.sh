#!/bin/bash
# Started on each node by facecluster.pbs: the environment, then `dask worker`.
#   node-worker.sh SCHEDULER_FILE NPROCS THREADS_PER_WORKER MEMORY_LIMIT [VENV]
# (ssh passes no environment: everything comes as arguments)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -n "${5:-}" ]]; then source "$5/bin/activate"; fi
THREADS_PER_WORKER=$3
source "$here/../common/worker-env.sh"
exec dask worker --scheduler-file "$1" --nworkers "$2" --nthreads "$THREADS_PER_WORKER" --memory-limit "$4" \
    --local-directory "${TMPDIR:-/tmp}" --no-dashboard
