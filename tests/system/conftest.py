"""A real 1-node SLURM cluster on loopback: munged, slurmctld and slurmd, started per session."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port


def _ensure_slurm_installed() -> str | None:
    """Install Debian's slurm-wlm and munge (and iproute2, for the two-node cluster) if missing;
    the reason when that cannot be done."""
    if shutil.which("slurmctld") and shutil.which("munged") and shutil.which("ip"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm is not installed and this user cannot apt-get install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge", "iproute2"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"{' '.join(cmd)} failed: {result.stderr[-500:]}"
    return None


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    for path in ("/run/munge", "/var/lib/munge", "/var/log/munge", "/etc/munge"):
        os.makedirs(path, exist_ok=True)
        shutil.chown(path, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


SLURM_CONF = """ClusterName=vitci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Yields the environment (with SLURM_CONF) under which sbatch talks to the cluster."""
    reason = _ensure_slurm_installed()
    if reason:
        pytest.skip(f"no SLURM controller can start here: {reason}")
    _start_munge()
    directory = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (directory / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=directory, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the SLURM node did not come up (state "
                        f"'{state}'):\n{(directory / 'slurmd.log').read_text()[-2000:]}")
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for daemon in ("slurmd", "slurmctld"):
            pid_file = directory / f"{daemon}.pid"
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], capture_output=True)
