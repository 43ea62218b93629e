# Helpers for batch scripts that run scheduler, workers and driver inside one allocation
# (deploy/slurm/facecluster.sbatch, deploy/pbs/facecluster.pbs). Source it (bash).
#
#   fc_start_scheduler WORKDIR     starts `dask scheduler` in the background, waits for
#                                  WORKDIR/scheduler.json, sets FC_SCHEDULER_FILE/FC_ADDRESS
#   fc_track PID                   kill PID when the script exits
#   fc_wait_for_workers N          block until N worker processes are registered
#
# WORKDIR must be on a filesystem all nodes share: workers read the scheduler file.
FC_PIDS=()

fc_cleanup() {
    local p
    for p in "${FC_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap fc_cleanup EXIT

fc_track() { FC_PIDS+=("$1"); }

fc_start_scheduler() {
    local workdir=$1 i
    mkdir -p "$workdir"
    FC_SCHEDULER_FILE=$workdir/scheduler.json
    rm -f "$FC_SCHEDULER_FILE"
    # port 0: a free port (several jobs may share the first node); the file carries it
    dask scheduler --port "${DASK_PORT:-0}" --dashboard-address "${DASK_DASHBOARD:-:8787}" \
        --scheduler-file "$FC_SCHEDULER_FILE" > "$workdir/scheduler.log" 2>&1 &
    fc_track $!
    for i in $(seq 600); do
        [[ -s $FC_SCHEDULER_FILE ]] && break
        sleep 0.1
    done
    if [[ ! -s $FC_SCHEDULER_FILE ]]; then
        echo "error: dask scheduler did not start; see $workdir/scheduler.log" >&2
        return 1
    fi
    FC_ADDRESS=$("${PYTHON:-python}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' "$FC_SCHEDULER_FILE")
    echo "dask scheduler at $FC_ADDRESS (logs in $workdir)" >&2
}

fc_wait_for_workers() {
    # all of them: otherwise the first stage's tasks pile up on the first node to arrive
    "${PYTHON:-python}" - "$FC_SCHEDULER_FILE" "$1" "${WORKER_WAIT:-600}" <<'PY'
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="60s") as c:
    c.wait_for_workers(int(sys.argv[2]), timeout=float(sys.argv[3]))
    print(f"{len(c.scheduler_info(n_workers=-1)['workers'])} dask workers ready", file=sys.stderr)
PY
}
