# Sourced by the stage scripts: environment and one srun-launched stage with requeue on preemption.
#
# sbatch runs a copy of the script from its spool directory, so the repository is the directory
# sbatch was called from (run sbatch from the repository root), or $VIT_PIPELINE_ROOT.
REPO=${VIT_PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
mkdir -p logs
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3   # e.g. inside the Docker image
EXIT_PREEMPTED=75                    # the trainer saved on SIGUSR1/SIGTERM: requeue the job

# Rendezvous without ssh or a hostfile: rank 0 lives on the first node of the allocation, and the
# ranks themselves come from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
# One tag shared by the stages of a pipeline (slurm/pipeline.sh sets it); a lone job uses its id.
export VIT_PIPELINE_ID=${VIT_PIPELINE_ID:-slurm-$SLURM_JOB_ID}

# CPUs: since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; without this a
# rank and all its decode workers would share one core. Each rank is bound to its own cores,
# tasks filling one socket before the next (block:block), so on a 2-socket 8-GPU node ranks
# 0-3 sit on the socket next to GPUs 0-3. The ranks set their intra-op threads to their cores
# less data.num_workers (OMP_NUM_THREADS, if set, wins) and warn when the workers alone take
# them all. GPUs: every rank sees its node's GPUs and takes cuda:LOCAL_RANK, as DeepSpeed does
# (srun --gpu-bind would renumber each rank's GPU to 0). Each run writes ranks.json: the host,
# local rank, cores, threads and device of every rank. Override with VIT_CPU_BIND=none etc.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
SRUN_BINDING=(--cpu-bind="${VIT_CPU_BIND:-cores}" --distribution="${VIT_DISTRIBUTION:-block:block}")
# NCCL: these are the usual settings for InfiniBand clusters; adjust to your fabric.
#   NCCL_IB_HCA=mlx5            use the InfiniBand HCAs
#   NCCL_SOCKET_IFNAME=^lo,docker   bootstrap over a real interface, never loopback or docker
#   NCCL_ASYNC_ERROR_HANDLING=1 (TORCH_NCCL_ASYNC_ERROR_HANDLING in newer torch): a hung
#                               collective raises instead of blocking the job until its limit
#   NCCL_DEBUG=WARN             INFO when debugging topology or hangs
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# check_tracking CONFIG [key=value ...]: warn when a multi-node job would track to an sqlite file,
# which sits on a network filesystem on most clusters (docs/tracking.md: "Tracking on a cluster").
check_tracking() {
  [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] || return 0
  local uri
  uri=$("$PYTHON" -c 'import sys; from pipeline.config import load_config; from pipeline.tracking import tracking_uri
print(tracking_uri(load_config(sys.argv[1], sys.argv[2:]).run.tracking_uri))' "$@" 2>/dev/null) || return 0
  case "$uri" in
    sqlite:*) echo "warning: $SLURM_JOB_NUM_NODES nodes track to $uri: sqlite on a network filesystem can corrupt" \
                   "under a concurrent reader; run an mlflow server and export MLFLOW_TRACKING_URI=http://HOST:5000" \
                   "(docs/tracking.md: Tracking on a cluster)" ;;
  esac
}

# seconds D-HH:MM:SS|HH:MM:SS|MM:SS: squeue's time format in seconds; fails on UNLIMITED.
seconds() {
  local t=$1 days=0 total=0 part
  [[ $t =~ ^[0-9:-]+$ ]] || return 1
  if [[ $t == *-* ]]; then days=${t%%-*}; t=${t#*-}; fi
  IFS=: read -ra parts <<< "$t"
  for part in "${parts[@]}"; do total=$((total * 60 + 10#$part)); done
  echo $((days * 86400 + total))
}

# signal_before_limit: SIGUSR1 to every rank (scancel --signal: the job's steps, not this shell)
# ahead of the time limit by 10% of the limit, at most 600 s, so that the ranks save and the job
# is requeued. A fixed #SBATCH --signal=USR1@600 fires at once in a job of 10 minutes or less.
# Prints the timer's pid (none for a job without a limit).
signal_before_limit() {
  local left limit lead
  left=$(seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L)") || return 0
  limit=$(seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %l)") || return 0
  lead=$((limit / 10 < 600 ? limit / 10 : 600))
  echo "[$(date -Is)] time limit ${limit} s, ${left} s left: SIGUSR1 to the ranks ${lead} s before it" >&2
  (sleep $((left > lead ? left - lead : 0)) && scancel --signal=USR1 "$SLURM_JOB_ID") > /dev/null 2>&1 &
  echo $!
}

# run_stage SCRIPT DEFAULT_CONFIG [CONFIG] [key=value ...]
run_stage() {
  local script=$1 config=$2
  shift 2
  if [ $# -gt 0 ] && [[ $1 != *=* ]]; then config=$1; shift; fi
  check_tracking "$config" "$@"
  echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
       "$SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT, pipeline $VIT_PIPELINE_ID"
  local status=0
  # Rank 0 writes this file once every rank has stopped after a preemption signal (training: after
  # the save). srun's own exit status is not enough: --kill-on-bad-exit cancels the other ranks
  # when the first exits 75.
  export VIT_PREEMPTED_FILE="$REPO/logs/.preempted-$SLURM_JOB_ID"
  rm -f "$VIT_PREEMPTED_FILE"
  local timer
  timer=$(signal_before_limit)
  # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others hanging.
  srun --kill-on-bad-exit=1 "${SRUN_BINDING[@]}" "$PYTHON" "launch/$script" --config "$config" "$@" || status=$?
  [ -n "$timer" ] && kill "$timer" 2> /dev/null
  if [ "$status" -eq "$EXIT_PREEMPTED" ] || [ -f "$VIT_PREEMPTED_FILE" ]; then
    rm -f "$VIT_PREEMPTED_FILE"
    echo "[$(date -Is)] preempted (what was worth keeping is saved): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$status"
}
