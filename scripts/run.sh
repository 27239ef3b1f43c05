#!/usr/bin/env bash
# The README's main command: set up, start the dev simulator in the background
# (var/dev/ekm.json describes it) and run the demo against it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
workdir=${EKM_DEV_WORKDIR:-var/dev}
.venv/bin/ekm-sim dev up --workdir "$workdir" >/dev/null
.venv/bin/python -m ekm_sim.demo "$workdir/ekm.json"
echo
echo "The simulator keeps running: $workdir/ekm.json describes it."
echo "Stop it with: .venv/bin/ekm-sim dev down --workdir $workdir"
