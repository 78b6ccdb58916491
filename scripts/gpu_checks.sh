#!/usr/bin/env bash
# On a CUDA machine: the Triton-vs-PyTorch parity tests, then the GPU benchmarks, logs in $1.
#   bash scripts/gpu_checks.sh out/
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pytest -q tests/test_op_delta_rule.py tests/test_op_gated_slot.py tests/test_op_gla.py \
    tests/test_model_gpu.py -k "Triton or triton or gpu" 2>&1 | tee "$out/gpu_tests.log"
for b in delta_rule gated_slot gla; do
    python "benchmarks/bench_$b.py" --device cuda --lengths 1024 4096 16384 2>&1 | tee "$out/bench_$b.log"
done
for seq in 4096 16384; do
    python benchmarks/bench_train_step.py --device cuda --preset small --seq "$seq" --json "$out/train_small_$seq.json" \
        2>&1 | tee "$out/train_small_$seq.log"
done
