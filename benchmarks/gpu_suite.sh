#!/usr/bin/env bash
# Every GPU figure of dsllm in one go, on one bare GPU machine, inside a time budget (a lent GPU's minutes are few).
#
#   bash benchmarks/gpu_wheels.sh                      # first, where pip works: .whl/ (DeepSpeed, pydantic, ...)
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]         # on the GPU machine, with .whl/ beside it
#   GPU_SUITE_REHEARSE=1 bash benchmarks/gpu_suite.sh /tmp/r   # on CPU: every section, tiny, to find mistakes
#
# Without CUDA (and without GPU_SUITE_REHEARSE=1) it stops at once with one line that says so, exit 2.
# Sections, in order of value, each bounded by `timeout`; a section that no longer fits the budget is skipped:
#   check       torch/CUDA/NCCL versions, the bf16 matmul rate, the SDPA kernel our Attention gets (gpu_check.py)
#   ops         DeepSpeed's FusedAdam built for this GPU's architecture only (python -m dsllm.ops build)
#   gpt2        throughput.py: gpt2-124m, seq 1024, bf16, plain loop and ZeRO-0/1/2/3, eager
#   pretrain    the main job on the default corpus through the deepspeed launcher (ZeRO-2); resume: continued
#   export      dsllm export of that run to Hugging Face; parity: logits on the GPU (export_parity.py)
#   llama       throughput.py: llama-1.3b, seq 2048, bf16, plain loop and ZeRO-1/2/3 (GPU_SUITE_LLAMA_STAGES), eager
#   gpt2-compile, llama-compile   the same points with torch.compile (plain+compile and ZeRO-1/2+compile)
#   profile     profile_step.py of gpt2-124m's step on ZeRO-1, eager and compiled (GPU_SUITE_PROFILE): where its time goes
# Results: RESULTS_DIR/<date>-throughput-<gpu>-*.{md,json,png}, gpu_check.json, export_parity.json, and
# gpu_suite.log (every section's output) in RESULTS_DIR; GPU_SUITE_SECONDS sets the budget (default 450),
# GPU_SUITE_SECTIONS="ops gpt2 ..." runs only those (a rerun of what failed); GPU_SUITE_LLAMA_STAGES and
# GPU_SUITE_LLAMA_COMPILE_STAGES the ZeRO stages of llama's eager and compiled points, GPU_SUITE_COMPILE_EXTRA
# (GPU_SUITE_LLAMA_COMPILE_EXTRA for llama) e.g. --no-plain; GPU_SUITE_GPT2_EXTRA / GPU_SUITE_LLAMA_EXTRA options
# appended to every gpt2 / llama point, GPU_SUITE_TAG_SUFFIX a suffix for their result files.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)
BUDGET=${GPU_SUITE_SECONDS:-450}
REHEARSE=${GPU_SUITE_REHEARSE:-0}
PY=${PYTHON:-python3}
WORK=${GPU_SUITE_WORK:-/tmp/dsllm-gpu-suite}
LOG=$RESULTS/gpu_suite.log
began=$SECONDS
mkdir -p "$WORK/logs"
: >"$LOG"

say() { echo "$*" | tee -a "$LOG"; }
fail() { echo "error: $*" | tee -a "$LOG" >&2; exit 2; }

# what the GPU image lacks comes from wheels carried in .whl/ (benchmarks/gpu_wheels.sh made them)
if ! $PY -c "import deepspeed, zstandard" >/dev/null 2>&1; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    fail "DeepSpeed is not installed and .whl/ holds no wheels: run bash benchmarks/gpu_wheels.sh where pip works and bring .whl/ along"
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    || fail "installing the wheels in .whl/ failed (pip's message above); make them again with benchmarks/gpu_wheels.sh"
  export PYTHONPATH="$WORK/site"
  export PATH="$WORK/site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DSLLM_CACHE_DIR=${DSLLM_CACHE_DIR:-$WORK/cache} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if [[ $REHEARSE == 1 ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  SMALL=(--model.n_layers 2 --model.d_model 64 --model.n_heads 4 --model.mlp_multiple_of 32)
  GPT2=(--model gpt2-124m "${SMALL[@]}" --seq-len 64 --micro-batch-size 2 --steps 2 --warmup-steps 1 --precision fp32)
  LLAMA=(--model llama-1.3b "${SMALL[@]}" --model.n_kv_heads 2 --seq-len 64 --micro-batch-size 2 --steps 2 --warmup-steps 1 --precision fp32)
  RUN=(--model gpt2-124m "${SMALL[@]}" --seq-len 64 --micro-batch-size 2 --precision fp32 --loader-workers 0)
  PROFILE=(--model gpt2-124m "${SMALL[@]}" --seq-len 64 --micro-batch-size 2 --precision fp32 --steps 2)
  STEPS_1=20 STEPS_2=30 CHECK=(--allow-cpu) PARITY=(--device cpu)
else
  capability=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null) || {
    fail "no CUDA device here ($($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1)): this suite measures a GPU; run it on a GPU machine, or benchmarks/cpu_suite.sh on CPU"
  }
  # DeepSpeed's ops for this GPU only (faster builds). Set, not defaulted: DeepSpeed 0.19.8 cannot parse an
  # architecture suffix such as the "9.0a" a CUDA image may export (ValueError: invalid literal for int(): '0a')
  export TORCH_CUDA_ARCH_LIST=$capability
  GPT2=(--model gpt2-124m --seq-len 1024 --micro-batch-size 16 --steps 10 --warmup-steps 3 --precision bf16)
  LLAMA=(--model llama-1.3b --seq-len 2048 --micro-batch-size 8 --steps 6 --warmup-steps 2 --precision bf16)
  RUN=(--model gpt2-124m --seq-len 512 --micro-batch-size 32 --precision bf16 --lr 6e-4 --eval-windows 64)
  PROFILE=(--model gpt2-124m --seq-len 1024 --micro-batch-size 16 --precision bf16 --steps 5)
  STEPS_1=200 STEPS_2=300 CHECK=() PARITY=(--device cuda)
fi
BENCH=(--repeats 1 --results-dir "$RESULTS")
GPT2+=(${GPU_SUITE_GPT2_EXTRA:-}) LLAMA+=(${GPU_SUITE_LLAMA_EXTRA:-})  # e.g. --micro-batch-size 32 (the last value counts)
SUFFIX=${GPU_SUITE_TAG_SUFFIX:-}  # e.g. -mb32: result files beside, not over, the same day's

SECTIONS=" ${GPU_SUITE_SECTIONS:-check ops gpt2 pretrain resume export parity llama gpt2-compile profile llama-compile} "
COMPILE_EXTRA=(${GPU_SUITE_COMPILE_EXTRA:-})  # e.g. --no-plain on a rerun that measured plain+compile already

# section NAME LEAST MOST COMMAND...: run COMMAND for at most MOST seconds of what is left, or skip it when less
# than LEAST is left or NAME is not in GPU_SUITE_SECTIONS; its output goes to the log (its last lines to the screen)
section() {
  local name=$1 least=$2 most=$3 left=$((BUDGET - (SECONDS - began)))
  shift 3
  [[ $SECTIONS == *" $name "* ]] || return 0
  if ((left < least)); then
    say "== $name: skipped, ${left} s of the budget left (needs ${least} s)"
    return 0
  fi
  ((most > left)) && most=$left
  say "== $name (at most ${most} s): $*"
  local t0=$SECONDS rc=0
  timeout --signal=TERM --kill-after=15 "$most" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
  cat "$WORK/logs/$name.log" >>"$LOG"
  grep -v '^\[20' "$WORK/logs/$name.log" | tail -n 14
  say "== $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124)) && echo ' (stopped at its time limit)')"
  return 0
}

RUN_DIR=$WORK/run
LAUNCH=(deepspeed --num_gpus 1 --master_port 29517 launch/pretrain.py --recipe launch/recipes/default.yaml
  "${RUN[@]}" --out "$RUN_DIR" --save-interval 100 --eval-interval 100 --log-interval 50)
rm -rf "$RUN_DIR" "$WORK/hf"

# the default corpus (tokenizer + tokens, CPU only) builds while the GPU is checked and the ops compile
$PY -c "from dsllm.data.default_corpus import build_default_dataset as b; b(log=print)" >"$WORK/logs/corpus.log" 2>&1 &
corpus=$!
section check 20 60 $PY benchmarks/gpu_check.py --out "$RESULTS" "${CHECK[@]}"
section ops 30 150 $PY -m dsllm.ops build ds_configs/zero2.json
wait $corpus && say "== corpus: $(tail -n 1 "$WORK/logs/corpus.log")" || say "== corpus: failed: $(tail -n 3 "$WORK/logs/corpus.log")"
section gpt2 60 120 $PY benchmarks/throughput.py "${GPT2[@]}" --stages 0 1 2 3 "${BENCH[@]}" --tag gpt2-124m$SUFFIX
section pretrain 40 60 "${LAUNCH[@]}" --max-steps "$STEPS_1"
section resume 30 45 "${LAUNCH[@]}" --max-steps "$STEPS_2"
section export 15 30 $PY -m dsllm export --checkpoint "$RUN_DIR" --output "$WORK/hf"
section parity 15 40 $PY benchmarks/export_parity.py --checkpoint "$RUN_DIR" --hf "$WORK/hf" --out "$RESULTS" "${PARITY[@]}"
section llama 60 120 $PY benchmarks/throughput.py "${LLAMA[@]}" --stages ${GPU_SUITE_LLAMA_STAGES:-1 2 3} "${BENCH[@]}" --tag llama-1.3b$SUFFIX
section gpt2-compile 60 150 $PY benchmarks/throughput.py "${GPT2[@]}" --stages 1 2 --compile on "${COMPILE_EXTRA[@]}" "${BENCH[@]}" --tag gpt2-124m-compile$SUFFIX
# where ZeRO's extra time goes on the small model: operators and kernels, and Python time per file;
# GPU_SUITE_PROFILE="zero0 zero1 zero1+compile": the configs profiled, +compile under torch.compile
for point in ${GPU_SUITE_PROFILE:-zero1 zero1+compile}; do
  config=${point%+compile}
  compile=$([[ $point == *+compile ]] && echo --compile)
  section profile 40 90 bash -c "$PY benchmarks/profile_step.py --ds_config ds_configs/$config.json ${PROFILE[*]} $compile \
    >$RESULTS/profile-$point.txt"
done
LLAMA_COMPILE_EXTRA=(${GPU_SUITE_LLAMA_COMPILE_EXTRA:-${COMPILE_EXTRA[@]}})
section llama-compile 60 150 $PY benchmarks/throughput.py "${LLAMA[@]}" --stages ${GPU_SUITE_LLAMA_COMPILE_STAGES:-1 2} --compile on \
  "${LLAMA_COMPILE_EXTRA[@]}" "${BENCH[@]}" --tag llama-1.3b-compile$SUFFIX
cp "$RUN_DIR/metrics.jsonl" "$RESULTS/gpu_suite_run_metrics.jsonl" 2>/dev/null
say "== done in $((SECONDS - began)) s; results in $RESULTS"
