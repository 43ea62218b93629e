#!/bin/bash
# Container entrypoint: OpenBLAS core type for this node's CPU + thread variables, then the command.
set -euo pipefail
source /opt/facecluster/deploy/common/worker-env.sh
exec "$@"
