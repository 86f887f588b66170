#!/usr/bin/env bash
# Every CPU result of the performance issue in one go, on a quiet machine (nothing else running: the
# ratios are side by side within each invocation, but absolute tokens/s move with other load).
#   bash benchmarks/cpu_suite.sh            # ~30 min on 2 cores; results in benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export DS_ACCELERATOR=cpu
# 1. the headline ratios: tiny preset (seq 256, micro 8), fp32, one thread per process, best of 3 interleaved
$PY benchmarks/throughput.py --threads 1 --repeats 3 --steps 20 --warmup-steps 3 --offload
# 2. the sweep: seq len x micro batch x activation checkpointing
$PY benchmarks/throughput.py --threads 1 --repeats 1 --steps 10 --warmup-steps 2 --stages 0 2 3 \
    --seq-len 128 256 --micro-batch-size 4 8 --checkpointing both --tag sweep
# 3. torch.compile under the engine, eager and compiled side by side
$PY benchmarks/throughput.py --threads 1 --repeats 1 --steps 20 --warmup-steps 3 --stages 0 2 --compile both --tag compile
# 4. memory per ZeRO stage and offload, 1 and 2 ranks, GPT-2 124M in bf16 (as on a GPU)
$PY benchmarks/throughput.py --model gpt2-124m --seq-len 128 --micro-batch-size 1 --ranks 1 2 --offload \
    --precision bf16 --steps 3 --warmup-steps 2 --repeats 1 --tag memory
# 5. the ladder's CPU-only rungs: bf16 against fp32, and glibc malloc that keeps freed memory
$PY benchmarks/throughput.py --threads 1 --repeats 2 --steps 20 --warmup-steps 3 --stages 0 2 --precision bf16 --tag bf16
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \
    $PY benchmarks/throughput.py --threads 1 --repeats 2 --steps 20 --warmup-steps 3 --stages 0 2 --tag malloc
# 6. what limits ZeRO-3: the same step on ZeRO-2 and ZeRO-3 under torch.profiler and cProfile
for stage in 2 3; do
  $PY benchmarks/profile_step.py --ds_config ds_configs/zero$stage.json --micro-batch-size 8 --steps 10 \
      > "benchmarks/results/$(date +%F)-profile-zero$stage-tiny-cpu-$(nproc)c.txt" 2>/dev/null
done
# 7. where DeepSpeed's bf16 step spends its extra time on CPU (GPT-2 124M, micro batch 1 x 128 as in 4.)
$PY benchmarks/profile_step.py --ds_config ds_configs/zero0.json --model gpt2-124m --seq-len 128 --micro-batch-size 1 \
    --precision bf16 --steps 5 > "benchmarks/results/$(date +%F)-profile-zero0-bf16-gpt2-124m-cpu-$(nproc)c.txt" 2>/dev/null
# 8. the data stage: prepare against raw encode, the loader's read rate
$PY benchmarks/data_pipeline.py
