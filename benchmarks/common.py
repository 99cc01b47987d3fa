"""Shared helpers for the benchmark scripts: timing, peak memory, machine description, tables.

Not a benchmark itself. Import it from a script in ``benchmarks/`` with::

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common

What is here:

- ``Timer`` (context manager, ``perf_counter`` wall seconds; ``sync_device`` waits for CUDA
  kernels first so GPU timings are real) and ``sync(device)``.
- Host memory: ``rss_mb()`` (current resident set), ``peak_rss_mb()`` (the process's peak since
  start, or since the last ``reset_peak_rss()``), ``children_peak_rss_mb()`` (largest peak of
  any waited-for child process). Peaks come from the kernel's high-water mark ``VmHWM`` in
  ``/proc/self/status``, which ``reset_peak_rss()`` resets (writing ``5`` to
  ``/proc/self/clear_refs``, Linux >= 4.0) so one process can measure the peak of each segment;
  where that is impossible, ``RssSampler`` (a thread that samples the RSS every few ms) gives
  the segment peak instead, and ``resource.getrusage`` the process-lifetime peak. ``psutil`` is
  used for the current RSS when installed, else ``/proc/self/statm``.
- GPU memory: ``reset_gpu_peak(device)`` / ``gpu_peak_mb(device)`` (``torch.cuda`` peak
  allocated; ``None`` on CPU).
- ``run_timed(cmd, ...)``: run a command in a subprocess, return wall seconds, exit status and
  that child's peak RSS (``os.wait4`` rusage), with stdout+stderr saved to a log file.
- ``machine_info()``: CPU model and count, load average, torch/numpy versions, threads, GPU.
- ``markdown_table(rows, columns)`` and ``write_results(name, markdown, data)``: write
  ``benchmarks/results/<name>.md`` and ``<name>.json`` atomically (temporary file + rename).
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
SCRATCH = os.path.join(HERE, ".scratch")

if REPO not in sys.path:
    sys.path.insert(0, REPO)

try:  # optional
    import psutil  # type: ignore
except Exception:  # pragma: no cover - psutil is optional
    psutil = None


# ----------------------------------------------------------------------------- timing
def sync(device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU or without torch)."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall, ``perf_counter``).

    ``device``: a CUDA device is synchronised at entry and exit so the time covers the GPU work.
    """

    def __init__(self, device=None):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self):
        if self.device is not None:
            sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device is not None:
            sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        return False


def median_time(fn, device=None, repeats: int = 3, warmup: int = 1, min_seconds: float = 0.0,
                max_repeats: int = 50) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (more, up to ``max_repeats``,
    until ``min_seconds`` have passed), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# ----------------------------------------------------------------------------- host memory
def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    if psutil is not None:
        return psutil.Process().memory_info().rss / 2 ** 20
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return float("nan")


def rss_breakdown_mb() -> dict:
    """Current ``{'anon', 'file', 'shmem'}`` resident MiB (``/proc/self/status``). Pages of a
    memory-mapped stack that were read count as ``file``: page cache the kernel can drop at
    any time, not memory the program holds; ``anon`` is the heap (arrays, tensors, objects)."""
    out = {}
    for key, field in (("anon", "RssAnon"), ("file", "RssFile"), ("shmem", "RssShmem")):
        v = _status_kb(field)
        out[key] = float("nan") if v is None else v / 1024.0
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False when not possible
    (then ``peak_rss_mb`` keeps reporting the lifetime peak: use :class:`RssSampler`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since start or the last
    :func:`reset_peak_rss` (``VmHWM``; lifetime ``ru_maxrss`` where /proc is missing)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


def children_peak_rss_mb() -> float:
    """Largest peak RSS (MiB) of any child process this process has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


class RssSampler:
    """Samples this process's RSS every ``interval_s`` in a thread: ``with RssSampler() as s:``
    then ``s.peak_mb`` (total) and ``s.peak_anon_mb`` (anonymous memory only, i.e. without the
    file-backed pages of memory maps). Misses spikes shorter than the interval; for the total,
    prefer the ``VmHWM`` reset where the kernel allows it (``reset_peak_rss``)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.peak_anon_mb = 0.0
        self._stop = threading.Event()

    def _sample(self):
        self.peak_mb = max(self.peak_mb, rss_mb())
        a = _status_kb("RssAnon")
        if a is not None:
            self.peak_anon_mb = max(self.peak_anon_mb, a / 1024.0)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False


class PeakMemory:
    """Peak host RSS (MiB) of a code segment: ``with PeakMemory() as m: ...`` then ``m.peak_mb``
    (total, exact via the ``VmHWM`` reset where possible: ``m.method``), ``m.peak_anon_mb``
    (anonymous memory, sampled every 5 ms: excludes page cache of memory-mapped files) and the GPU
    peak ``m.gpu_peak_mb`` when a CUDA ``device`` is given."""

    def __init__(self, device=None):
        self.device = device
        self.gpu_peak_mb = None

    def __enter__(self):
        self._hwm = reset_peak_rss() and _status_kb("VmHWM") is not None
        self.method = "VmHWM reset" if self._hwm else "sampled"
        self._sampler = RssSampler().__enter__()
        reset_gpu_peak(self.device)
        return self

    def __exit__(self, *exc):
        self._sampler.__exit__(*exc)
        self.peak_anon_mb = self._sampler.peak_anon_mb
        self.peak_mb = max(peak_rss_mb(), self._sampler.peak_mb) if self._hwm else self._sampler.peak_mb
        self.gpu_peak_mb = gpu_peak_mb(self.device)
        return False


# ----------------------------------------------------------------------------- GPU memory
def reset_gpu_peak(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def gpu_peak_mb(device) -> float | None:
    """Peak memory allocated by torch on a CUDA ``device`` since the last reset, MiB; None on CPU."""
    if device is None or not str(device).startswith("cuda"):
        return None
    import torch
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20


# ----------------------------------------------------------------------------- subprocesses
def run_timed(cmd, log_path: str | None = None, env: dict | None = None, cwd: str | None = None,
              timeout_s: float | None = None) -> dict:
    """Run ``cmd`` (list) and wait: ``{'rc', 'seconds', 'cpu_seconds', 'peak_rss_mb', 'log', 'timed_out'}``.

    stdout and stderr go to ``log_path`` (or are discarded). The peak RSS is that child's
    (with its own waited-for children), from ``os.wait4``, as is ``cpu_seconds`` (user + system:
    on a shared machine a fairer measure of the work done than wall seconds). ``timeout_s``: the child (its process
    group) is killed after that many seconds and ``timed_out`` is True.
    """
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        timed_out = False
        timer = None
        if timeout_s:
            def _kill():
                nonlocal timed_out
                timed_out = True
                try:
                    os.killpg(proc.pid, 9)
                except OSError:
                    pass
            timer = threading.Timer(timeout_s, _kill)
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if timer is not None:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            out.close()
    return {"rc": proc.returncode, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024.0,
            "log": log_path, "timed_out": timed_out, "cmd": " ".join(map(str, cmd))}


def tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict:
    """CPU, load, versions and GPU of this machine (for the header of every results table)."""
    info = {"when_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_gb"] = round(float(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except Exception:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:
        info["gpu"] = "unknown"
    info.update(engine_state())
    return info


def engine_state() -> dict:
    """git HEAD and a digest of the engine's sources (the engine changes while benchmarks run:
    results name the exact code they measured)."""
    import glob
    import hashlib
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(REPO, "scipion_gmmhet", "engine", "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            h.update(os.path.relpath(path, REPO).encode() + b"\0" + f.read())
    out = {"engine_sha1": h.hexdigest()[:12]}
    try:
        out["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "scipion_gmmhet/engine"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["engine_uncommitted_changes"] = bool(dirty)
    except Exception:
        pass
    return out


def machine_line(info: dict) -> str:
    return (f"{info['when_utc']}; CPU {info['cpu']} x{info['cpu_count']} (load average "
            f"{' / '.join(str(x) for x in info['load_avg_1_5_15'])}), {info.get('mem_total_gb', '?')} GB RAM; "
            f"GPU: {info.get('gpu', 'none')}; torch {info.get('torch', '?')} "
            f"({info.get('torch_threads', '?')} threads), numpy {info.get('numpy', '?')}, Python {info['python']}; "
            f"code: git {info.get('git_head', '?')}{' + uncommitted engine changes' if info.get('engine_uncommitted_changes') else ''}, "
            f"engine digest {info.get('engine_sha1', '?')}")


# ----------------------------------------------------------------------------- tables
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: list, columns: list) -> str:
    """``columns``: list of ``(key, header)``; values formatted compactly (floats to 3-4 digits)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


#: an absolute path up to a folder of a checkout of this repository (this one, a worktree, a clone)
_CHECKOUT_PREFIX = re.compile(r"(?<![\w.])/[^\s\"'|,;()`]*?/(?=(?:benchmarks|scipion_gmmhet|tests|docs|demo-output|\.venv|\.scipion)/)")
_TMP_PREFIX = re.compile(r"(?<![\w.])/tmp/")


def portable(text: str) -> str:
    """``text`` with machine paths made portable: a checkout's absolute prefix dropped (paths
    relative to the repository) and the temporary folder written ``$TMPDIR``, so a result file
    names no path of the machine that wrote it."""
    return _TMP_PREFIX.sub("$TMPDIR/", _CHECKOUT_PREFIX.sub("", text))


def _atomic_write(path: str, text: str) -> None:
    """Write ``text`` (made :func:`portable`) to ``path`` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(portable(text))
    os.replace(tmp, path)


def write_results(name: str, markdown: str, data: dict, out_dir: str | None = None) -> tuple[str, str]:
    """Write ``<out_dir>/<name>.md`` and ``<name>.json`` (default ``benchmarks/results``)."""
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, name + ".md"), os.path.join(out_dir, name + ".json")
    _atomic_write(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    _atomic_write(json_path, json.dumps(data, indent=1, default=_json_default) + "\n")
    return md_path, json_path


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except Exception:
        pass
    return str(o)


def disk_free_gb(path: str) -> float:
    import shutil
    p = path
    while not os.path.exists(p):
        p = os.path.dirname(p) or "."
    return shutil.disk_usage(p).free / 2 ** 30
