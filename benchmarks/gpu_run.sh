#!/usr/bin/env bash
# The accelerator benchmarks in one prepared run (under 10 minutes on one GPU): step times at
# d = 256 and d = 1024, msign at 4096² in bfloat16, and the kernel counts; each writes its JSON
# to benchmarks/results/ (the device is named in each file's "machine" field), copied to $OUT
# when set (the device tool's output folder).
#
#   bash benchmarks/gpu_run.sh            # after: pip install -e ".[bench]" with jax[cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=$(python -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_').lower())")
python benchmarks/step_ops.py --d 256 --d 1024 --json "benchmarks/results/step_ops_${tag}.json"
python benchmarks/step_bench.py --d 256 --reps 7 --json "benchmarks/results/step_${tag}.json"
python benchmarks/step_bench.py --d 1024 --reps 5 --json "benchmarks/results/step_d1024_${tag}.json"
python benchmarks/msign_bench.py --dtype bfloat16 --shapes 4096x4096 --no-svd \
  --out "benchmarks/results/msign_${tag}_bf16_4096.json"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*"${tag}"*.json "$OUT"/; fi
