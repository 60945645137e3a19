#!/usr/bin/env bash
# (b) A multi-host Cloud TPU VM slice: the same command on every worker; JAX discovers the
# slice (jax.distributed.initialize() auto-detects Cloud TPU when TPU_WORKER_HOSTNAMES lists
# several hosts). WORKDIR must be shared storage (a gs:// bucket path works with orbax).
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_vm_slice.sh configs/covidmt_resnext50.py:root=/data gs://bucket/runs/rx50
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [overrides...]}; WORKDIR=${2:?workdir}; shift 2
: "${TPU:?set TPU (the TPU VM name)}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/covidmt_jax}
# 1. copy the code and install it on every worker
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all . "$TPU":"$REPO"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
# 2. train: every worker runs the same program; COVIDMT_MULTIHOST=1 forces distributed init.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && COVIDMT_MULTIHOST=1 python3 -m covidmt_jax.train --config '$CONFIG' --workdir '$WORKDIR' --config.model.dtype=bfloat16 $*"
