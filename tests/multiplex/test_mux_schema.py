from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from drift_agent.multiplex.schema import (
    SCHEMA_VERSION,
    DecodeGrid,
    DecodeRegime,
    PerfProfile,
    PrefillGrid,
    PrefillRegime,
    ProfileError,
    load_profile,
    read_profile_file,
    save_profile,
)


def profile(model: str = "llama", device: str = "NVIDIA H100", dtype: str = "bfloat16", **kw) -> PerfProfile:
    kw.setdefault("total_sms", 132)
    return PerfProfile(
        model=model,
        device=device,
        dtype=dtype,
        num_layers=2,
        prefill=[
            PrefillGrid(
                sms=132,
                regimes=[
                    PrefillRegime(upper_tokens=2048, a=1, b=2, c=3, d=4),
                    PrefillRegime(a=1, b=2, c=3, d=5),
                ],
            )
        ],
        decode=[DecodeGrid(sms=20, regimes=[DecodeRegime(a=1, b=2, c=3, e=0.5)])],
        **kw,
    )


def test_round_trip_and_keyed_profiles(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profile.json"
    p1, p2 = profile(), profile(device="NVIDIA A100", layer_fractions=[0.25, 0.75])
    save_profile(path, p1)
    save_profile(path, p2)
    assert load_profile(path, device="NVIDIA H100") == p1
    assert load_profile(path, "llama", "NVIDIA A100", "bfloat16") == p2
    replaced = profile(notes="second run")
    save_profile(path, replaced)
    file = read_profile_file(path)
    assert file.schema_version == SCHEMA_VERSION and len(file.profiles) == 2
    assert load_profile(path, device="NVIDIA H100").notes == "second run"
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_no_or_ambiguous_match(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    save_profile(path, profile())
    save_profile(path, profile(dtype="float16"))
    with pytest.raises(
        ProfileError, match="no profile for qwen/\\*/\\*.*available: llama/NVIDIA H100/bfloat16"
    ):
        load_profile(path, model="qwen")
    with pytest.raises(ProfileError, match="2 profiles match"):
        load_profile(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "no schema_version"),
        ('{"profiles": []}', "no schema_version"),
        ('{"schema_version": 99, "profiles": []}', "schema_version 99 is not supported"),
        ('{"schema_version": 1, "profiles": [{"model": "m"}]}', "malformed profile at profiles.0"),
        ('{"schema_version": 1, "profiles": [], "extra": 1}', "malformed profile at extra"),
    ],
)
def test_malformed_files_give_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.json")


def test_semantic_validation() -> None:
    with pytest.raises(ValidationError, match="last regime must be unbounded"):
        PrefillGrid(sms=8, regimes=[PrefillRegime(upper_tokens=10, a=0, b=0, c=0, d=0)])
    with pytest.raises(ValidationError, match="strictly increasing"):
        DecodeGrid(
            sms=8,
            regimes=[
                DecodeRegime(upper_kv_tokens=10, a=0, b=0, c=0),
                DecodeRegime(upper_kv_tokens=5, a=0, b=0, c=0),
                DecodeRegime(a=0, b=0, c=0),
            ],
        )
    with pytest.raises(ValidationError, match="layer_fractions"):
        profile(layer_fractions=[0.5])
    with pytest.raises(ValidationError, match="sum to 1"):
        profile(layer_fractions=[0.5, 0.6])
    with pytest.raises(ValidationError, match="exceeds total_sms"):
        profile(total_sms=64)
