#!/usr/bin/env bash
# (a) One GPU host (1..8 GPUs): all local GPUs form the mesh's data axis.
#   launch/gpu_single_host.sh configs/covidmt_resnext50.py:root=/data runs/covidmt_rx50 [--config.x=y ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [overrides...]}; WORKDIR=${2:?workdir}; shift 2
# Let XLA take most of the GPU memory up front, but leave room for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m covidmt_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.model.dtype=bfloat16 --config.data.num_workers="${NUM_WORKERS:-8}" "$@"
