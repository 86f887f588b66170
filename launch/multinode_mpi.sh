#!/usr/bin/env bash
# Several nodes with MPI: plain `mpirun`, each rank finding its rank and master through mpi4py
# (pip install -e ".[mpi]"), so no ssh set-up by DeepSpeed is needed beyond what mpirun uses.
#   bash launch/multinode_mpi.sh hostfile --data /shared/data --model gpt2-774m --out /shared/runs/774m
# The hostfile is OpenMPI's ('HOSTNAME slots=GPUS', the same format DeepSpeed reads).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:?usage: multinode_mpi.sh HOSTFILE [pretrain options]}; shift
NP=${NP:-$(awk 'NF && $1 !~ /^#/ {split($2, s, "="); n += s[2]} END {print n}' "$HOSTFILE")}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
export MASTER_PORT=${MASTER_PORT:-29500}                  # rank 0 listens here (rank 0's address comes from MPI)
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}              # InfiniBand between nodes; 1 forces TCP sockets
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead node aborts the job, no hang
cmd=(mpirun -np "$NP" --hostfile "$HOSTFILE" --map-by "ppr:${GPUS_PER_NODE:-8}:node" --bind-to none
     -x MASTER_PORT -x NCCL_IB_DISABLE -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x PATH
     "$(command -v python)" launch/pretrain.py --ds_config "$DS_CONFIG" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
