#!/bin/bash
# Submit pretrain -> fine-tune -> evaluate as three jobs chained with --dependency=afterok, all
# tagged with one MLflow `pipeline` id. Run from the repository root:
#
#   slurm/pipeline.sh [PRETRAIN_CONFIG FINETUNE_CONFIG EVAL_CONFIG] [-- key=value ...]
#   slurm/pipeline.sh vit_l16.yaml vit_l16_ft384.yaml vit_l16_eval.yaml
#
# Overrides after -- go to every stage. $SBATCH_ARGS is added to every sbatch call
# (e.g. SBATCH_ARGS="--partition=gpu --account=vision").
set -euo pipefail
pretrain=${1:-vit_h14.yaml}
finetune=${2:-vit_h14_ft448.yaml}
evaluate=${3:-vit_h14_eval.yaml}
overrides=()
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--" ]; then overrides=("${@:i+1}"); break; fi
done
export VIT_PIPELINE_ID=${VIT_PIPELINE_ID:-pipeline-$(date +%Y%m%d-%H%M%S)}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs  # sbatch opens logs/%x-%j.out before a job starts
# shellcheck disable=SC2086
first=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} "$here/pretrain.sh" "$pretrain" "${overrides[@]}")
second=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} --dependency=afterok:$first "$here/finetune.sh" "$finetune" "${overrides[@]}")
third=$(sbatch --parsable --export=ALL ${SBATCH_ARGS:-} --dependency=afterok:$second "$here/evaluate.sh" "$evaluate" "${overrides[@]}")
echo "pipeline $VIT_PIPELINE_ID: pretrain $first -> finetune $second -> evaluate $third"
echo "$first $second $third"
