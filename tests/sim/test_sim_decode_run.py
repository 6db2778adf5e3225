"""The fast-forward's decode costing: array-form decode times and runs equal their step-by-step forms bit for bit."""

from __future__ import annotations

import math
import random
from array import array

import numpy as np
import pytest

from drift_agent.multiplex.perf_model import PerfModel, PrefillShape
from drift_agent.sim.fast_forward import decode_run
from drift_agent.sim.presets import Hardware, device_preset, model_preset

from .helpers import ConstantModel


def _models() -> list[tuple[str, PerfModel]]:
    out: list[tuple[str, PerfModel]] = [("constant", ConstantModel(0.01))]
    for model, tp in (("llama-3-8b", 1), ("llama-3-70b", 4)):
        out.append((f"{model} tp{tp}", Hardware(model_preset(model), device_preset("h100"), tp).perf_model()))
    return out


@pytest.mark.parametrize(("name", "perf"), _models())
def test_decode_times_equal_decode_time_value_by_value(name, perf):
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 300)
        sms = rng.choice([perf.total_sms, max(1, perf.total_sms // 3), 0])
        kv = np.arange(rng.randint(0, 200_000), rng.randint(200_001, 400_000), rng.randint(1, 5000))
        for contended in (False, True):
            many = perf.decode_times(n, kv, sms, contended=contended)
            one = [perf.decode_time(n, int(k), sms, contended=contended) for k in kv]
            assert many.tolist() == one, name  # exact, not approximate


@pytest.mark.parametrize(("name", "perf"), _models())
def test_prefill_rows_equal_a_shape_per_decode_row(name, perf):
    # The simulator costs a chunked step's decode rows in closed form; the value must not change by a bit.
    rng = random.Random(1)
    for _ in range(200):
        chunks = [
            PrefillShape(rng.randint(1, 2048), rng.choice([0, rng.randint(0, 30_000)]))
            for _ in range(rng.randint(0, 4))
        ]
        rows, context = rng.randint(0, 300), rng.randint(0, 60_000)
        sms = rng.choice([perf.total_sms, max(1, perf.total_sms // 3), 0])
        expanded = [*chunks, *([PrefillShape(1, context)] * rows)]
        for contended in (False, True):
            got = perf.prefill_time(chunks, sms, contended=contended, rows=rows, row_context=context)
            assert got == perf.prefill_time(expanded, sms, contended=contended), name


def _stepwise(after, start, horizon, stop, perf, sms, contended) -> array:
    """decode_run's meaning, one decode_time call per step (the loop it replaced)."""
    order = sorted(after)
    n, kv, gone, step, t = len(order), sum(c for _, c in order), 0, 0, start
    out = array("d")
    while t < horizon:
        while gone < len(order) and order[gone][0] <= step:
            kv -= order[gone][1] + step
            n, gone = n - 1, gone + 1
        if n == 0 or (stop and gone):
            break
        d = perf.decode_time(n, kv, sms, contended=contended)
        out.append(d)
        t, kv, step = t + d, kv + n, step + 1
    return out


@pytest.mark.parametrize(("name", "perf"), _models())
def test_decode_run_equals_stepping(name, perf):
    rng = random.Random(1)
    for _ in range(200):
        after = [(rng.randint(1, 400), rng.randint(2, 8000)) for _ in range(rng.randint(1, 60))]
        start = rng.uniform(0, 100)
        horizon = rng.choice([math.inf, start + rng.uniform(0, 0.05), start + rng.uniform(0, 3)])
        stop = rng.random() < 0.3
        contended = rng.random() < 0.5
        args = (after, start, horizon, stop, perf, perf.total_sms, contended)
        assert decode_run(*args).tolist() == _stepwise(*args).tolist(), name
