"""scripts/bench_swap.py end to end on a tiny model (--quick): it runs all four configurations, prints the table
and the checks, and refuses bad arguments with exit code 2 and one line. In a subprocess: the script sets
OMP_WAIT_POLICY before torch loads, which only a fresh process honours."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_swap.py"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_quick_run_on_a_tiny_model() -> None:
    from tests.tiny_models import tiny_model_dir

    proc = run("--quick", "--model", str(tiny_model_dir("llama")), "--num-threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("command: python ")
    assert "torch threads" in out
    for label in ("(a) recompute, no host tier", "(b) recompute + host tier", "(c) swap", "(d) auto"):
        assert f"| {label}" in out
    assert "| P50 / P99 TTFT (ms) |" in out and "| copies in:" in out
    # A deterministic engine gives every configuration the same tokens, greedy or seeded.
    assert "output check: identical across configurations" in out
    preemptions = [int(n) for n in re.findall(r"requests in [\d.]+ s, (\d+) preemptions", out)]
    assert len(preemptions) == 4 and sum(preemptions) > 0  # the pool is small enough to force them
    assert out.count("invariants ok") == 4
    assert "(i) " in out and "(ii) P99 TTFT" in out


def test_bad_arguments_exit_2_with_one_line() -> None:
    for args in (["--clients", "0"], ["--think-time", "nan"], ["--no-such-flag"]):
        proc = run(*args, timeout=60)
        assert proc.returncode == 2, args
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("bench_swap.py: error: ")


def test_pool_too_small_for_the_workload_is_refused() -> None:
    from tests.tiny_models import tiny_model_dir

    proc = run("--quick", "--model", str(tiny_model_dir("llama")), "--num-kv-blocks", "2", timeout=60)
    assert proc.returncode == 2
    assert "raise --num-kv-blocks" in proc.stderr
