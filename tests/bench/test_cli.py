"""`drift bench serve` / `drift bench plot` from argv to files and exit codes, against the mock server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from drift_agent.bench.cli import add_plot_parser, add_serve_parser, main
from drift_agent.bench.results import load_result

from .mock_server import MockServer, free_port_url

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def serve(url: str, *extra: str) -> list[str]:
    return ["serve", "--base-url", url, "--num-prompts", "4", "--input-len", "8", "--output-len", "3",
            "--no-progress", *extra]  # fmt: skip


def test_parsers_register_on_a_bench_subparser() -> None:
    root = argparse.ArgumentParser(prog="drift")
    bench = root.add_subparsers(dest="command").add_parser("bench")
    subs = bench.add_subparsers(dest="bench_command")
    add_serve_parser(subs)
    add_plot_parser(subs)
    args = root.parse_args(["bench", "serve", "--request-rate", "1,inf", "--slo", "ttft:200", "tpot:50"])
    assert args.request_rate == [1.0, float("inf")] and args.slo == ["ttft:200", "tpot:50"]
    assert args.func.__name__ == "serve_main" and args.ignore_eos is True


def test_serve_two_rates_saves_json_and_plot(mock: MockServer, tmp_path: Path, capsys) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.01, 0.002
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(serve(mock.url, "--request-rate", "inf,40", "--slo", "ttft:1000", "tpot:200", "--num-warmups", "2",
                    "--save-result", str(out), "--plot", str(png), "--save-detailed", "--label", "mock"))  # fmt: skip
    assert rc == 0
    doc = load_result(out)
    assert doc["label"] == "mock" and doc["sweep"] is None
    assert [r["request_rate"] for r in doc["runs"]] == [40.0, "inf"]
    for run in doc["runs"]:
        assert run["summary"]["completed"] == 4 and run["summary"]["slo_attainment"] == 1.0
        assert len(run["requests"]) == 4 and run["requests"][0]["output_tokens"] == 3
    assert doc["config"]["model"] == "mock-model" and doc["config"]["slo"] == {"ttft": 1000.0, "tpot": 200.0}
    assert png.read_bytes().startswith(PNG_MAGIC)
    # 2 warm-ups + 1 probe + 2 runs x 4 requests reached the server.
    assert len(mock.state.requests) == 2 + 1 + 8
    assert "SLO attainment" in capsys.readouterr().out


def test_sweep_reports_max_rate(mock: MockServer, tmp_path: Path) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.0, 0.0
    out = tmp_path / "s.json"
    rc = main(serve(mock.url, "--sweep", "--sweep-min", "5", "--sweep-max", "50", "--sweep-iters", "1",
                    "--slo", "ttft:5000", "--save-result", str(out)))  # fmt: skip
    assert rc == 0
    sweep = json.loads(out.read_text())["sweep"]
    # A loose SLO is met at the upper bound at once: the result is a lower bound, flagged unsaturated.
    assert sweep["max_rate"] == 50 and sweep["saturated"] is False and len(sweep["history"]) == 1


def test_multi_turn_chat_with_tokenizer_and_jsonl(
    mock: MockServer, tmp_path: Path, tokenizer_dir: Path, capsys
) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.0, 0.0
    out = tmp_path / "m.json"
    argv = serve(mock.url, "--endpoint", "chat", "--workload", "multi-turn", "--think-time", "0",
                 "--tokenizer", str(tokenizer_dir), "--save-result", str(out))  # fmt: skip
    assert main(argv) == 0
    assert load_result(out)["runs"][0]["summary"]["completed"] == 4
    data = tmp_path / "w.jsonl"
    data.write_text('{"prompt": "a b c"}\n{"turns": ["x", "y"], "output_len": 2}\n')
    assert main(serve(mock.url, "--workload", "jsonl", "--dataset-path", str(data))) == 0
    assert mock.state.requests[-1]["body"]["prompt"].endswith(" w0 w1\ny")
    # Failed requests are results, not a failed benchmark; the most common errors are shown.
    data.write_text('{"prompt": "a b c"}\n{"prompt": "FAIL here"}\n')
    assert main(serve(mock.url, "--workload", "jsonl", "--dataset-path", str(data))) == 0
    assert "1 failed request(s): HTTP 500" in capsys.readouterr().err


def test_unreachable_server_exits_1_with_one_line(capsys) -> None:
    assert main(serve(free_port_url())) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("drift bench: error: cannot reach") and "\n" not in err


def test_wrong_model_fails_the_probe(mock: MockServer, capsys) -> None:
    assert main(serve(mock.url, "--model", "other")) == 1
    assert "probe request" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--sweep"], "--sweep needs --slo"),
        (["--workload", "jsonl"], "needs --dataset-path"),
        (["--dataset-path", "x.jsonl"], "only read by --workload jsonl"),
        (["--workload", "jsonl", "--dataset-path", "/nonexistent.jsonl"], "cannot read workload file"),
        (["--range-ratio", "1.5"], "--range-ratio must be in"),
        (["--sweep", "--slo", "ttft:1", "--sweep-min", "9", "--sweep-max", "3"], "must be below"),
        (["--tokenizer", "/nonexistent-tokenizer"], "cannot load tokenizer"),
        (["--base-url", "localhost:8000"], "must be an http"),
    ],
)
def test_bad_combinations_exit_2(extra: list[str], match: str, capsys) -> None:
    argv = serve("http://127.0.0.1:9", *extra)
    if "--base-url" in extra:
        argv = [a for a in argv if a != "http://127.0.0.1:9"]
        argv.remove("--base-url")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


@pytest.mark.parametrize(
    "extra",
    [["--slo", "ttft=3"], ["--request-rate", "0"], ["--num-prompts", "0"], ["--burstiness", "-1"],
     ["--workload", "sharegpt"], ["--extra-body", "[1]"], ["--percentiles", "100"]],
)  # fmt: skip
def test_bad_arguments_exit_2_from_argparse(extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(serve("http://127.0.0.1:9", *extra))
    assert exc.value.code == 2


def test_plot_overlays_result_files(tmp_path: Path, capsys) -> None:
    def doc(label: str, scale: float) -> Path:
        runs = [
            {
                "request_rate": r,
                "summary": {
                    "slo_attainment": max(0.0, 1 - r * scale / 10),
                    "p90_ttft_ms": 10 * r,
                    "p99_ttft_ms": 20 * r,
                    "p90_tpot_ms": r,
                    "p99_tpot_ms": 2 * r,
                    "p90_e2el_ms": None,
                    "p99_e2el_ms": 30 * r,
                },
            }  # fmt: skip
            for r in (1.0, 2.0, 4.0, 8.0)
        ] + [{"request_rate": "inf", "summary": {"slo_attainment": 0.0}}]
        p = tmp_path / f"{label}.json"
        p.write_text(json.dumps({"label": label, "runs": runs, "sweep": {"target_attainment": 0.9}}))
        return p

    png = tmp_path / "o.png"
    assert (
        main(["plot", str(doc("fcfs", 1.0)), str(doc("slo-aware", 0.5)), "-o", str(png), "--title", "x"]) == 0
    )
    assert png.read_bytes().startswith(PNG_MAGIC)
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": [{"summary": {}}]}')
    assert main(["plot", str(bad), "-o", str(png)]) == 2
    assert "lacks request_rate" in capsys.readouterr().err
    only_inf = tmp_path / "inf.json"
    only_inf.write_text('{"runs": [{"request_rate": "inf", "summary": {}}]}')
    assert main(["plot", str(only_inf), "-o", str(png)]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_infinite_burstiness_and_mean_turns_write_valid_json(
    mock: MockServer, tmp_path: Path, capsys
) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.0, 0.0
    out, png = tmp_path / "inf.json", tmp_path / "inf.png"
    argv = serve(mock.url, "--workload", "multi-turn", "--mean-turns", "inf", "--think-time", "0",
                 "--burstiness", "inf", "--request-rate", "50", "--save-result", str(out))  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    text = out.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # strict JSON, no Infinity
    raw = json.loads(text)["config"]
    assert raw["burstiness"] == "inf" and raw["mean_turns"] == "inf"
    doc = load_result(out)
    assert doc["config"]["burstiness"] == float("inf") and doc["config"]["mean_turns"] == float("inf")
    assert doc["config"]["num_sessions"] == 1  # an endless session: all 4 requests are its turns
    assert main(["plot", str(out), "-o", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_the_probe_sends_a_prompt_of_its_own(mock: MockServer, tmp_path: Path) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.0, 0.0
    assert main(serve(mock.url)) == 0
    probe, *measured = [r["body"]["prompt"] for r in mock.state.requests]
    assert len(measured) == 4
    # A measured prompt sent early would sit in the server's prefix cache when its turn came.
    assert all(not m.startswith(probe[:20]) and not probe.startswith(m[:20]) for m in measured)


def test_a_busy_machine_is_reported(mock: MockServer, tmp_path: Path, monkeypatch, capsys) -> None:
    from drift_agent.bench import machine

    monkeypatch.setattr(machine, "load_average", lambda: 1000.0)
    out = tmp_path / "busy.json"
    assert main(serve(mock.url, "--save-result", str(out))) == 0
    err = capsys.readouterr().err
    assert "drift bench serve: warning: the machine was busy during the run (1-minute load average" in err
    assert json.loads(out.read_text())["machine"]["busy"] is True
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    monkeypatch.setattr(machine, "read_cpu_times", lambda: None)
    assert main(serve(mock.url)) == 0
    assert "busy" not in capsys.readouterr().err
