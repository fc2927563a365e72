#!/usr/bin/env bash
# Several nodes, through the deepspeed launcher. Two ways to start them:
#
#   From one node, which starts every node of HOSTFILE over ssh (pdsh, the default) or mpirun:
#     launch/multinode.sh [--launcher pdsh|openmpi] HOSTFILE [hydra overrides...]
#     launch/multinode.sh launch/hostfile.example model=gpt2-small parallel=zero1 train.steps=2000
#
#   On every node, each node running the script itself (no ssh between nodes; Slurm, Kubernetes):
#     NODE_RANK=<0..N-1> TRAINER_LAUNCH_ID=<same on all nodes> launch/multinode.sh --no_ssh HOSTFILE [overrides...]
#
# HOSTFILE is DeepSpeed's: one `host slots=<GPUs>` line per node (launch/hostfile.example); the same file,
# at the same path, on every node. The project and its .venv must lie at the same path on every node.
# Hydra overrides pass through untouched.
#
# Environment:
#   MASTER_ADDR      address of the first node, reachable from all nodes (default: first host of HOSTFILE)
#   MASTER_PORT      rendezvous port on it (default 29500)
#   TRAINER_LAUNCH_ID  run directory name, one value for every node (default: the date; required with --no_ssh)
#   LAUNCHER         pdsh (default) or openmpi, like --launcher
#   NUM_NODES        use the first N hosts of HOSTFILE (pdsh, --no_ssh; default: all)
#   GPUS_PER_NODE    ranks per node, overriding the slots of HOSTFILE (pdsh, --no_ssh)
#   NODE_RANK        this node's index in HOSTFILE (--no_ssh only, required)
#   FORWARD_ENV      extra variable names to set on the other nodes (pdsh, openmpi), e.g. "WANDB_API_KEY"
#   DRY_RUN=1        print the deepspeed command (and the variables forwarded) instead of running it
# Options --launcher_args STR, --ssh_port N and --venv_script FILE are handed to deepspeed as they are.
#
# pdsh and mpirun give the other nodes a fresh environment: DeepSpeed forwards only variables named
# PYTHON*, MLFLOW*, MV2*, UCX* (and NCCL* when the launching node has a GPU) plus the KEY=VALUE lines of
# a `.deepspeed_env` file in the home or current directory (deepspeed/launcher/runner.py: EXPORT_ENVS,
# DEEPSPEED_ENVIRONMENT_NAME). This script writes a temporary file holding those lines and
# TRAINER_LAUNCH_ID, GLOO_*, NCCL_*, HF_*, TRANSFORMERS_*, WANDB_* (not *_API_KEY), OMP_NUM_THREADS,
# TORCH_EXTENSIONS_DIR and FORWARD_ENV (and, for pdsh, .venv/bin in front of PATH), and points DeepSpeed
# at it through DS_ENV_FILE.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "see the header of $0 for the environment variables; docs/scaling-out.md for a walk-through" >&2
}

launcher=${LAUNCHER:-pdsh}
no_ssh=0
ds_extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --launcher) launcher=${2:?--launcher needs a value}; shift 2 ;;
    --launcher=*) launcher=${1#*=}; shift ;;
    --no_ssh) no_ssh=1; shift ;;
    --launcher_args | --ssh_port | --venv_script) ds_extra+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --launcher_args=* | --ssh_port=* | --venv_script=*) ds_extra+=("$1"); shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "launch/multinode.sh: unknown option $1" >&2; usage; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  usage
  exit 2
fi
hostfile=$1
shift
if [[ ! -f $hostfile ]]; then
  echo "launch/multinode.sh: no hostfile at $hostfile (format: one 'host slots=N' line per node)" >&2
  exit 2
fi
hostfile=$(cd "$(dirname "$hostfile")" && pwd)/$(basename "$hostfile")  # absolute: we change directory
launcher=${launcher,,}
case $launcher in
  pdsh | openmpi) ;;
  *) echo "launch/multinode.sh: --launcher must be pdsh or openmpi, not '$launcher'" >&2; exit 2 ;;
esac

# The hosts, as DeepSpeed reads them (runner.py _parse_hostfile): `host slots=N`, # comments, blank lines.
mapfile -t hosts < <(awk '$0 !~ /^[[:space:]]*(#|$)/ && $2 ~ /^slots=[0-9]+$/ { print $1 }' "$hostfile")
if [[ ${#hosts[@]} -eq 0 ]]; then
  echo "launch/multinode.sh: $hostfile lists no 'host slots=N' line" >&2
  exit 2
fi

cd "$(dirname "$0")/.."  # the project root: ranks on every node start here (pdsh cds to this path)
deepspeed=deepspeed  # from PATH, as launch/local.sh; else this checkout's environment
command -v deepspeed >/dev/null || deepspeed=$PWD/.venv/bin/deepspeed
master_addr=${MASTER_ADDR:-${hosts[0]}}
master_port=${MASTER_PORT:-29500}
num_nodes=${NUM_NODES:-${#hosts[@]}}
rank_opts=()
[[ -n ${NUM_NODES:-} ]] && rank_opts+=(--num_nodes "$NUM_NODES")
[[ -n ${GPUS_PER_NODE:-} ]] && rank_opts+=(--num_gpus "$GPUS_PER_NODE")
# --no_local_rank: Hydra would reject the --local_rank argument; ranks read LOCAL_RANK from the environment.
entry=(--no_local_rank --module trainer.train "$@")

if [[ $no_ssh == 1 ]]; then
  if [[ ! ${NODE_RANK:-} =~ ^[0-9]+$ ]]; then
    echo "launch/multinode.sh --no_ssh: set NODE_RANK to this node's index in $hostfile (0..$((num_nodes - 1)))" >&2
    exit 2
  fi
  if [[ $num_nodes -gt 1 && -z ${TRAINER_LAUNCH_ID:-} ]]; then
    echo "launch/multinode.sh --no_ssh: set TRAINER_LAUNCH_ID to one value on every node (e.g. the job id)," \
      "or the nodes would name different run directories" >&2
    exit 2
  fi
  export TRAINER_LAUNCH_ID=${TRAINER_LAUNCH_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
  cmd=("$deepspeed" --hostfile "$hostfile" --no_ssh --num_nodes "$num_nodes" --node_rank "$NODE_RANK"
    --master_addr "$master_addr" --master_port "$master_port")
  [[ -n ${GPUS_PER_NODE:-} ]] && cmd+=(--num_gpus "$GPUS_PER_NODE")
  cmd+=("${ds_extra[@]}" "${entry[@]}")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf 'TRAINER_LAUNCH_ID=%s' "$TRAINER_LAUNCH_ID"
    printf ' %q' "${cmd[@]}"
    echo
    exit 0
  fi
  exec "${cmd[@]}"
fi

# --- one node starts them all (pdsh over ssh, or mpirun) ---
export TRAINER_LAUNCH_ID=${TRAINER_LAUNCH_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
if [[ $launcher == openmpi && ${#rank_opts[@]} -gt 0 ]]; then
  # DeepSpeed's OpenMPI backend refuses --num_nodes/--num_gpus: mpirun takes the hosts and slots from the file.
  echo "launch/multinode.sh --launcher openmpi: NUM_NODES/GPUS_PER_NODE are not supported; edit the slots of $hostfile" >&2
  exit 2
fi

# The variables the other nodes need, as a DeepSpeed environment file (KEY=VALUE lines). DeepSpeed reads
# DS_ENV_FILE (default .deepspeed_env) joined to the home directory and to the current directory; an
# absolute path replaces both, so the user's own files are copied in first and keep working.
env_file=$(mktemp "${TMPDIR:-/tmp}/multinode-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
chmod 600 "$env_file"
ds_env_name=${DS_ENV_FILE:-.deepspeed_env}
seen=()
for dir in "$HOME" "$PWD"; do
  [[ $ds_env_name == /* ]] && f=$ds_env_name || f=$dir/$ds_env_name
  [[ -f $f && " ${seen[*]} " != *" $f "* ]] || continue
  seen+=("$f")
  grep -v '^[[:space:]]*$' "$f" >>"$env_file" || true  # DeepSpeed cannot parse blank lines
done
forward=(TRAINER_LAUNCH_ID)
for name in $(compgen -e); do
  case $name in
    *_API_KEY) ;;
    GLOO_* | NCCL_* | HF_* | TRANSFORMERS_* | WANDB_* | OMP_NUM_THREADS | TORCH_EXTENSIONS_DIR) forward+=("$name") ;;
  esac
done
# mpirun starts the ranks themselves (no deepspeed.launcher.launch), so they need the rendezvous address too.
[[ $launcher == openmpi ]] && { export MASTER_ADDR=$master_addr MASTER_PORT=$master_port; forward+=(MASTER_ADDR MASTER_PORT); }
# pdsh: this checkout's .venv/bin goes first on the remote PATH, for the tools ranks call (ninja builds
# DeepSpeed's JIT ops). DeepSpeed writes the value in double quotes, so the remote shell expands $PATH.
# (Not --venv_script: with it, DeepSpeed's clean-up on Ctrl-C no longer finds the remote processes.)
if [[ $launcher == pdsh && -d .venv/bin ]] && ! grep -q '^PATH=' "$env_file"; then
  echo "PATH=$PWD/.venv/bin:\$PATH" >>"$env_file"
fi
for name in "${forward[@]}" ${FORWARD_ENV:-}; do
  if [[ ! $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "launch/multinode.sh: FORWARD_ENV: '$name' is not a variable name" >&2
    exit 2
  fi
  [[ -n ${!name+set} ]] || continue
  value=${!name}
  if [[ $value == *$'\n'* ]]; then
    echo "launch/multinode.sh: cannot forward $name: its value spans lines" >&2
    exit 2
  fi
  echo "$name=$value" >>"$env_file"
done
export DS_ENV_FILE=$env_file

# pdsh hands the command to a shell on each node. DeepSpeed double-quotes an argument holding a space and
# nothing else, so `$`, quotes, brackets and the like would be read by that shell: escape them here so the
# overrides reach the trainer as typed (mpirun and --no_ssh pass arguments without a shell).
if [[ $launcher == pdsh ]]; then
  quoted=()
  for arg in "${entry[@]}"; do
    if [[ $arg == *" "* ]]; then
      arg=${arg//\\/\\\\}
      arg=${arg//\$/\\\$}
      arg=${arg//\`/\\\`}
      quoted+=("$arg")  # DeepSpeed wraps it in "..." and escapes its double quotes
    else
      quoted+=("$(printf '%q' "$arg")")
    fi
  done
  entry=("${quoted[@]}")
fi
cmd=("$deepspeed" --hostfile "$hostfile" --launcher "$launcher" --master_addr "$master_addr" --master_port "$master_port"
  "${rank_opts[@]}" "${ds_extra[@]}" "${entry[@]}")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf 'DS_ENV_FILE=%s' "$env_file"
  printf ' %q' "${cmd[@]}"
  echo
  sed 's/^/  forwarded: /' "$env_file"
  exit 0
fi

# Not exec: the environment file is removed when the launch ends. Signals reach deepspeed's runner, which
# stops the remote ranks (pdsh); under openmpi its children (mpirun) are signalled too.
"${cmd[@]}" &
ds_pid=$!
stop() {
  local kids
  kids=$(ps -o pid= --ppid "$ds_pid" 2>/dev/null | tr '\n' ' ' || true)
  kill -TERM "$ds_pid" 2>/dev/null || true
  # shellcheck disable=SC2086
  [[ $launcher == openmpi && -n ${kids// /} ]] && kill -TERM $kids 2>/dev/null || true
}
trap stop INT TERM HUP
rc=0
wait "$ds_pid" || rc=$?
while kill -0 "$ds_pid" 2>/dev/null; do  # a trapped signal interrupted wait; the launch is still ending
  rc=0
  wait "$ds_pid" || rc=$?
done
exit "$rc"
