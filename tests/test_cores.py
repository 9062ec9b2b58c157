"""The core count under a cgroup CPU quota (kernels/cores.py), read from fake cgroup trees: v2
cpu.max with its ancestors, v1 cfs quota/period under a combined mount, and every way the files
can be missing or malformed (all of which mean: no limit)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.kernels import cores


def tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    """A fake /sys/fs/cgroup under tmp_path/root and a fake /proc/self/cgroup."""
    root = tmp_path / "root"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "cgroup"
    proc.write_text(self_cgroup)
    return str(root), str(proc)


@pytest.fixture
def many_cores(monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: 8)


def test_v2_quota(tmp_path, many_cores):
    args = tree(tmp_path, "0::/app.slice/job\n", {"app.slice/job/cpu.max": "150000 100000\n",
                                                  "app.slice/cpu.max": "max 100000\n"})
    assert cores.cpu_quota(*args) == 1.5
    assert cores.available_cores(*args) == 2                 # rounded up


def test_v2_ancestor_binds(tmp_path, many_cores):
    args = tree(tmp_path, "0::/a/b\n", {"a/b/cpu.max": "400000 100000", "a/cpu.max": "100000 100000",
                                        "cpu.max": "max 100000"})
    assert cores.cpu_quota(*args) == 1.0
    assert cores.available_cores(*args) == 1


def test_v2_no_limit(tmp_path, many_cores):
    args = tree(tmp_path, "0::/a\n", {"a/cpu.max": "max 100000"})
    assert cores.cpu_quota(*args) is None
    assert cores.available_cores(*args) == 8


def test_quota_above_affinity_keeps_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: 2)
    args = tree(tmp_path, "0::/a\n", {"a/cpu.max": "800000 100000"})
    assert cores.available_cores(*args) == 2


def test_v1_combined_mount(tmp_path, many_cores):
    args = tree(tmp_path, "12:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
                {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
                 "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
                 "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
                 "cpuset/cpuset.cpus": "0-7"})
    assert cores.cpu_quota(*args) == 0.5
    assert cores.available_cores(*args) == 1                 # never below one thread


def test_v1_host_path_falls_back_to_the_mount(tmp_path, many_cores):
    # inside a container without a cgroup namespace: the path is the host's, the mount is ours
    args = tree(tmp_path, "4:cpu,cpuacct:/docker/abc\n",
                {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"})
    assert cores.cpu_quota(*args) == 2.0


def test_v1_unlimited(tmp_path, many_cores):
    args = tree(tmp_path, "4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cores.cpu_quota(*args) is None


@pytest.mark.parametrize("cpu_max", ["", "junk", "100000", "0 100000", "100000 0", "-5 100000", "1e5 1e5",
                                     "100000 100000 7", "\xff\xfe"])
def test_malformed_means_no_limit(tmp_path, many_cores, cpu_max):
    args = tree(tmp_path, "0::/a\n", {"a/cpu.max": cpu_max})
    assert cores.cpu_quota(*args) is None
    assert cores.available_cores(*args) == 8


@pytest.mark.parametrize("self_cgroup", ["", "garbage", "0::relative\n", "::::\n", "4:cpu:\n"])
def test_malformed_self_cgroup(tmp_path, many_cores, self_cgroup):
    args = tree(tmp_path, self_cgroup, {"cpu.max": "100000 100000", "cpu/cpu.cfs_quota_us": "100000",
                                        "cpu/cpu.cfs_period_us": "100000"})
    assert cores.cpu_quota(*args) is None


def test_missing_files(tmp_path, many_cores):
    assert cores.cpu_quota(str(tmp_path / "nowhere"), str(tmp_path / "nothing")) is None
    args = tree(tmp_path, "0::/a\n4:cpu:/a\n", {})
    assert cores.cpu_quota(*args) is None
    assert cores.available_cores(*args) == 8


def test_hybrid_v1_and_v2_smallest_wins(tmp_path, many_cores):
    args = tree(tmp_path, "0::/a\n4:cpu:/a\n", {"a/cpu.max": "300000 100000", "cpu/cpu.cfs_quota_us": "-1",
                                               "cpu/cpu.cfs_period_us": "100000", "cpu/a/cpu.cfs_quota_us": "150000",
                                               "cpu/a/cpu.cfs_period_us": "100000"})
    assert cores.cpu_quota(*args) == 1.5


def test_quota_in_bench_words(monkeypatch):
    from tinyllm.benchmark import threads_in_words
    from tinyllm.kernels import numba_cpu
    backend = numba_cpu.NumbaBackend(threads=1)
    backend.cpu_quota = 1.0
    assert "a cgroup CPU quota of 1 CPU" in threads_in_words(backend)
    backend.cpu_quota = 1.5
    assert "a cgroup CPU quota of 1.5 CPUs" in threads_in_words(backend)
    backend.cpu_quota = None
    assert "quota" not in threads_in_words(backend)


def test_real_cgroup_quota_sets_default_threads():
    """In a real v1 cpu group with a 1-CPU quota, where this machine lets the test make one."""
    group = Path("/sys/fs/cgroup/cpu/tinyllm-test")
    try:
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
    except OSError:
        pytest.skip("no writable cgroup v1 cpu hierarchy here")
    code = ("import os, sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid()));"
            "from tinyllm.kernels import numba_cpu; b = numba_cpu.NumbaBackend(); print(b.threads, b.cpu_quota)")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(group)], capture_output=True, text=True, timeout=120)
    finally:
        try:
            group.rmdir()
        except OSError:
            pass
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1.0"]
