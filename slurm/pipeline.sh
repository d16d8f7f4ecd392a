#!/bin/bash
# Submit pretrain -> fine-tune -> evaluate as three jobs chained with --dependency=afterok, all
# tagged with one MLflow `pipeline` id. Run from the repository root:
#
#   slurm/pipeline.sh [--no-check] [--distill CONFIG] [PRETRAIN_CONFIG FINETUNE_CONFIG EVAL_CONFIG] [-- key=value ...]
#   slurm/pipeline.sh vit_l16.yaml vit_l16_ft384.yaml vit_l16_eval.yaml
#   slurm/pipeline.sh vit_h14_mae.yaml vit_h14_mae_ft.yaml vit_h14_mae_eval.yaml   # MAE, no labels to pretrain
#   slurm/pipeline.sh --distill vit_l16_distill.yaml     # and a student distilled from the fine-tuned H/14
#
# --distill CONFIG adds a fourth job after the fine-tune (its teacher): a training stage run with
# slurm/pretrain.sh's allocation, alongside the evaluation.
# Before submitting, each stage is dry-run (launch/*.py --dry-run) at the allocation its job will
# request: --nodes and --ntasks-per-node from $SBATCH_ARGS, else the stage script's #SBATCH lines.
# If one fails, nothing is submitted. --no-check skips this.
# Overrides after -- go to every stage. $SBATCH_ARGS is added to every sbatch call
# (e.g. SBATCH_ARGS="--partition=gpu --account=vision").
set -euo pipefail
check=1
distill=
while [ $# -gt 0 ]; do
  case "$1" in
    --no-check) check=0; shift ;;
    --distill) distill=$2; shift 2 ;;
    *) break ;;
  esac
done
configs=()
overrides=()
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--" ]; then overrides=("${@:i+1}"); break; fi
  configs+=("${!i}")
done
pretrain=${configs[0]:-vit_h14.yaml}
finetune=${configs[1]:-vit_h14_ft448.yaml}
evaluate=${configs[2]:-vit_h14_eval.yaml}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
PYTHON=${PYTHON:-$root/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

# sbatch_value NAME SCRIPT: --NAME from $SBATCH_ARGS (the last one given), else the script's default.
sbatch_value() {
  local value
  value=$(printf ' %s ' "${SBATCH_ARGS:-}" | grep -oE -- "--$1[= ][^ ]+" | tail -n 1 | sed -E "s/^--$1[= ]//" || true)
  [ -n "$value" ] || value=$(grep -oE "^#SBATCH --$1=[^ ]+" "$2" | head -n 1 | cut -d= -f2)
  echo "$value"
}

# dry_run SCRIPT LAUNCHER CONFIG [--after CONFIG ...]
dry_run() {
  local script=$here/$1 launcher=$2 config=$3
  shift 3
  echo "== dry run of $(basename "$script") at $(sbatch_value nodes "$script") node(s) x $(sbatch_value ntasks-per-node "$script") ranks"
  "$PYTHON" "$root/launch/$launcher" --config "$config" --dry-run --nodes "$(sbatch_value nodes "$script")" \
    --gpus-per-node "$(sbatch_value ntasks-per-node "$script")" "$@" "${overrides[@]}"
}

if [ "$check" = 1 ]; then
  failed=0
  dry_run pretrain.sh train.py "$pretrain" || failed=1
  dry_run finetune.sh train.py "$finetune" --after "$pretrain" || failed=1
  dry_run evaluate.sh evaluate.py "$evaluate" --after "$finetune" --after "$pretrain" || failed=1
  if [ -n "$distill" ]; then
    dry_run pretrain.sh train.py "$distill" --after "$finetune" --after "$pretrain" || failed=1
  fi
  if [ "$failed" = 1 ]; then
    echo "pipeline: a dry run found problems (above); nothing was submitted. Fix them, or pass --no-check." >&2
    exit 1
  fi
fi

export VIT_PIPELINE_ID=${VIT_PIPELINE_ID:-pipeline-$(date +%Y%m%d-%H%M%S)}
mkdir -p logs  # sbatch opens logs/%x-%j.out before a job starts
# shellcheck disable=SC2086
first=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} "$here/pretrain.sh" "$pretrain" "${overrides[@]}")
second=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} --dependency=afterok:$first "$here/finetune.sh" "$finetune" "${overrides[@]}")
third=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} --dependency=afterok:$second "$here/evaluate.sh" "$evaluate" "${overrides[@]}")
if [ -n "$distill" ]; then
  # shellcheck disable=SC2086
  fourth=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} --dependency=afterok:$second "$here/pretrain.sh" "$distill" "${overrides[@]}")
  echo "pipeline $VIT_PIPELINE_ID: pretrain $first -> finetune $second -> evaluate $third, distill $fourth"
  echo "$first $second $third $fourth"
else
  echo "pipeline $VIT_PIPELINE_ID: pretrain $first -> finetune $second -> evaluate $third"
  echo "$first $second $third"
fi
