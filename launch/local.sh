#!/usr/bin/env bash
# One node, N ranks (CPU processes with gloo, or one per GPU with nccl), through the deepspeed launcher.
#   launch/local.sh N [hydra overrides...]
#   launch/local.sh 2 parallel=zero2 model=gpt-tiny train.steps=100
# MASTER_PORT picks the rendezvous port (default 29500); TRAINER_LAUNCH_ID names the run directory.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: launch/local.sh N_RANKS [hydra overrides...]" >&2
  exit 2
fi
ranks=$1
shift
cd "$(dirname "$0")/.."
export TRAINER_LAUNCH_ID=${TRAINER_LAUNCH_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
# --no_local_rank: Hydra would reject the --local_rank argument; ranks read LOCAL_RANK from the environment.
exec deepspeed --num_gpus "$ranks" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
  --module trainer.train "$@"
