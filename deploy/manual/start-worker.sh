#!/usr/bin/env bash
# Start Dask workers with TLS on this host (run on every worker host).
#
#   deploy/manual/start-worker.sh tls://SCHEDULER_HOST:8786 CERTDIR [NPROCS]
#
# NPROCS worker processes (default: one per core) of THREADS_PER_WORKER threads
# (default 1), with OPENBLAS_CORETYPE and thread variables from
# deploy/common/worker-env.sh. CERTDIR holds ca.pem, worker.pem, worker.key.
# Environment: MEMORY_LIMIT per process (default auto = RAM / NPROCS), DASK_HOST
# (address to listen on / advertise), LOCAL_DIR (spill directory, default /tmp).
# The facecluster package must be installed in the environment this runs in.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
address=${1:?usage: $0 tls://SCHEDULER:8786 CERTDIR [NPROCS]}
certs=${2:?usage: $0 tls://SCHEDULER:8786 CERTDIR [NPROCS]}
source "$here/../common/worker-env.sh"
nprocs=${3:-$(( $(nproc) / THREADS_PER_WORKER ))}
(( nprocs >= 1 )) || nprocs=1
args=(--nworkers "$nprocs" --nthreads "$THREADS_PER_WORKER" --memory-limit "${MEMORY_LIMIT:-auto}"
      --local-directory "${LOCAL_DIR:-/tmp}" --no-dashboard
      --tls-ca-file "$certs/ca.pem" --tls-cert "$certs/worker.pem" --tls-key "$certs/worker.key")
if [[ -n "${DASK_HOST:-}" ]]; then args+=(--host "$DASK_HOST"); fi
echo "dask worker: $nprocs x $THREADS_PER_WORKER thread(s), OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} -> $address" >&2
exec dask worker "$address" "${args[@]}"
