"""The SLURM scripts' own logic, without a controller: the multi-node tracking warning."""

import os
import subprocess
import sys

from tests.helpers import ROOT


def check_tracking(*args: str, **env: str) -> str:
    script = f'source slurm/common.sh 2>/dev/null; check_tracking {" ".join(args)}'
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SLURM_JOB_NUM_NODES")}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**clean, "PYTHON": sys.executable, "VIT_PIPELINE_ROOT": str(ROOT), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_multi_node_jobs_are_warned_off_sqlite_tracking():
    config = "configs/demo/pretrain.yaml"
    warned = check_tracking(config, SLURM_JOB_NUM_NODES="2")
    assert "2 nodes track to sqlite:///mlflow.db" in warned and "MLFLOW_TRACKING_URI" in warned
    assert check_tracking(config, SLURM_JOB_NUM_NODES="1") == ""  # one node: the default is fine
    assert check_tracking(config, SLURM_JOB_NUM_NODES="2", MLFLOW_TRACKING_URI="http://login-node:5000") == ""
    assert check_tracking(config, "run.tracking_uri=http://login-node:5000", SLURM_JOB_NUM_NODES="2") == ""
