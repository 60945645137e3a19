#!/usr/bin/env bash
# One prepared pass on a GPU machine (the lent H100/H200, whose image has jax, flax, optax,
# orbax, torch and torchvision but not grain / ml_collections / tensorboardX): installs the
# missing pure wheels carried in .whl/, then
#   1. benchmarks/train_throughput.py --device gpu (JAX bf16 vs torch autocast bf16),
#   2. benchmarks/score_throughput.py --device gpu,
#   3. a one-epoch demo training run through `python -m covidmt_jax.train` on the GPU.
# DEMO=0 skips part 3. Every part is time-boxed and logs to $OUT (or ./gpu_out), so a part that overruns still
# leaves the others' figures. Usage: bash benchmarks/gpu_check.sh [BATCH] [STEPS]
set -u -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
BATCH=${1:-48}
STEPS=${2:-10}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX and torch share the card in one process: leave torch half of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import sys, jax, flax, optax, orbax.checkpoint as oc, torch, torchvision
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'torchvision', torchvision.__version__, jax.devices())"
  $PY -c "import covidmt_jax.train, covidmt_jax.score; print('covidmt_jax imports ok')"
} 2>&1 | tee "$OUT/env.txt"

timeout 330 $PY benchmarks/train_throughput.py --device gpu --models covidmt_resnext50,resnet50 \
  --sizes 224,512 --batch "$BATCH" --steps "$STEPS" --warmup 3 --json "$OUT/train_gpu.json" \
  2>&1 | tee "$OUT/train_gpu.txt"
echo "train_throughput rc=$?"

timeout 100 $PY benchmarks/score_throughput.py --device gpu --sizes 512 --batch 16 --steps 5 \
  --warmup 2 --json "$OUT/score_gpu.json" 2>&1 | tee "$OUT/score_gpu.txt"
echo "score_throughput rc=$?"

if [ "${DEMO:-1}" = 1 ]; then
  timeout 100 $PY -m covidmt_jax.train --config configs/demo.py --workdir /tmp/demo_gpu \
    --config.epochs=1 2>&1 | tail -25 | tee "$OUT/train_demo_gpu.txt"
  echo "demo train rc=$?"
fi
