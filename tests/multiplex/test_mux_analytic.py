from __future__ import annotations

import math

import pytest

from drift_agent.multiplex.analytic import AnalyticPerfModel, ModelShape, bandwidth_share
from drift_agent.multiplex.devices import DeviceSpec, cpu_device_spec, lookup_device, measure_cpu_flops
from drift_agent.multiplex.perf_model import PrefillShape

LLAMA_8B = ModelShape(32, 4096, 32, 8, 128, 14336, 128256)
QWEN_05B = ModelShape.from_hf_config(
    {
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
    }
)


@pytest.mark.parametrize(
    ("name", "sms", "bw"),
    [
        ("NVIDIA H100 80GB HBM3", 132, 3.35e12),
        ("NVIDIA H100 PCIe", 114, 2.0e12),
        ("NVIDIA H200", 132, 4.8e12),
        ("NVIDIA A100-SXM4-80GB", 108, 2.039e12),
        ("NVIDIA A100-SXM4-40GB", 108, 1.555e12),
        ("NVIDIA L40S", 142, 0.864e12),
        ("NVIDIA L4", 58, 0.3e12),
    ],
)
def test_known_devices(name: str, sms: int, bw: float) -> None:
    spec = lookup_device(name)
    assert spec is not None and spec.sms == sms and spec.mem_bw == pytest.approx(bw)
    assert lookup_device("Some Unknown Accelerator") is None


def test_cpu_spec_and_measurement() -> None:
    spec = cpu_device_spec(cores=4)
    assert spec.sms == 4 and spec.peak_flops == 200e9 and spec.source == "conservative default"
    flops = measure_cpu_flops(size=64, repeats=2)
    assert flops > 1e6 and cpu_device_spec(flops=flops, cores=2).source == "measured"
    with pytest.raises(ValueError):
        DeviceSpec("x", 0, 1.0, 1.0)


def test_shape_from_hf_config() -> None:
    assert QWEN_05B.head_dim == 64 and QWEN_05B.num_kv_heads == 2 and QWEN_05B.dtype_bytes == 2
    # Llama-3-8B: ~7B non-embedding params + 0.5B LM head, 128 KiB of KV per token in bf16.
    assert LLAMA_8B.num_layers * LLAMA_8B.layer_params == pytest.approx(6.98e9, rel=0.01)
    assert LLAMA_8B.kv_bytes_per_token == 131072
    with pytest.raises(ValueError):
        ModelShape(0, 1, 1, 1, 1, 1, 1)


def test_bandwidth_share_saturates() -> None:
    assert bandwidth_share(0.0) == 0.0 and bandwidth_share(1.0) == pytest.approx(1.0)
    assert bandwidth_share(0.3) > 0.8  # a decode on 30% of the SMs gets most of the bandwidth
    xs = [i / 20 for i in range(21)]
    ys = [bandwidth_share(x) for x in xs]
    assert ys == sorted(ys)
    assert all(bandwidth_share(x) >= x for x in xs)  # concave: never below the proportional share


@pytest.mark.parametrize("shape", [LLAMA_8B, QWEN_05B])
@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"])
def test_monotonic(shape: ModelShape, device: str) -> None:
    m = AnalyticPerfModel(shape, lookup_device(device))
    n = m.total_sms
    sms = [8, 16, 20, 36, 60, 72, 100, n]
    for t, p in ((16, 0), (512, 0), (4096, 8192)):
        times = [m.prefill_time(PrefillShape(t, p), s) for s in sms]
        assert all(a >= b for a, b in zip(times, times[1:], strict=False)), "more SMs must not be slower"
    for bs, k in ((1, 512), (64, 65536)):
        times = [m.decode_time(bs, k, s) for s in sms]
        assert all(a >= b for a, b in zip(times, times[1:], strict=False))
    toks = [m.prefill_time(PrefillShape(t), 60) for t in (1, 16, 256, 2048, 16384)]
    assert toks == sorted(toks), "more tokens must not be faster"
    prefix = [m.prefill_time(PrefillShape(1024, p), 60) for p in (0, 4096, 32768)]
    assert prefix == sorted(prefix)
    assert [m.decode_time(b, 1024 * b, 30) for b in (1, 8, 64, 256)] == sorted(
        m.decode_time(b, 1024 * b, 30) for b in (1, 8, 64, 256)
    )
    assert math.isinf(m.decode_time(1, 1, 0)) and m.decode_time(0, 0, 10) == 0.0


def test_plausible_magnitudes_h100_llama8b() -> None:
    m = AnalyticPerfModel(LLAMA_8B, lookup_device("NVIDIA H100 80GB HBM3"))
    # Decode of one sequence is bound by streaming ~16 GB of weights at ~3.35 TB/s.
    assert 0.004 < m.decode_time(1, 1024, 132) < 0.010
    # A 2K-token prefill is compute bound: ~33 TFLOP at a fraction of 989 TFLOP/s.
    assert 0.03 < m.prefill_time(PrefillShape(2048), 132) < 0.12
    # Decode barely slows on 30% of the SMs (bandwidth saturates); prefill slows ~3x.
    assert m.decode_time(8, 8192, 40) < 1.3 * m.decode_time(8, 8192, 132)
    assert m.prefill_time(PrefillShape(4096), 40) > 2.5 * m.prefill_time(PrefillShape(4096), 132)
    assert m.decode_time(8, 8192, 40, contended=True) == pytest.approx(1.3 * m.decode_time(8, 8192, 40))


def test_invalid_efficiency() -> None:
    with pytest.raises(ValueError):
        AnalyticPerfModel(LLAMA_8B, lookup_device("NVIDIA H200"), compute_eff=0)


def test_select_perf_model_prefers_matching_profile(tmp_path) -> None:
    from drift_agent.multiplex.model_select import select_perf_model
    from drift_agent.multiplex.perf_model import FittedPerfModel
    from drift_agent.multiplex.schema import (
        DecodeGrid,
        DecodeRegime,
        PerfProfile,
        PrefillGrid,
        PrefillRegime,
        ProfileError,
        save_profile,
    )

    shape = ModelShape(2, 64, 4, 2, 16, 128, 100)
    dev = lookup_device("NVIDIA L40")
    assert dev is not None and dev.name == "NVIDIA L40"
    prof = PerfProfile(
        model="tiny", device="NVIDIA L40", dtype="bfloat16", total_sms=142, num_layers=2,
        prefill=[PrefillGrid(sms=142, regimes=[PrefillRegime(a=0, b=0, c=1e-3, d=1e-4)])],
        decode=[DecodeGrid(sms=142, regimes=[DecodeRegime(a=0, b=1e-5, c=1e-3)])],
    )  # fmt: skip
    path = tmp_path / "p.json"
    save_profile(path, prof)
    kw = dict(model="tiny", device_name="NVIDIA L40", dtype="bfloat16", shape=shape, device=dev)
    model, why = select_perf_model(profile_path=path, **kw)
    assert isinstance(model, FittedPerfModel) and "profile" in why
    other, why = select_perf_model(profile_path=path, **{**kw, "dtype": "float16"})
    assert isinstance(other, AnalyticPerfModel) and "no profile for tiny/NVIDIA L40/float16" in why
    with pytest.raises(ProfileError):
        select_perf_model(profile_path=path, strict=True, **{**kw, "dtype": "float16"})
    wrong_depth = {**kw, "shape": ModelShape(3, 64, 4, 2, 16, 128, 100)}
    assert isinstance(select_perf_model(profile_path=path, **wrong_depth)[0], AnalyticPerfModel)
    assert isinstance(select_perf_model(profile_path=None, **kw)[0], AnalyticPerfModel)
