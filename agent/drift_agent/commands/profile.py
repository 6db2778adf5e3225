"""`drift profile`: measure prefill/decode latency grids per SM split, fit the performance model, save it as
JSON (keyed by the model's identity, device and dtype) and plot measured vs predicted."""

from __future__ import annotations

import argparse
import sys

from .engine_args import add_engine_args, config_or_exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="profile the model on this device and fit the performance model")
    p.add_argument(
        "--output",
        default="drift-profile.json",
        help="profile JSON, merged by model identity (architecture and shape), device and dtype; "
        "the engine finds it whatever name the model is served under (default: %(default)s)",
    )
    p.add_argument("--plot", default=None, help="PNG of measured vs predicted latency")
    p.add_argument("--quick", action="store_true", help="a small grid (CPU, smoke tests)")
    p.add_argument("--repeats", type=int, default=None, help="measurements per point (median is kept)")
    p.add_argument("--no-contention", action="store_true", help="skip the co-running slowdown measurement")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_or_exit_code(args, "profile")
    if isinstance(config, int):
        return config
    if args.repeats is not None and args.repeats < 1:
        print("drift profile: --repeats must be at least 1", file=sys.stderr)
        return 2
    import dataclasses

    from ..engine.llm_engine import LLMEngine
    from ..engine.measure import EngineMeasurer
    from ..multiplex.analytic import ModelShape
    from ..multiplex.model_select import model_identity
    from ..multiplex.profile import ProfileGrid, format_fit_report, run_profile
    from ..partition import make_partitioner

    engine = LLMEngine(config.model_copy(update={"policy": "chunked"}))
    partitioner = make_partitioner(config.partition.backend, engine.device)
    if partitioner.reason:
        print(f"partitions: {partitioner.reason}")
    on_cpu = engine.device.type == "cpu"
    splits = partitioner.splits
    if on_cpu:  # splits are nominal on a CPU: one whole-device point per phase plus the mixed ones
        splits = [s for s in splits if s.is_mixed] + [max(splits, key=lambda s: s.prefill_sms)]
    grid = (
        ProfileGrid.quick(engine.max_model_len)
        if args.quick or on_cpu
        else ProfileGrid(max_context=engine.max_model_len)
    )
    if on_cpu and not args.quick:  # still measure how much the two phases slow each other down
        grid = dataclasses.replace(grid, contention_points=(((128, 0), (4, 512)),))
    if args.repeats is not None:
        grid = dataclasses.replace(grid, repeats=args.repeats)
    if args.no_contention:
        grid = dataclasses.replace(grid, contention_points=())
    m = EngineMeasurer(engine, partitioner)
    dtype = str(engine.dtype).removeprefix("torch.")
    device = "cpu" if on_cpu else __import__("torch").cuda.get_device_name(engine.device)
    # Keyed by what the model is, not by its name or path: a renamed or moved model keeps its profile.
    architecture = (getattr(engine.hf_config, "architectures", None) or [None])[0]
    identity = model_identity(ModelShape.from_hf_config(engine.hf_config, dtype), architecture)
    result = run_profile(
        m.prefill,
        m.decode,
        splits=splits,
        model=identity,
        label=engine.model_name,
        device=device,
        dtype=dtype,
        total_sms=partitioner.total_sms,
        num_layers=engine.runner.model.num_layers,
        grid=grid,
        measure_concurrent=None if args.no_contention else m.concurrent,
        out_path=args.output,
        plot_path=args.plot,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )
    print(format_fit_report(result.profile))
    print(f"saved {result.json_path}" + (f" and {result.plot_path}" if result.plot_path else ""))
    return 0
