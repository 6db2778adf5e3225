"""`drift sim run|plan|presets` through the top-level CLI."""

from __future__ import annotations

import json

import pytest

from drift_agent.bench.results import load_result
from drift_agent.cli import main

SMALL = ["--num-prompts", "40", "--input-len", "512", "--output-len", "32"]


def test_run_writes_bench_compatible_results_and_a_plot(tmp_path, capsys):
    out = tmp_path / "sim.json"
    png = tmp_path / "sim.png"
    rc = main(
        [
            "sim",
            "run",
            *SMALL,
            "--policy",
            "chunked,prefill-first",
            "--request-rate",
            "2,4",
            "--slo",
            "ttft:500",
            "tpot:50",
            "--save-result",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "simulated requests/min" in err
    for policy in ("chunked", "prefill-first"):
        doc = load_result(tmp_path / f"sim.{policy}.json")
        assert doc["schema"] == "drift.bench.serve/v1" and doc["config"]["simulated"] is True
        assert doc["config"]["instance"]["policy"] == policy
        assert [r["request_rate"] for r in doc["runs"]] == [2.0, 4.0]
        assert doc["runs"][0]["summary"]["completed"] == 40 and "slo_attainment" in doc["runs"][0]["summary"]
    assert png.stat().st_size > 0


def test_run_sweep_single_policy(tmp_path):
    out = tmp_path / "one.json"
    rc = main(
        [
            "sim",
            "run",
            *SMALL,
            "--sweep",
            "--sweep-min",
            "1",
            "--sweep-max",
            "200",
            "--sweep-iters",
            "3",
            "--slo",
            "ttft:300",
            "tpot:30",
            "--save-result",
            str(out),
            "--save-detailed",
        ]
    )
    assert rc == 0
    doc = load_result(out)
    assert doc["sweep"]["target_attainment"] == 0.9 and len(doc["runs"]) >= 2
    assert len(doc["runs"][0]["requests"]) == 40


def test_cluster_options(tmp_path):
    rc = main(
        [
            "sim",
            "run",
            *SMALL,
            "--request-rate",
            "8",
            "--instances",
            "2",
            "--router",
            "prefix-affinity",
            "--migration",
        ]
    )
    assert rc == 0
    rc = main(["sim", "run", *SMALL, "--request-rate", "8", "--disagg", "1:2", "--kv-bandwidth", "50"])
    assert rc == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sweep"], "--sweep needs --slo"),
        (["--model", "gpt-5"], "unknown model"),
        (["--workload", "jsonl"], "needs --dataset-path"),
        (["--prefill-sm-share", "1.5"], "prefill-sm-share"),
        (["--profile", "/nonexistent/profile.json"], "profile"),
    ],
)
def test_run_rejects_bad_input_with_one_line(argv, message, capsys):
    assert main(["sim", "run", *SMALL, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_argument_errors_exit_2():
    for argv in (["--policy", "fastest"], ["--disagg", "2"], ["--request-rate", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["sim", "run", *argv])
        assert e.value.code == 2


def test_plan_prints_the_answer_and_saves_it(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "sim",
            "plan",
            "--num-prompts",
            "60",
            "--input-len",
            "1024",
            "--output-len",
            "64",
            "--rate",
            "4",
            "--policy",
            "chunked",
            "--slo",
            "ttft:500",
            "tpot:30",
            "--max-replicas",
            "4",
            "--save-result",
            str(out),
        ]
    )
    assert rc == 0
    assert "Fewest GPUs: 1" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["best"]["policy"] == "chunked" and doc["best"]["replicas"] == 1
    assert main(["sim", "plan", "--rate", "4"]) == 2  # no SLO


def test_presets_lists_models_and_gpus(capsys):
    assert main(["sim", "presets"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-70b" in out and "H100" in out


def test_a_negative_fold_budget_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sim", "run", *SMALL, "--fold-max-tokens", "-5"])
    assert exc.value.code == 2
    assert "argument --fold-max-tokens: must be >= 0, got -5" in capsys.readouterr().err


def test_plan_and_run_name_the_rate_alike(tmp_path, capsys):
    from drift_agent.cli import build_parser

    sim = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "sim" in a.choices)
    sim = sim.choices["sim"]
    subs = next(a for a in sim._actions if getattr(a, "choices", None) and "plan" in a.choices).choices
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in subs.items()}
    assert "--request-rate" in flags["run"] and "--request-rate" in flags["plan"]
    out = tmp_path / "plan.json"
    argv = ["sim", "plan", *SMALL, "--request-rate", "3.33333", "--policy", "chunked", "--slo", "ttft:500",
            "tpot:30", "--max-replicas", "2", "--save-result", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "Plan for 3.33 req/s" in capsys.readouterr().out  # rounded
    assert json.loads(out.read_text())["request_rate"] == pytest.approx(3.33333)


def test_piped_tables_keep_each_row_on_one_line(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["sim", "run", *SMALL, "--policy", "chunked,drift", "--request-rate", "2.123456"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Simulated: llama-3-8b on NVIDIA H100") and "roofline" in lines[0]
    header = next(line for line in lines if "policy" in line)
    assert "attainment %" in header and "throughput req/s" in header
    rows = [line for line in lines if line.startswith("│ chunked") or line.startswith("│ drift")]
    assert len(rows) == 2 and all(" 2.12 " in row for row in rows)
