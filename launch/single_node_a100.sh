#!/usr/bin/env bash
# One node with 8x A100 (NVLink/NVSwitch between GPUs, InfiniBand to other nodes): ZeRO-2, bf16.
#   bash launch/single_node_a100.sh --data data/ --model gpt2-350m --max-steps 20000 --out runs/350m
# NUM_GPUS and DS_CONFIG override the defaults; DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-8}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}              # use InfiniBand/RoCE when the node has it
export NCCL_P2P_LEVEL=${NCCL_P2P_LEVEL:-NVL}              # GPU peer-to-peer over NVLink
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective aborts, no hang
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}              # host threads per rank (loader workers are separate processes)
cmd=(deepspeed --num_gpus "$NUM_GPUS" launch/pretrain.py --ds_config "$DS_CONFIG" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
