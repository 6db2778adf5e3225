"""The busy-machine check of the benchmarks, and the console helpers shared with `drift sim`."""

from __future__ import annotations

from pathlib import Path

from drift_agent.bench.console import format_rate, make_console
from drift_agent.bench.machine import MachineLoad, MachineMonitor, read_cpu_times


def test_read_cpu_times_parses_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 10 0 5 30 0 0\ncpu0 50 2 25 400 5 0 2 15 0 0\n")
    assert read_cpu_times(stat) == (30, 1000)
    assert read_cpu_times(tmp_path / "missing") is None
    stat.write_text("intr 1 2 3\n")
    assert read_cpu_times(stat) is None


def test_an_idle_machine_gets_no_warning() -> None:
    ticks = iter([(0, 1000), (10, 2000)])  # 1% stolen
    with MachineMonitor(cpu_times=lambda: next(ticks), loadavg=lambda: 3.0, cpus=8) as monitor:
        pass
    assert monitor.result == MachineLoad(8, 3.0, 0.01)
    assert not monitor.result.busy and monitor.result.warning() is None
    assert monitor.result.to_dict() == {"cpus": 8, "max_load_1m": 3.0, "steal_fraction": 0.01, "busy": False}


def test_load_above_the_cpu_count_or_stolen_time_is_reported() -> None:
    loads = iter([2.0, 12.5])
    with MachineMonitor(cpu_times=lambda: None, loadavg=lambda: next(loads), cpus=8) as monitor:
        pass
    result = monitor.result
    assert result is not None and result.busy and result.steal_fraction is None
    text = result.warning("the ratio")
    assert text is not None and "load average up to 12.5 on 8 CPUs" in text and "the ratio" in text
    ticks = iter([(0, 1000), (200, 2000)])
    with MachineMonitor(cpu_times=lambda: next(ticks), loadavg=lambda: None, cpus=8) as monitor:
        pass
    assert monitor.result is not None and "20% of CPU time stolen" in (monitor.result.warning() or "")


def test_the_monitor_samples_during_the_run() -> None:
    import time

    loads = [1.0]
    monitor = MachineMonitor(interval_s=0.01, cpu_times=lambda: None, loadavg=lambda: loads[-1], cpus=4)
    with monitor:
        loads.append(9.0)  # a spike in the middle of the run...
        time.sleep(0.1)
        loads.append(1.0)  # ...that is over by the end
    assert monitor.result is not None and monitor.result.max_load_1m == 9.0


def test_format_rate_rounds_to_three_digits_without_exponent() -> None:
    assert [format_rate(r) for r in (11.313708, 0.5, 40.0, 1234.5, 0.0123456, float("inf"), 0.0)] == [
        "11.3",
        "0.5",
        "40",
        "1234",
        "0.0123",
        "inf",
        "0",
    ]


def test_a_piped_console_does_not_wrap_at_80_columns(capsys, monkeypatch) -> None:
    from rich.table import Table

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    for name in ("policy", "rate", "attainment %", "goodput req/s", "P90 TTFT ms", "P90 TPOT ms", "P99 ITL"):
        table.add_column(name)
    table.add_column("throughput req/s")
    table.add_row("chunked", "1", "100.0", "1.00", "10.0", "1.0", "1.0", "1.00")
    console = make_console()
    console.print(table)
    console.print("a message " * 20)
    out = capsys.readouterr().out
    assert "throughput req/s" in out and "a message " * 20 in out.replace("\n", "")
    assert "a message " * 19 in out.splitlines()[-1]
