#!/usr/bin/env bash
# Start the Dask scheduler with TLS (run on the scheduler host, keep it running).
#
#   deploy/manual/start-scheduler.sh CERTDIR
#
# CERTDIR holds ca.pem, scheduler.pem, scheduler.key (deploy/manual/make-certs.sh).
# Environment: DASK_HOST (address to listen on, default all interfaces), DASK_PORT
# (default 8786), DASK_DASHBOARD (default :8787), DASK_SCHEDULER_FILE (optional:
# write the address there, for scripts).
set -euo pipefail
certs=${1:?usage: $0 CERTDIR}
args=(--protocol tls --port "${DASK_PORT:-8786}" --dashboard-address "${DASK_DASHBOARD:-:8787}"
      --tls-ca-file "$certs/ca.pem" --tls-cert "$certs/scheduler.pem" --tls-key "$certs/scheduler.key")
if [[ -n "${DASK_HOST:-}" ]]; then args+=(--host "$DASK_HOST"); fi
if [[ -n "${DASK_SCHEDULER_FILE:-}" ]]; then args+=(--scheduler-file "$DASK_SCHEDULER_FILE"); fi
exec dask scheduler "${args[@]}"
