"""The six parts of the check (issue 23, item 1 a-f). Each writes its results into its `PartContext` as it
measures them; every figure names its workload and the baseline it is compared against, both from this run."""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .runner import PartContext, PartSpec, Skip

REPO = Path(__file__).resolve().parents[3]  # agent/drift_agent/gpucheck/parts.py -> the checkout


class OutOfTime(Exception):  # noqa: N818 - a control-flow signal
    """A part's own measurement found its budget spent (the part stops and keeps what it measured)."""


def _cuda(ctx: PartContext) -> Any:
    """torch, when this run may use a GPU; else Skip."""
    if ctx.dry_run:
        raise Skip("no GPU (dry run)")
    import torch

    if not torch.cuda.is_available():
        raise Skip("no GPU (torch.cuda.is_available() is False)")
    return torch


# ---- a. environment -------------------------------------------------------------------------------------


def part_environment(ctx: PartContext) -> None:
    import torch

    from ..models.attention import BACKEND_NAMES, resolve_backend
    from ..partition import make_partitioner

    d = ctx.data
    d["python"] = platform.python_version()
    d["torch"] = torch.__version__
    d["torch_cuda"] = torch.version.cuda
    d["versions"] = {m: _version(m) for m in ("transformers", "triton", "cuda-bindings", "pydantic", "numpy")}
    on_gpu = not ctx.dry_run and torch.cuda.is_available()
    d["cuda_available"] = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {
            "name": p.name,
            "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "compute_capability": f"{p.major}.{p.minor}",
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        }
        d["driver"] = _driver_version()
        ctx.shared["device_name"] = p.name
    else:
        d["gpu"] = None
        d["cpu_cores"] = os.cpu_count()
    # Partition backends: what make_partitioner gives for each, and why it fell back.
    backends = ctx.table("partition backends")
    for name in ("green-context", "mps", "shared"):
        row: dict[str, Any] = {"asked": name}
        try:
            part = make_partitioner(name, device)  # type: ignore[arg-type]
            row |= {"got": part.name, "usable": part.name == name, "why not": part.reason or ""}
            if part.name == "green-context":  # realised SM counts of every split, checked
                checks = [(s.label, part.realized_sm_counts(s)) for s in part.splits]
                bad = [f"{lbl}->{r}" for lbl, r in checks if r != _requested(lbl)]
                row["splits"] = " ".join(lbl for lbl, _ in checks)
                row["realised ok"] = not bad
                if bad:
                    row["why not"] = "realised counts differ: " + ", ".join(bad)
            part.close()
        except Exception as e:  # a backend that raises is reported, the others still are
            row |= {"got": "error", "usable": False, "why not": f"{type(e).__name__}: {e}"}
        backends.append(row)
    # Attention backends: what the engine would run for each name here (it falls back to sdpa), and why.
    dtype = torch.bfloat16 if on_gpu else torch.float32
    attn = ctx.table("attention backends")
    quiet = logging.getLogger(resolve_backend.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # each fallback is a row here, not a warning on the console
    try:
        resolved = {n: resolve_backend(n, device, dtype) for n in BACKEND_NAMES}
    finally:
        quiet.setLevel(level)
    for name in (n for n in BACKEND_NAMES if n != "auto"):
        got = resolved[name]
        module = _ATTENTION_MODULES.get(name)
        installed = module is None or _find(module)
        why = ""
        if got != name:
            why = "needs CUDA, 16 bits" if installed else "not installed or does not import"
        attn.append({"backend": name, "usable": got == name, "runs as": got, "why not": why})
    d["attention_auto"] = resolved["auto"]


_ATTENTION_MODULES = {
    "flash-attn": "flash_attn",
    "flashinfer": "flashinfer",
    "triton": "triton",
    "flex": "torch.nn.attention.flex_attention",
}


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is missing
        return False


def _requested(label: str) -> tuple[int, int]:
    p, d = label.removeprefix("P").split("/D")
    return int(p), int(d)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- b. the GPU tests -----------------------------------------------------------------------------------


def gpu_test_files(root: Path = REPO) -> list[Path]:
    """Test files with a test marked `gpu` (only these are collected: the rest may need packages the device
    lacks, such as fastapi)."""
    tests = root / "tests"
    if not tests.is_dir():
        return []
    return sorted(p for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text(errors="replace"))


def parse_junit(path: Path) -> list[dict[str, str]]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "")[:300]
                break
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        rows.append({"test": test_id, "outcome": outcome, "message": message})
    return rows


def part_gpu_tests(ctx: PartContext) -> None:
    files = gpu_test_files()
    if not files:
        raise Skip("no test file in tests/ has a test marked gpu")
    xml = ctx.outdir / "pytest-gpu.xml"
    log = ctx.outdir / "pytest-gpu.log"
    xml.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={xml}",
        *map(str, files),
    ]
    ctx.data["command"] = " ".join(cmd[1:])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "agent"), str(REPO), env.get("PYTHONPATH", "")])
    timeout = max(ctx.time_left() - 2.0, 5.0)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            ctx.data["exit_code"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            ctx.truncate(f"pytest stopped after {timeout:.0f} s (its budget); see pytest-gpu.log")
        finally:  # also when the watchdog interrupts the wait: no test process may hold the GPU after this
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    ctx.data["log_tail"] = log.read_text(errors="replace")[-2000:]
    if not xml.exists():
        if ctx.result.status != "truncated":
            raise RuntimeError(
                f"pytest wrote no junit XML (exit {ctx.data.get('exit_code')}); see pytest-gpu.log"
            )
        return
    rows = parse_junit(xml)
    ctx.data["tables"] = {"tests": rows}
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    ctx.data["counts"] = counts
    bad = [r["test"] for r in rows if r["outcome"] in ("failed", "error")]
    if bad:
        raise RuntimeError(f"{len(bad)} GPU test(s) failed: " + ", ".join(bad))


# ---- c. partitions bite ---------------------------------------------------------------------------------


def _time_on(torch: Any, stream: Any, fn: Any, reps: int) -> float:
    """Mean ms of `fn` on `stream` over `reps` launches, after one warm-up."""
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


def _co_run(
    torch: Any, streams: tuple[Any, Any], fns: tuple[Any, Any], reps: tuple[int, int]
) -> tuple[float, float]:
    """Both kernels launched back to back on their own streams at once; mean ms per launch on each."""
    torch.cuda.synchronize()
    events = []
    for stream, fn, n in zip(streams, fns, reps, strict=True):
        with torch.cuda.stream(stream):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(stream)
            for _ in range(n):
                fn()
            e.record(stream)
            events.append((s, e, n))
    torch.cuda.synchronize()
    return tuple(s.elapsed_time(e) / n for s, e, n in events)  # type: ignore[return-value]


def part_partitions(ctx: PartContext) -> None:
    torch = _cuda(ctx)
    from ..partition import make_partitioner

    part = make_partitioner("auto", "cuda")
    ctx.data["backend"] = part.name
    ctx.data["reason"] = part.reason
    n_gemm, copy_bytes = 8192, 1 << 30
    dev = torch.device("cuda")
    buf = {k: torch.randn(n_gemm, n_gemm, device=dev, dtype=torch.bfloat16) for k in "abc"}
    buf["src"] = torch.empty(copy_bytes // 2, device=dev, dtype=torch.bfloat16).normal_()
    buf["dst"] = torch.empty_like(buf["src"])
    torch.cuda.synchronize()

    def gemm() -> None:
        torch.mm(buf["a"], buf["b"], out=buf["c"])

    def copy() -> None:
        buf["dst"].copy_(buf["src"])

    flops, moved = 2 * n_gemm**3, 2 * copy_bytes
    workload = f"GEMM bf16 {n_gemm}^3 (compute-bound); copy of {copy_bytes >> 30} GiB (bandwidth-bound)"
    rows = ctx.table("time vs SM count")
    whole: dict[str, float] = {}
    try:
        for split in part.splits:
            if ctx.time_left() < 3:
                ctx.truncate(f"out of budget before split {split.label}")
                break
            ps, ds = part.streams_for(split)
            rp, rd = part.realized_sm_counts(split)
            row: dict[str, Any] = {"split": split.label, "realised P": rp, "realised D": rd}
            for side, stream, sms in (("P", ps, split.prefill_sms), ("D", ds, split.decode_sms)):
                if sms == 0:
                    continue
                g = _time_on(torch, stream, gemm, 5)
                m = _time_on(torch, stream, copy, 10)
                row |= {
                    f"gemm ms {side}": g,
                    f"TFLOP/s {side}": flops / g / 1e9,
                    f"copy GB/s {side}": moved / m / 1e6,
                }
                row[f"_g{side}"], row[f"_m{side}"] = g, m
                row[f"copy ms {side}"] = m
            if not split.is_mixed:
                key = "P" if split.prefill_sms else "D"
                whole.setdefault("gemm", row[f"_g{key}"])
                whole.setdefault("copy", row[f"_m{key}"])
            else:  # GEMM on prefill's partition beside the copy on decode's, each repeated for ~50 ms
                k = max(2, math.ceil(50 / row["_gP"]))
                m_reps = max(2, math.ceil(k * row["_gP"] / row["_mD"]))
                g_co, m_co = _co_run(torch, (ps, ds), (gemm, copy), (k, m_reps))
                row |= {"co-run GEMM slowdown": g_co / row["_gP"], "co-run copy slowdown": m_co / row["_mD"]}
            for key in [k for k in row if k.startswith("_")]:
                del row[key]
            rows.append(row)
    finally:
        part.close()
        buf.clear()
        torch.cuda.empty_cache()
    spec = _device_spec(ctx)
    if whole:
        tflops, gbps = flops / whole["gemm"] / 1e9, moved / whole["copy"] / 1e6
        ctx.shared["peak_tflops"], ctx.shared["peak_GBps"] = tflops, gbps
        ctx.figure(
            "GEMM on the whole device",
            tflops,
            "TFLOP/s",
            workload,
            f"datasheet bf16 dense {spec.peak_flops / 1e12:.0f} TFLOP/s",
        )
        ctx.figure(
            "copy on the whole device",
            gbps,
            "GB/s (read+write)",
            workload,
            f"datasheet HBM {spec.mem_bw / 1e9:.0f} GB/s",
        )
    mixed = [r for r in rows if "co-run GEMM slowdown" in r]
    if mixed and whole:
        sp = min(mixed, key=lambda r: r["realised P"])
        sd = min(mixed, key=lambda r: r["realised D"])
        base = f"the same kernel on the whole device ({part.total_sms} SMs), same run"
        ctx.figure(
            f"GEMM time on {sp['realised P']} prefill SMs / whole device",
            sp["gemm ms P"] / whole["gemm"],
            "x",
            f"{workload}; ideal scaling {part.total_sms / max(sp['realised P'], 1):.2f}x",
            base,
        )
        ctx.figure(
            f"copy time on {sd['realised D']} decode SMs / whole device",
            sd["copy ms D"] / whole["copy"],
            "x",
            f"{workload}; SM share {sd['realised D'] / part.total_sms:.2f}",
            base,
        )
        ctx.figure(
            "worst co-run slowdown, GEMM on prefill",
            max(r["co-run GEMM slowdown"] for r in mixed),
            "x",
            "GEMM on the prefill partition while the copy runs on decode's, every mixed split",
            "the GEMM alone on the same partition, same run",
        )
        ctx.figure(
            "worst co-run slowdown, copy on decode",
            max(r["co-run copy slowdown"] for r in mixed),
            "x",
            "copy on the decode partition while the GEMM runs on prefill's, every mixed split",
            "the copy alone on the same partition, same run",
        )


# ---- shared engine ------------------------------------------------------------------------------------------


def _engine(ctx: PartContext) -> Any:
    """The random-weight engine of parts d-f, built once (Llama-3-8B shapes on GPU, tiny on CPU)."""
    if "engine" in ctx.shared:
        return ctx.shared["engine"]
    if "engine_error" in ctx.shared:
        raise RuntimeError(f"the engine could not be built earlier: {ctx.shared['engine_error']}")
    from .model import LLAMA3_8B, TINY_LLAMA, build_engine, write_model_dir

    name = "tiny-llama (random)" if ctx.dry_run else "Llama-3-8B shapes (random bf16)"
    shape = TINY_LLAMA if ctx.dry_run else LLAMA3_8B
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="drift-gpucheck-")) / "model", shape, name)
    t0 = time.monotonic()
    profile = ctx.outdir / "profile.json"
    try:
        engine = build_engine(model_dir, dry_run=ctx.dry_run, profile_path=profile)
        _smoke(engine)
    except Exception as first:
        # The default attention path on this device (triton kernels, CUDA-graph decode) has never run on
        # a GPU before: if it fails, the later parts still measure on the plain one, and the report says why.
        ctx.data["fast_path_error"] = f"{type(first).__name__}: {first}"
        try:
            engine = build_engine(
                model_dir, dry_run=ctx.dry_run, profile_path=profile, attention_backend="sdpa", eager=True
            )
            _smoke(engine)
        except Exception as e:
            ctx.shared["engine_error"] = f"{type(e).__name__}: {e}"
            raise
    ctx.shared["engine"] = engine
    ctx.shared["model_label"] = name
    ctx.data["engine_build_s"] = round(time.monotonic() - t0, 1)
    ctx.data["model"] = name
    ctx.data["kv_blocks"] = (
        engine.block_manager.num_blocks if hasattr(engine.block_manager, "num_blocks") else None
    )
    return engine


def _smoke(engine: Any) -> None:
    """A few greedy tokens through prefill and decode, so a broken kernel fails here, not mid-measurement."""
    from ..core.sampling_params import SamplingParams

    (out,) = engine.generate(
        [list(range(1, 65))], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    )
    if out.finish_reason != "length":
        raise RuntimeError(f"smoke generation ended with {out.finish_reason}: {out.error}")


def _device_spec(ctx: PartContext) -> Any:
    from ..multiplex.devices import cpu_device_spec, lookup_device

    name = ctx.shared.get("device_name")
    if name is None and not ctx.dry_run:  # part a did not run (--parts)
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return (lookup_device(name) if name else None) or cpu_device_spec()


# ---- d. drift profile ---------------------------------------------------------------------------------------


def part_profile(ctx: PartContext) -> None:
    from ..engine.measure import EngineMeasurer
    from ..multiplex.analytic import ModelShape
    from ..multiplex.fitting import fit_profile
    from ..multiplex.model_select import model_identity
    from ..multiplex.profile import ProfileGrid, run_profile
    from ..multiplex.schema import DecodeSample, PrefillSample, save_profile
    from ..partition import make_partitioner

    engine = _engine(ctx)
    on_cpu = engine.device.type == "cpu"
    part = make_partitioner(engine.config.partition.backend, engine.device)
    ctx.data["partitioner"] = {"backend": part.name, "reason": part.reason}
    splits = part.splits
    # As `drift profile` does on CPU: nominal splits, one whole-device point per phase plus the mixed ones.
    if on_cpu:
        splits = [s for s in splits if s.is_mixed] + [max(splits, key=lambda s: s.prefill_sms)]
    if ctx.dry_run:
        grid = dataclasses.replace(
            ProfileGrid.quick(engine.max_model_len), contention_points=(((64, 0), (4, 128)),)
        )
    else:  # ProfileGrid's defaults reduced to fit the budget: 9 prefill and 10 decode points per SM count
        grid = ProfileGrid(
            prefill_tokens=(256, 1024, 2048, 4096, 8192),
            prefill_cached=(0, 2048),
            decode_batch=(1, 8, 32, 64, 128),
            decode_kv_per_seq=(512, 2048),
            max_context=engine.max_model_len,
            repeats=2,
        )
    ctx.data["grid"] = dataclasses.asdict(grid)
    ctx.data["splits"] = [s.label for s in splits]
    m = EngineMeasurer(engine, part)
    reserve = 0.15 * max(ctx.time_left(), 0.0)  # for the fit, the report and a margin
    seen: list[tuple[str, int, int, Any, float]] = []

    def timed(kind: str, fn: Any) -> Any:
        def call(x: int, y: int, split: Any) -> float:
            if ctx.time_left() < reserve:
                raise OutOfTime(kind)
            sec = fn(x, y, split)
            seen.append((kind, x, y, split, sec))
            return sec

        return call

    def concurrent(*args: Any) -> Any:
        if ctx.time_left() < reserve:
            raise OutOfTime("contention")
        return m.concurrent(*args)

    dtype = str(engine.dtype).removeprefix("torch.")
    device = "cpu" if on_cpu else __import__("torch").cuda.get_device_name(engine.device)
    arch = (getattr(engine.hf_config, "architectures", None) or [None])[0]
    identity = model_identity(ModelShape.from_hf_config(engine.hf_config, dtype), arch)
    keys = dict(
        model=identity,
        device=device,
        dtype=dtype,
        total_sms=part.total_sms,
        num_layers=engine.runner.model.num_layers,
    )
    out = ctx.outdir / "profile.json"
    try:
        profile = run_profile(
            timed("prefill", m.prefill),
            timed("decode", m.decode),
            splits=splits,
            grid=grid,
            measure_concurrent=concurrent,
            out_path=out,
            label=ctx.shared["model_label"],
            **keys,
        ).profile
    except OutOfTime as e:  # fit what was measured (medians per point); contention stays the assumed default
        ctx.truncate(f"budget spent during the {e} measurements; fitted the {len(seen)} measurements taken")
        med: dict[tuple[str, int, int, int], list[float]] = {}
        for kind, x, y, split, sec in seen:
            sms = split.prefill_sms if kind == "prefill" else split.decode_sms
            med.setdefault((kind, x, y, sms), []).append(sec)
        # An SM count cut short has too few points to fit its 4 (prefill) or 3 (decode) coefficients.
        per_count = collections.Counter((k, s) for k, _x, _y, s in med)
        med = {key: v for key, v in med.items() if per_count[(key[0], key[3])] >= 5}
        pre = [
            PrefillSample(sms=s, new_tokens=x, cached_tokens=y, seconds=statistics.median(v))
            for (k, x, y, s), v in med.items()
            if k == "prefill"
        ]
        dec = [
            DecodeSample(sms=s, batch_size=x, kv_tokens=y, seconds=statistics.median(v))
            for (k, x, y, s), v in med.items()
            if k == "decode"
        ]
        if not pre or not dec:
            raise RuntimeError(
                f"budget spent during the {e} measurements before every phase had an SM count with 5 points"
            ) from None
        profile = fit_profile(pre, dec, notes="truncated by the GPU check's budget", **keys)
        save_profile(out, profile)
    finally:
        part.close()
    ctx.shared["profile"] = profile
    rows = ctx.table("fit error per SM count")
    for phase, grids in (("prefill", profile.prefill), ("decode", profile.decode)):
        for g in grids:
            if g.error is not None:
                rows.append(
                    {
                        "phase": phase,
                        "SMs": g.sms,
                        "points": g.error.samples,
                        "MAPE %": g.error.mape,
                        "max abs %": g.error.max_abs_pct,
                        "goal": "<= 10%",
                    }
                )
    s = profile.fit_error()
    wl = f"{ctx.shared['model_label']}, {dtype}; grid {ctx.data['grid']['prefill_tokens']} new x {ctx.data['grid']['prefill_cached']} cached tokens, decode batch {ctx.data['grid']['decode_batch']} x KV/seq {ctx.data['grid']['decode_kv_per_seq']}, {len(splits)} splits"
    ctx.figure(
        "prefill fit MAPE (mean over SM counts)",
        s.prefill_mape,
        "%",
        wl,
        "measured latencies of the same grid, this run; goal <= 10%",
    )
    ctx.figure(
        "decode fit MAPE (mean over SM counts)",
        s.decode_mape,
        "%",
        wl,
        "measured latencies of the same grid, this run; goal <= 10%",
    )
    c = profile.contention
    how = (
        "measured: the same shapes alone on the same split, this run"
        if c.measured
        else "not measured: assumed default"
    )
    ctx.figure(
        "contention: decode slowdown beside prefill",
        c.decode_slowdown,
        "x",
        f"contention points {list(grid.contention_points)}",
        how,
    )
    ctx.figure(
        "contention: prefill slowdown beside decode",
        c.prefill_slowdown,
        "x",
        f"contention points {list(grid.contention_points)}",
        how,
    )
    ctx.data["contention"] = c.model_dump()
    ctx.data["profile_json"] = str(out)


# ---- e. serving comparison ----------------------------------------------------------------------------------

POLICIES: tuple[tuple[str, str, int], ...] = (
    ("chunked-2048", "chunked", 2048),
    ("chunked-512", "chunked", 512),
    ("static-split", "static-split", 2048),
    ("drift", "drift", 2048),
)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    lengths: list[tuple[int, int]]  # (prompt, output) per request, cycled
    ttft_ms: float
    tpot_ms: float


def serving_workloads(dry_run: bool, n: int = 400) -> list[Workload]:
    """ShareGPT-like chat and the paper regime (every third request a long prompt with a short answer, the rest
    chats decoding long answers), scaled so a run fits in seconds; tiny lengths in a dry run."""
    import numpy as np

    from ..bench.workloads import WorkloadParams, generate

    scale = 16 if dry_run else 1
    in_cap, out_cap = (48, 6) if dry_run else (2048, 128)
    share = [
        (min(max(s.prompt_len // scale, 4), in_cap), min(max(s.output_len // scale, 2), out_cap))
        for s in generate("sharegpt-like", n, 0)
    ]
    long_len, chat_in, chat_out, long_out = (192, 24, 6, 2) if dry_run else (4096, 256, 96, 16)
    rng = np.random.default_rng(1)
    longs = rng.integers(long_len // 2, long_len * 3 // 2, n)
    chats = generate("random", n, 2, WorkloadParams(input_len=chat_in, output_len=chat_out, range_ratio=0.5))
    paper = [
        (int(longs[i]), long_out) if i % 3 == 2 else (chats[i].prompt_len, chats[i].output_len)
        for i in range(n)
    ]
    slo = (2000.0, 500.0, 4000.0, 500.0) if dry_run else (1000.0, 50.0, 4000.0, 50.0)
    return [
        Workload(
            "sharegpt-like",
            f"ShareGPT-like lengths (input <= {in_cap}, output <= {out_cap})",
            share,
            slo[0],
            slo[1],
        ),
        Workload(
            "paper-regime",
            f"every 3rd request a {long_len} +-50% token prompt with {long_out} output tokens, "
            f"the rest {chat_in} +-50% in / {chat_out} +-50% out",
            paper,
            slo[2],
            slo[3],
        ),
    ]


def run_arrivals(
    engine: Any,
    lengths: list[tuple[int, int]],
    arrivals: list[float],
    ttft_ms: float,
    tpot_ms: float,
    cap_s: float,
    seed: int,
) -> tuple[list[Any], float]:
    """Requests added at their arrival times (wall clock) into the running engine, stepped until all finish or
    `cap_s` passes (the rest are aborted and count as failed). Returns bench records and the run's duration."""
    import random

    from ..bench.metrics import RequestRecord
    from ..core.sampling_params import SamplingParams
    from ..core.sequence import SLO

    rng = random.Random(seed)
    vocab = engine.runner.model.vocab_size - 1  # the last id is the tokenizer's EOS
    slo = SLO.from_ms(ttft_ms, tpot_ms)
    records = [
        RequestRecord(f"r{i}", prompt_tokens=p, scheduled_time=t)
        for i, ((p, _o), t) in enumerate(zip(lengths, arrivals, strict=True))
    ]
    finals: dict[str, Any] = {}
    start = time.monotonic()
    i = 0
    while True:
        now = time.monotonic() - start
        while i < len(lengths) and arrivals[i] <= now:
            p, o = lengths[i]
            engine.add_request(
                f"r{i}",
                [rng.randrange(vocab) for _ in range(p)],
                SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True),
                slo,
                arrival_time=start + arrivals[i],
            )
            i += 1
        if now > cap_s or (i == len(lengths) and not engine.has_unfinished_requests()):
            break
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
        else:
            time.sleep(min(max(arrivals[i] - now, 0.0), 0.01))
    duration = time.monotonic() - start
    for rid in [r.request_id for r in records if r.request_id not in finals and int(r.request_id[1:]) < i]:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():  # drain aborted work before the next run
        engine.step()
    for rec in records:
        out = finals.get(rec.request_id)
        if out is None or out.finish_reason not in ("length", "stop"):
            rec.error = "not finished within the run" if out is None else str(out.finish_reason)
            continue
        t = out.times
        rec.success = True
        rec.output_tokens = out.num_output_tokens
        rec.ttft = (t.first_token or t.finished) - t.arrival
        rec.latency = (t.finished or t.last_token) - t.arrival
    return records, max(duration, 1e-6)


def _knee_estimate(engine: Any, wl: Workload) -> tuple[float, str]:
    """Requests/s the device could sustain by the engine's own performance model (part d's profile when it
    was saved, else the analytic roofline): mean prefill + output tokens at decode batch 32."""
    # Builds the partitions and picks the profile, as the multiplexing policies will.
    mux = engine._mux_context()
    perf = mux.perf_model
    from ..multiplex.perf_model import PrefillShape

    total = max(s.total for s in mux.splits)
    mean_in = statistics.mean(p for p, _ in wl.lengths)
    mean_out = statistics.mean(o for _, o in wl.lengths)
    t_pre = perf.prefill_time(PrefillShape(int(mean_in), 0), total)
    t_dec = perf.decode_time(32, int(32 * (mean_in + mean_out / 2)), total)
    return 1.0 / (t_pre + mean_out * t_dec / 32), type(perf).__name__


def part_serving(ctx: PartContext) -> None:
    from ..bench.arrivals import arrival_times
    from ..bench.metrics import GoodputTargets, summarize

    engine = _engine(ctx)
    window, drain = (0.6, 1.5) if ctx.dry_run else (4.0, 5.0)
    # The knee first, then above it (where multiplexing should pay), then below: the order if time runs out.
    factors = (1.0,) if ctx.dry_run else (1.0, 1.4, 0.6)
    workloads = serving_workloads(ctx.dry_run)
    rows = ctx.table("runs")
    ctx.data["method"] = (
        f"in-process engine, no HTTP; Poisson arrivals over {window} s, then up to {drain} s to finish; "
        "unfinished requests count as failed; the same lengths and arrival times for every policy"
    )
    knees = {}
    for wl in workloads:
        knee, model = _knee_estimate(engine, wl)
        knees[wl.name] = knee
        ctx.data.setdefault("knee_estimate_req_s", {})[wl.name] = {"req_s": knee, "perf_model": model}
    goodput: dict[tuple[str, float, str], float] = {}
    sched_cfg = engine.scheduler.config
    try:
        # One unrecorded run per policy first: kernel selection, lanes and threads start outside the figures.
        warm = workloads[0].lengths[:2]
        for _label, policy, budget in POLICIES:
            engine.update_settings(policy=policy)
            sched_cfg.max_num_batched_tokens = budget
            run_arrivals(engine, warm, [0.0, 0.0], workloads[0].ttft_ms, workloads[0].tpot_ms, drain, seed=1)
        for f in factors:
            for wl in workloads:
                # At least 0.5 req/s, at most 300 requests: a wild estimate still gives a run of seconds.
                rate = round(max(knees[wl.name] * f, 0.5), 2)
                n = min(max(4, round(rate * window)), 300)
                lengths = [wl.lengths[j % len(wl.lengths)] for j in range(n)]
                arr = arrival_times(n, rate, seed=7).tolist()
                for label, policy, budget in POLICIES:
                    if ctx.time_left() < window + drain + 3:
                        ctx.truncate(f"out of budget before {wl.name} at {rate} req/s, {label}")
                        return
                    engine.update_settings(policy=policy, slo_ttft_ms=wl.ttft_ms, slo_tpot_ms=wl.tpot_ms)
                    sched_cfg.max_num_batched_tokens = budget
                    before = dict(engine.stats().decisions)
                    recs, dur = run_arrivals(
                        engine, lengths, arr, wl.ttft_ms, wl.tpot_ms, window + drain, seed=n
                    )
                    s = summarize(recs, dur, GoodputTargets(ttft_ms=wl.ttft_ms, tpot_ms=wl.tpot_ms))
                    gp = s.get("request_goodput", 0.0) or 0.0
                    goodput[(wl.name, rate, label)] = gp
                    after = engine.stats().decisions
                    decisions = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
                    rows.append(
                        {
                            "workload": wl.name,
                            "rate req/s": rate,
                            "policy": label,
                            "requests": n,
                            "completed": s["completed"],
                            "goodput req/s": gp,
                            "SLO attainment": s.get("slo_attainment"),
                            "p90 TTFT ms": s.get("p90_ttft_ms"),
                            "p90 TPOT ms": s.get("p90_tpot_ms"),
                            "output tok/s": s["output_throughput"],
                            "dispatcher decisions": decisions or None,
                        }
                    )
                base = goodput.get((wl.name, rate, "chunked-2048"))
                for label, _p, _b in POLICIES[1:]:
                    gp = goodput[(wl.name, rate, label)]
                    ctx.figure(
                        f"{wl.name} @ {rate} req/s: {label} / chunked-2048 goodput",
                        gp / base if base else None,
                        "x",
                        f"{wl.description}; {n} requests, SLO TTFT {wl.ttft_ms:.0f} ms / TPOT {wl.tpot_ms:.0f} ms",
                        f"chunked-2048 goodput {base or 0:.3g} req/s, same requests and arrivals, this run"
                        + ("" if base else " (zero: no ratio)"),
                    )
    finally:
        engine.update_settings(policy="chunked")
        sched_cfg.max_num_batched_tokens = engine.config.max_num_batched_tokens


# ---- f. roofline --------------------------------------------------------------------------------------------


def part_roofline(ctx: PartContext) -> None:
    from ..engine.measure import EngineMeasurer
    from ..partition import make_partitioner

    engine = _engine(ctx)
    model = engine.runner.model
    part = make_partitioner("shared", engine.device)
    m = EngineMeasurer(engine, part)
    whole_p = max(part.splits, key=lambda s: s.prefill_sms)
    whole_d = max(part.splits, key=lambda s: s.decode_sms)
    spec = _device_spec(ctx)
    item = engine.dtype.itemsize
    params = {n: p.numel() for n, p in model.named_parameters()}
    embed = sum(v for n, v in params.items() if "embed_tokens" in n)
    head = sum(v for n, v in params.items() if n.startswith("lm_head"))
    layers = sum(params.values()) - embed - head
    cfg = engine.hf_config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n_layers = model.num_layers
    kv_per_token = 2 * n_layers * kv_heads * head_dim * item
    ctx_len = 64 if ctx.dry_run else 1024
    weight_bytes = (layers + head) * item  # a decode step reads every weight once (embeddings: B rows only)
    measured_bw = ctx.shared.get("peak_GBps")
    graphs = "on" if getattr(engine.runner, "graphs", None) is not None else "off"
    how = f"attention {model.attention_backend}, decode CUDA graphs {graphs}"
    ctx.data["engine"] = how
    rows = ctx.table("decode")
    for b in (1, 64):
        m.decode(b, b * ctx_len, whole_d)  # warm-up
        sec = statistics.median(m.decode(b, b * ctx_len, whole_d) for _ in range(3))
        step_bytes = weight_bytes + b * ctx_len * kv_per_token
        bound = b * spec.mem_bw / step_bytes
        rows.append(
            {
                "batch": b,
                "KV/seq": ctx_len,
                "step ms": sec * 1e3,
                "tok/s": b / sec,
                "HBM bound tok/s": bound,
                "fraction of bound": b / sec / bound,
            }
        )
        base = f"HBM bound {bound:.4g} tok/s at the datasheet {spec.mem_bw / 1e9:.0f} GB/s ({spec.name})"
        if measured_bw:
            base += f"; {b * measured_bw * 1e9 / step_bytes:.4g} tok/s at part c's measured copy bandwidth"
        ctx.figure(
            f"decode tokens/s at batch {b}",
            b / sec,
            "tok/s",
            f"{ctx.shared.get('model_label')}, one decode step, {ctx_len} KV tokens per sequence; {how}",
            base,
        )
    t = 128 if ctx.dry_run else 4096
    m.prefill(t, 0, whole_p)
    sec = statistics.median(m.prefill(t, 0, whole_p) for _ in range(3))
    flops = 2 * layers * t + 2 * n_layers * t * t * heads * head_dim  # GEMMs + causal attention (QK^T and PV)
    tflops = flops / sec / 1e12
    ctx.data["prefill"] = {"tokens": t, "ms": sec * 1e3, "TFLOP/s": tflops}
    base = f"datasheet bf16 dense {spec.peak_flops / 1e12:.3g} TFLOP/s ({spec.name}): {tflops * 1e12 / spec.peak_flops:.1%}"
    if ctx.shared.get("peak_tflops"):
        base += f"; part c's measured 8192^3 GEMM {ctx.shared['peak_tflops']:.0f} TFLOP/s"
    ctx.figure(
        "prefill TFLOP/s",
        tflops,
        "TFLOP/s",
        f"{ctx.shared.get('model_label')}, one {t}-token prompt, no cache",
        base,
    )


PARTS_GPU: tuple[PartSpec, ...] = (
    PartSpec("a", "environment", part_environment, 20),
    PartSpec("b", "GPU tests (pytest -m gpu)", part_gpu_tests, 90),
    PartSpec("c", "partitions bite (kernels per split, alone and co-running)", part_partitions, 40),
    PartSpec("d", "drift profile (Llama-3-8B shapes; tiny in a dry run)", part_profile, 130),
    PartSpec("e", "serving comparison (in-process)", part_serving, 210),
    PartSpec("f", "roofline", part_roofline, 30),
)
