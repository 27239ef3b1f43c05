#!/usr/bin/env bash
# The README's main command: set up, start the dev stack in the background (the EKM
# simulator and the KMS front; var/stack/stack.json describes it) and run the demos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
workdir=${KMS_DEV_WORKDIR:-var/stack}
.venv/bin/kms-proxy dev up --workdir "$workdir" >/dev/null
echo "== The KMS front, driven by the official Alibaba Cloud KMS SDK =="
.venv/bin/python -m kms_proxy.demo "$workdir/stack.json"
echo
echo "== The EKM simulator (XKS Proxy API v1), driven like KMS drives it =="
.venv/bin/python -m ekm_sim.demo "$workdir/ekm/ekm.json"
echo
echo "The stack keeps running: $workdir/stack.json describes it."
echo "Stop it with: .venv/bin/kms-proxy dev down --workdir $workdir"
