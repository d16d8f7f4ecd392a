#!/bin/bash
#SBATCH --job-name=vit-evaluate
#SBATCH --nodes=4
# one rank per GPU
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# decode workers + the rank itself
#SBATCH --cpus-per-task=14
#SBATCH --time=02:00:00
# SIGUSR1 to every rank before the limit (slurm/common.sh: 10% of it, at most 10 min): save, exit 75
# and come back to resume the checkpoint and MLflow run
#SBATCH --requeue
# a requeued job appends to its log
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Evaluation: sbatch slurm/evaluate.sh [CONFIG] [key=value ...]   (default CONFIG: vit_h14_eval.yaml)
# Run sbatch from the repository root. Override the resources on the sbatch line, e.g.
#   sbatch --nodes=1 slurm/evaluate.sh vit_l16_eval.yaml eval.use_ema=false
set -uo pipefail
source "${VIT_PIPELINE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_stage evaluate.py vit_h14_eval.yaml "$@"
