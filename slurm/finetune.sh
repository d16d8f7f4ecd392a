#!/bin/bash
#SBATCH --job-name=vit-finetune
#SBATCH --nodes=4
# one rank per GPU
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# decode workers + the rank itself
#SBATCH --cpus-per-task=14
#SBATCH --time=24:00:00
# SIGUSR1 to every rank before the limit (slurm/common.sh: 10% of it, at most 10 min): save, exit 75
# and come back to resume the checkpoint and MLflow run
#SBATCH --requeue
# a requeued job appends to its log
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# High-resolution fine-tuning: sbatch slurm/finetune.sh [CONFIG] [key=value ...]   (default CONFIG: vit_h14_ft448.yaml)
# Run sbatch from the repository root. Override the resources on the sbatch line, e.g.
#   sbatch --nodes=8 slurm/finetune.sh vit_l16_ft384.yaml optim.lr=5e-5
set -uo pipefail
source "${VIT_PIPELINE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_stage train.py vit_h14_ft448.yaml "$@"
