#!/usr/bin/env bash
# One box with 1-4x RTX 4090 (24 GB each, PCIe, no peer-to-peer): ZeRO-2, bf16; OFFLOAD=1 picks ZeRO-3
# with optimizer and parameters on CPU, for models whose states do not fit 24 GB (e.g. llama-1.3b and up).
#   bash launch/single_node_4090.sh --data data/ --model gpt2-124m --max-steps 20000 --out runs/124m
# NUM_GPUS (default: all visible), DS_CONFIG override; DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); [ "$NUM_GPUS" -ge 1 ] || NUM_GPUS=1
fi
if [ "${OFFLOAD:-0}" = 1 ]; then DEFAULT_CONFIG=ds_configs/zero3_offload.json; else DEFAULT_CONFIG=ds_configs/zero2.json; fi
DS_CONFIG=${DS_CONFIG:-$DEFAULT_CONFIG}
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-1}            # 4090 drivers have no P2P; without this NCCL can hang
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}              # no InfiniBand in a workstation
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective aborts, no hang
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}              # host threads per rank; CPU Adam (offload) uses them
cmd=(deepspeed --num_gpus "$NUM_GPUS" launch/pretrain.py --ds_config "$DS_CONFIG" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
