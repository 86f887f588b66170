#!/usr/bin/env bash
# Several nodes from one hostfile, started over ssh with pdsh (DeepSpeed's default multi-node launcher).
#   bash launch/multinode_hostfile.sh hostfile --data /shared/data --model llama-1.3b --out /shared/runs/1b
# The hostfile has one line per node, 'HOSTNAME slots=GPUS'; the first host is the master. Every node
# needs passwordless ssh from this one and the same checkout, virtualenv and dataset path: check with
# launch/preflight.py first. Variables in ./.deepspeed_env (KEY=VALUE lines) reach every rank.
# 3D (tensor parallelism inside each node, pipeline stages across nodes, ZeRO-1 over the replicas), e.g. a 7B
# model on 2 nodes of 8xA100: TP=8 PP=2 bash launch/multinode_hostfile.sh hostfile ... --grad-accum 16
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:?usage: multinode_hostfile.sh HOSTFILE [pretrain options]}; shift
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}  # tensor-parallel ranks per layer: at most a node's GPUs (its all-reduces need NVLink)
PP=${PP:-1}  # pipeline stages: a node per stage keeps only activations on the slower inter-node link
layout=()
if [ "$TP" != 1 ] || [ "$PP" != 1 ]; then
  layout=(--tensor-parallel "$TP" --pipeline-parallel "$PP")
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}  # pipelines take ZeRO-0/1
fi
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}              # InfiniBand between nodes; 1 forces TCP sockets
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}  # interfaces NCCL may use for bootstrap/TCP
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead node aborts the job, no hang
cmd=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     launch/pretrain.py --ds_config "$DS_CONFIG" ${layout[@]+"${layout[@]}"} "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
