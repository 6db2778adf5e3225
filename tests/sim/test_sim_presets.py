"""Hardware presets: model shapes, KV capacity, tensor parallelism, SM splits."""

from __future__ import annotations

import pytest

from drift_agent.multiplex.perf_model import PrefillShape
from drift_agent.sim.presets import (
    MODEL_PRESETS,
    Hardware,
    TensorParallelPerfModel,
    device_preset,
    device_splits,
    model_preset,
)


def test_presets_have_the_published_sizes():
    params = {
        name: (p.shape.num_layers * p.shape.layer_params + 2 * p.shape.vocab_size * p.shape.hidden_size) / 1e9
        for name, p in MODEL_PRESETS.items()
    }
    assert params["llama-3-8b"] == pytest.approx(8.0, abs=0.1)
    assert params["llama-3-70b"] == pytest.approx(70.6, abs=0.3)
    assert params["qwen2.5-7b"] == pytest.approx(7.6, abs=0.1)
    assert params["qwen2.5-32b"] == pytest.approx(32.8, abs=0.3)
    assert model_preset("Llama-3-8B").shape.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_device_names_and_unknowns():
    assert device_preset("h100").name == "NVIDIA H100 SXM"
    assert device_preset("a100-80gb").name == "NVIDIA A100 80GB SXM"
    assert device_preset("NVIDIA H200").sms == 132
    with pytest.raises(ValueError, match="unknown device"):
        device_preset("tpu-v5")
    with pytest.raises(ValueError, match="unknown model"):
        model_preset("gpt-5")


def test_kv_capacity_and_fit():
    hw = Hardware(model_preset("llama-3-8b"), device_preset("h100"))
    blocks = hw.kv_blocks(16, 2048)
    # 80 GB * 0.9 - 16 GB of weights - activations, at 128 KiB per token: about 400k tokens.
    assert 350_000 < blocks * 16 < 450_000
    with pytest.raises(ValueError, match="does not fit"):
        Hardware(model_preset("llama-3-70b"), device_preset("h100")).kv_blocks(16, 2048)
    assert Hardware(model_preset("llama-3-70b"), device_preset("h100"), tp=4).kv_blocks(16, 2048) > 10_000


def test_tensor_parallelism_speeds_up_and_adds_communication():
    shape, gpu = model_preset("llama-3-70b").shape, device_preset("h100")
    tp1 = TensorParallelPerfModel(shape, gpu, 1, 450e9)
    tp4 = TensorParallelPerfModel(shape, gpu, 4, 450e9)
    p1 = tp1.prefill_time(PrefillShape(4096), gpu.sms)
    p4 = tp4.prefill_time(PrefillShape(4096), gpu.sms)
    assert p1 / 4 < p4 < p1 / 3  # ~4x the FLOP/s, minus the all-reduces
    assert tp4.decode_time(64, 64 * 2048, gpu.sms) < tp1.decode_time(64, 64 * 2048, gpu.sms) / 3


def test_splits_follow_the_architecture():
    h100 = device_splits(device_preset("h100"))
    assert h100[0].prefill_sms == 132 and h100[-1].decode_sms == 132
    assert all(s.prefill_sms % 8 == 0 for s in h100[1:-1])
    a100 = device_splits(device_preset("a100"))
    assert all(s.prefill_sms % 2 == 0 and s.decode_sms >= 16 for s in a100[1:-1])
