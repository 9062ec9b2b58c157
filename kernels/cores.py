"""How many cores this process may use: its CPU affinity, capped by its cgroup's CPU quota.

A container started with ``docker run --cpus 1`` or a systemd unit with ``CPUQuota=100%`` sees
every core of the host in its affinity mask, but the kernel lets it run only ``quota / period``
CPUs' worth per period and stops it for the rest. Threads beyond the quota then wait at every
barrier of every parallel region for a stopped sibling: on 2 cores under a 1-CPU quota, 2
threads decoded a 1.1B model at 19.8 tok/s and 1 thread at 31.7 (BENCHMARKS.md). So the
default count starts from the quota, rounded up (1.5 CPUs: 2 threads, as Go and the JVM do).

Where the quota lives (read, never written; anything unreadable or malformed means no limit):

- cgroup v2: ``/proc/self/cgroup`` has ``0::/path``; ``<root>/path/cpu.max`` holds
  ``"<quota> <period>"`` or ``"max <period>"``. A parent's limit binds its children, so every
  ancestor up to the root is read and the smallest quota wins.
- cgroup v1: a line ``N:cpu,cpuacct:/path`` names the cpu controller's hierarchy, mounted at
  ``<root>/cpu`` (or ``cpu,cpuacct``), with ``cpu.cfs_quota_us`` (-1: none) and
  ``cpu.cfs_period_us``. In a container without a cgroup namespace the path is the host's and
  the mount is the container's own group, so a path that is not there falls back to the mount.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"


def affinity_cores() -> int:
    """The cores the scheduler may run this process on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_cores(root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP) -> int:
    """Affinity cores, at most the cgroup quota rounded up; at least 1."""
    quota = cpu_quota(root, self_cgroup)
    cores = affinity_cores()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cpu_quota(root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP) -> float | None:
    """The CPUs' worth of time this process's cgroups allow (e.g. 1.5), or None: no quota."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if hierarchy == "0" and controllers == "":
            limits += (_v2_limit(Path(root) / d) for d in _ancestors(path))
        elif "cpu" in controllers.split(","):
            mount = _v1_mount(Path(root))
            if mount is not None:
                dirs = [mount / d for d in _ancestors(path) if (mount / d).is_dir()] or [mount]
                limits += (_v1_limit(d) for d in dirs)
    limits = [q for q in limits if q is not None]
    return min(limits) if limits else None


def _ancestors(path: str) -> list[str]:
    """"/a/b" -> ["a/b", "a", ""]: a cgroup and its parents, relative to the mount."""
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _v1_mount(root: Path) -> Path | None:
    """The cpu controller's v1 hierarchy: <root>/cpu or the mount that names cpu among others."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:
        if "cpu" in name.split(",") and (root / name / "cpu.cfs_quota_us").is_file():
            return root / name
    return None


def _v2_limit(group: Path) -> float | None:
    fields = _read(group / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_limit(group: Path) -> float | None:
    return _ratio(_read(group / "cpu.cfs_quota_us"), _read(group / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str) -> float | None:
    """quota / period for two positive integers; None for -1, junk or zero."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""
