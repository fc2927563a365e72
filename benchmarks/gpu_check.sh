#!/usr/bin/env bash
# One command that checks the trainer on a GPU and measures it (docs/gpu.md); under 8 minutes on one H100/H200:
#   1. the environment: GPU, driver, CUDA, torch, DeepSpeed
#   2. the gpu-marked tests (pytest -m gpu): nccl + bf16 training, flash attention, fused AdamW, the peak table
#   3. gpt3-1.3b in bf16 at sequence 2048 through the launcher (launch/local.sh 1) on the embedded default corpus
#   4. its tokens/s, MFU and peak memory beside the planner's prediction for the layout and Hugging Face's GPT-2
#      at the same shape and batch, with the ratio
#   5. with GPU_CHECK_OPTIONS=1, rows of speed options flipped from their defaults (and a profiled run) for
#      OPTION_STEPS steps at the same shape, while time is left (GPU_CHECK_DEADLINE seconds from the start)
#
#   bash benchmarks/gpu_check.sh                    # from the repository root, after `make gpu-venv`
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same steps with a tiny model on CPU (checks the script)
#
# GPU_CHECK_OUT: where the run and check.json go (default runs/gpu_check/<date>_<time>); PYTHON: the interpreter.
# Each step's whole output is kept in GPU_CHECK_OUT (*.log); the console shows the lines that matter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH" # the venv's deepspeed launcher
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TINY=${GPU_CHECK_TINY:-0}
OUT=${GPU_CHECK_OUT:-runs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
started=$SECONDS

# The data: the embedded default corpus with `make train`'s tokenizer (8192 tokens, which fit any model's vocabulary).
DATA=(data=pystdlib data.tokenizer.vocab_size=8192)
if [[ $TINY == 1 ]]; then
  MODEL=(model=gpt-tiny model.seq_len=128 parallel.precision=fp32 train.device=cpu)
  BATCH=(parallel.micro_batch=2 parallel.global_batch=4 train.steps=8 train.log_interval=2)
  HF_STEPS=5
  OPTION_STEPS=8
else
  # micro-batch 2 x accumulation 4: 16,384 tokens a step; the planner predicts ~57 GB on one GPU (ZeRO-0)
  MODEL=(model=gpt3-1.3b model.seq_len=2048 parallel.precision=bf16 train.device=cuda)
  BATCH=(parallel.micro_batch=2 parallel.global_batch=8 train.steps=40 train.log_interval=5)
  HF_STEPS=30
  OPTION_STEPS=20
fi
# Each entry is one row: its overrides, space-separated. The profile row's speed pays the profiler's overhead; it is
# there for the line that says how busy the GPU was (train.profile_*).
OPTIONS=(
  "speed.compile=true"
  "parallel.micro_batch=4"
  "speed.fused_loss=true"
  "train.profile_start=6 train.profile_steps=2"
  "speed.flat_optimizer=true"
)
# GPU_CHECK_ROWS: other rows instead, separated by '|' (e.g. GPU_CHECK_ROWS='speed.compile=true|parallel.micro_batch=4')
if [[ -n ${GPU_CHECK_ROWS:-} ]]; then IFS='|' read -r -a OPTIONS <<<"$GPU_CHECK_ROWS"; fi
QUIET=(train.eval_interval=0 train.eval_batches=1 train.save_interval=-1 logging.wandb.mode=disabled logging.progress=false)

step() { echo; echo "== $* ($((SECONDS - started)) s)"; }

step "environment"
"$PY" benchmarks/gpu_check.py env | tee "$OUT/environment.txt"

step "gpu-marked tests"
# Without a GPU they skip, each with its reason; the check goes on either way and reports the outcome.
tests_rc=0
# Only the files that hold gpu-marked tests: the rest of the suite may need packages a GPU image lacks.
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests)
if [[ ${GPU_CHECK_TESTS:-1} == 1 ]]; then # GPU_CHECK_TESTS=0: measurements only
  timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/pytest.txt" ||
    tests_rc=$?
fi

if [[ $TINY != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "torch sees no GPU: install with 'make gpu-venv' on a GPU machine, or GPU_CHECK_TINY=1 for the CPU dry run"
  exit 1
fi

step "prepare the default corpus (cached after the first time)"
timeout 180 "$PY" -m trainer.prepare "${DATA[@]}" "${MODEL[@]}" 2>&1 | grep -v "WARNING" | tail -3

# train NAME SECONDS [overrides...]: one run through the launcher into $OUT/NAME, its whole output in $OUT/NAME.log
train() {
  local name=$1 limit=$2
  shift 2
  TRAINER_LAUNCH_ID=gpu_check MASTER_PORT=${MASTER_PORT:-29517} timeout "$limit" launch/local.sh 1 \
    "${MODEL[@]}" "${DATA[@]}" "${BATCH[@]}" "${QUIET[@]}" "$@" "hydra.run.dir=$OUT/$name" 2>&1 |
    tee "$OUT/$name.log" | grep -E "^(model|peak|step|done|config error)|Error" || true
  test -s "$OUT/$name/metrics.jsonl" || { echo "the run $name wrote no metrics (see $OUT/$name.log)" >&2; return 1; }
}

step "train ${MODEL[0]} through launch/local.sh 1"
train train 300 | tee "$OUT/train.txt"

step "measured vs planner vs Hugging Face GPT-2"
timeout 240 "$PY" benchmarks/gpu_check.py report "$OUT/train" --hf-steps "$HF_STEPS" --out "$OUT/check.json" 2>&1 |
  grep -v "WARNING" | tee "$OUT/report.md"

if [[ ${GPU_CHECK_OPTIONS:-0} == 1 ]]; then
  step "speed options, each flipped from its default, $OPTION_STEPS steps"
  echo "| option | tokens/s | MFU | peak memory (GB) | tokens/s vs the defaults |"
  echo "| --- | --- | --- | --- | --- |"
  for option in "${OPTIONS[@]}"; do
    if ((SECONDS - started > ${GPU_CHECK_DEADLINE:-600} - 90)); then
      echo "$option: skipped, under 90 s left before GPU_CHECK_DEADLINE"
      continue
    fi
    name=option_${option//[^a-z0-9_]/_}
    # shellcheck disable=SC2086 # an entry's overrides are separate words
    train "$name" 150 $option "train.steps=$OPTION_STEPS" >/dev/null || continue
    "$PY" benchmarks/gpu_check.py numbers "$OUT/$name" "$OUT/train" --label "$option"
  done | tee "$OUT/options.md"
  grep -h "^profile of steps" "$OUT"/option_*.log || true
fi

step "done: pytest -m gpu exit code $tests_rc; results in $OUT"
exit "$tests_rc"
