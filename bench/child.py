"""One measurement in a fresh process: the child-process set-up every bench script that needs one shares.

A row of a benchmark runs in its own process, so that its peak RSS (``ru_maxrss``) is its own and nothing a
previous row imported, cached or compiled carries over. The script is its own child: the parent calls
:func:`run_child`, which starts ``python -m bench.<script> --child '<spec as JSON>'`` in the repository root
and reads back the result; the script's ``main`` declares the option with :func:`add_child_option` and,
when it is given, hands it to :func:`serve_child`, which calls the script's measuring function with the
spec and prints what it returns as the last line ``RESULT <JSON>``. In the child, :func:`peak_rss_gib` and
:func:`peak_rss_mib` read the process's peak RSS.

    def measure(spec: dict) -> dict: ...          # runs in the child

    def main():
        parser = argparse.ArgumentParser()
        add_child_option(parser)
        args = parser.parse_args()
        if args.child:
            return serve_child(args.child, measure)
        run = run_child("bench.my_script", {"row": "a"})   # run.result is measure's dict
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import REPO

__all__ = [
    "RESULT_PREFIX",
    "ChildFailed",
    "ChildRun",
    "add_child_option",
    "serve_child",
    "run_child",
    "peak_rss_gib",
    "peak_rss_mib",
    "proc_status_kib",
    "available_gib",
]

#: the child's last line of output that carries its result
RESULT_PREFIX = "RESULT "


class ChildFailed(RuntimeError):
    """A measurement's process failed or printed no result; the message holds the command and its output's end."""


@dataclass
class ChildRun:
    """What :func:`run_child` saw: the child's result (``{"error": ...}`` when it gave none), its output, its
    exit status (None: killed by :func:`run_child`), seconds from start to exit, and the peak RSS seen while
    polling it (GiB, 0.0 when it ended before the first poll)."""

    result: dict[str, Any]
    log: str
    returncode: int | None
    seconds: float
    polled_peak_rss_gib: float


def add_child_option(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--child SPEC_JSON`` option by which :func:`run_child` starts the script as a child."""
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def serve_child(spec_json: str, measure: Callable[[dict], dict]) -> int:
    """In the child: ``measure(spec)``, printed as the last line ``RESULT <JSON>``; returns the exit status 0.

    An exception in ``measure`` ends the child with a traceback and a non-zero status, which the parent sees.
    """
    result = measure(json.loads(spec_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def proc_status_kib(field: str, pid: int | str = "self") -> int:
    """A ``/proc/<pid>/status`` field in KiB (``VmHWM``: peak RSS, ``VmRSS``); 0 when the process or field is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def available_gib() -> float:
    """The host's ``MemAvailable``, GiB."""
    with open("/proc/meminfo", encoding="utf-8") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def peak_rss_gib(children: bool = False) -> float:
    """This process's peak RSS (``ru_maxrss``), GiB to 2 decimals; ``children``: the largest of its waited-for
    children's (DataLoader workers)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 2**20, 2)  # KiB on Linux


def peak_rss_mib() -> int:
    """This process's peak RSS (``ru_maxrss``), MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def _collect(stream: Any, into: list[str], echo: Any | None) -> None:
    """Read ``stream`` line by line into ``into``, copying each line but the result line to ``echo``."""
    for line in stream:
        into.append(line)
        if echo is not None and not line.startswith(RESULT_PREFIX):
            echo.write(line)
            echo.flush()


def run_child(
    module: str,
    spec: dict[str, Any],
    timeout: float | None = None,
    min_available_gib: float | None = None,
    check: bool = False,
    echo: bool = False,
    poll_s: float = 0.5,
) -> ChildRun:
    """``python -m <module> --child '<spec>'`` in a fresh process, in the repository root; its result read back.

    The child gets the repository first on ``PYTHONPATH`` and ``PYTHONWARNINGS=ignore``; its output is
    captured (and, with ``echo``, shown as it comes). It is stopped (killed) after ``timeout`` seconds, or when
    the host's available memory falls below ``min_available_gib`` (the peak RSS seen until then is recorded);
    either is its result's ``error``.

    Args:
        module: the script, e.g. ``"bench.compare"``; its ``main`` serves ``--child`` with :func:`serve_child`.
        spec: what the child measures (JSON-able).
        timeout: seconds before the child is stopped; None: no limit.
        min_available_gib: stop the child when the host's ``MemAvailable`` falls below this; None: never.
        check: raise :class:`ChildFailed` unless the child exits 0 with a result.
        echo: also copy the child's output to this process's stdout and stderr as it comes (progress lines).
        poll_s: seconds between looks at the child (its VmHWM, the host's memory, the clock).

    Raises:
        ChildFailed: with ``check``: the child failed, was stopped or printed no result.
    """
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=pythonpath)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace"
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=_collect, args=(proc.stdout, out, sys.stdout if echo else None), daemon=True),
        threading.Thread(target=_collect, args=(proc.stderr, err, sys.stderr if echo else None), daemon=True),
    ]
    for reader in readers:
        reader.start()
    stopped, peak_kib = None, 0
    while True:
        try:
            proc.wait(timeout=poll_s)
            break
        except subprocess.TimeoutExpired:
            peak_kib = max(peak_kib, proc_status_kib("VmHWM", proc.pid))
            if timeout is not None and time.perf_counter() - start > timeout:
                stopped = {"error": f"timed out after {timeout} s"}
            elif min_available_gib is not None and available_gib() < min_available_gib:
                stopped = {
                    "error": f"stopped: the host's available memory fell below {min_available_gib} GiB",
                    "peak_rss_gib_when_stopped": round(peak_kib / 2**20, 2),
                }
            if stopped:
                proc.kill()
                proc.wait()
                break
    seconds = time.perf_counter() - start
    for reader in readers:
        reader.join()
    stdout, stderr = "".join(out), "".join(err)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if stopped:
        result = stopped
    elif lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    else:
        result = {"error": f"the child process ended with exit code {proc.returncode}, no result"}
    returncode = None if stopped else proc.returncode
    if check and (returncode != 0 or not lines):
        raise ChildFailed(f"{' '.join(cmd)}\nexit {returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}")
    return ChildRun(result, stdout + stderr, returncode, seconds, round(peak_kib / 2**20, 2))
