#!/usr/bin/env bash
# The checks that need a GPU (or TPU), as one short script (about 5 minutes) for the day such a machine is lent:
#   1. the Pallas kernel tests compiled and run on the device (not interpreted; tests/test_qmatmul.py -k pallas
#      with QLORA_JAX_PALLAS_DEVICE set), against the float32 reference path;
#   2. benchmarks/qmatmul.py (every path that runs there next to a dense product, bfloat16);
#   3. benchmarks/train_step.py --no-torch (the QLoRA and LoRA train steps; PyTorch's bitsandbytes is CPU-built
#      here, so the PyTorch side is not timed there).
# Usage, from the repository root, on the device machine:
#   bash benchmarks/device_check.sh [OUTDIR]      # default OUTDIR: $OUT if set, else benchmarks/results/device
# It uses the machine's python3 (jax with its CUDA plugin, flax, optax, transformers; nothing is installed) with
# this checkout on PYTHONPATH, and writes each step's log and JSON to OUTDIR (tables at the end of each log).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/device}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
backend=$($python -c 'import jax; print(jax.default_backend())')
echo "backend: $backend; $($python -c 'import jax; print(jax.devices()[0].device_kind, "jax", jax.__version__)')"
if [ "$backend" != gpu ] && [ "$backend" != tpu ]; then
    echo "device_check.sh: the default JAX backend is $backend; run this on a GPU or TPU machine" >&2
    exit 2
fi
status=0
QLORA_JAX_PALLAS_DEVICE=$backend timeout 150 $python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_qmatmul.py -k pallas 2>&1 | tee "$out/pallas_tests.log" || status=1
timeout 90 $python benchmarks/qmatmul.py --repeats 7 --json "$out/qmatmul.json" 2>&1 | tee "$out/qmatmul.log" \
    || status=1
timeout 90 $python benchmarks/train_step.py --repeats 7 --no-torch --json "$out/train_step.json" 2>&1 \
    | tee "$out/train_step.log" || status=1
echo "device_check.sh: done (status $status); logs and JSON in $out"
exit $status
