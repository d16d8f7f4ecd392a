"""Two SLURM nodes on one machine, each in its own network, UTS and mount namespace.

    head  (netns <p>h): the bridge, slurmctld, the mlflow server; clients run here
    node1 (netns <p>n1): eth0 10.X.Y.2, hostname vnode1, its own /etc/hosts, /dev/shm and slurmd
    node2 (netns <p>n2): eth0 10.X.Y.3, hostname vnode2, ...

The nodes reach each other and the head through veth pairs on a bridge inside the head
namespace, so no packet leaves the namespaces made here; the repository and the test's files
are shared, as a cluster filesystem would be. munged runs on the host as for the one-node
cluster (its socket is a file, seen from every namespace).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

HEAD, NODES = "vhead", ("vnode1", "vnode2")

SLURM_CONF = """ClusterName=vit2n
SlurmctldHost={head}({net}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={node1} NodeAddr={net}.2 {topology} State=UNKNOWN
NodeName={node2} NodeAddr={net}.3 {topology} State=UNKNOWN
PartitionName=ci Nodes={node1},{node2} Default=YES MaxTime=INFINITE State=UP
"""


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-1000:]}")
    return result


class TwoNodeCluster:
    def __init__(self, directory: Path):
        self.dir = directory
        tag = os.getpid() % 10000
        self.prefix = f"vt{tag}"
        self.net = f"10.{200 + tag % 50}.{tag % 250}"
        self.head_ns, self.node_ns = f"{self.prefix}h", {n: f"{self.prefix}n{i}" for i, n in enumerate(NODES, 1)}
        self.addr = {HEAD: f"{self.net}.1", NODES[0]: f"{self.net}.2", NODES[1]: f"{self.net}.3"}
        self.conf = directory / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- namespaces ---------------------------------------------------------------------------

    def create_network(self) -> None:
        """Three network namespaces; a bridge in the head one; a veth pair to each node."""
        for ns in (self.head_ns, *self.node_ns.values()):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        bridge = f"{self.prefix}br"
        sh("ip", "-n", self.head_ns, "link", "add", bridge, "type", "bridge")
        sh("ip", "-n", self.head_ns, "addr", "add", f"{self.addr[HEAD]}/24", "dev", bridge)
        sh("ip", "-n", self.head_ns, "link", "set", bridge, "up")
        for i, (node, ns) in enumerate(self.node_ns.items(), 1):
            outer = f"{self.prefix}v{i}"
            sh("ip", "-n", self.head_ns, "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.head_ns, "link", "set", outer, "master", bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in self.addr.items())
        for name in (HEAD, *NODES):
            (self.dir / f"hosts-{name}").write_text(hosts)

    def on(self, host: str, *cmd: str) -> list[str]:
        """``cmd`` run on ``host``: in its network namespace, with a UTS and mount namespace of its
        own, its hostname, its /etc/hosts bind-mounted and a fresh tmpfs /dev/shm (nodes only)."""
        ns = self.head_ns if host == HEAD else self.node_ns[host]
        setup = f"hostname {host} && mount --bind {self.dir}/hosts-{host} /etc/hosts"
        if host != HEAD:
            setup += " && mount -t tmpfs -o size=4g,mode=1777 shm /dev/shm"
        # nsenter rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup from slurmd.
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c", f'{setup} && exec "$@"',
                "sh", *cmd]

    def client(self, *cmd: str) -> list[str]:
        """A SLURM client command (sbatch, squeue, scontrol ...) from the head, where slurmctld is."""
        return ["nsenter", f"--net=/run/netns/{self.head_ns}", *cmd]

    # -- SLURM --------------------------------------------------------------------------------

    def start_slurm(self) -> None:
        for sub in ("state", *(f"spool-{n}" for n in NODES)):
            (self.dir / sub).mkdir(exist_ok=True)
        # One machine's topology for both nodes (slurmd -C: sockets, cores, threads), so that
        # task/affinity binds to cores that exist.
        probe = sh("slurmd", "-C").stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", probe.splitlines()[0]))
        topology = " ".join(f"{k}={fields[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                          "ThreadsPerCore")) + " RealMemory=8000"
        self.conf.write_text(SLURM_CONF.format(head=HEAD, net=self.net, dir=self.dir, node1=NODES[0], node2=NODES[1],
                                               topology=topology))
        sh(*self.on(HEAD, "slurmctld", "-f", str(self.conf)), env=self.env)
        for node in NODES:
            sh(*self.on(node, "slurmd", "-f", str(self.conf), "-N", node), env=self.env)
        deadline = time.time() + 60
        states = ""
        while time.time() < deadline:
            states = sh(*self.client("sinfo", "-h", "-N", "-o", "%N %T"), env=self.env, check=False).stdout
            if states.count("idle") == len(NODES):
                return
            time.sleep(0.5)
        logs = "\n".join((self.dir / f"slurmd-{n}.log").read_text()[-1500:] for n in NODES
                         if (self.dir / f"slurmd-{n}.log").exists())
        raise RuntimeError(f"the two SLURM nodes did not come up (sinfo: {states!r}):\n{logs}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons and whatever else runs in the namespaces, remove
        the namespaces (their veths and the bridge go with them)."""
        subprocess.run(self.client("scancel", "--user", "root"), env=self.env, capture_output=True)
        time.sleep(1)
        for ns in (*self.node_ns.values(), self.head_ns):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def check_can_namespace() -> str | None:
    """Why this sandbox cannot make the namespaces, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    probe = f"vtprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"ip netns add failed: {made.stderr.strip()}"
