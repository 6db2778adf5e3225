"""The on-disk performance profile (`drift profile` output): pydantic models, JSON save and load.

One file holds any number of profiles keyed by (model, device, dtype), so one path can serve a fleet of nodes
with different GPUs. The file carries a `schema_version`; a file of another version or a malformed file is
refused with a `ProfileError` that names the path and the problem (never a bare traceback).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.errors import DriftError

SCHEMA_VERSION = 1


class ProfileError(DriftError, ValueError):
    """A profile file is missing, malformed, of another schema version, or has no matching profile."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FitError(_Strict):
    """Training-set error of one fitted grid: mean and worst absolute percentage error."""

    samples: int = Field(ge=0)
    mape: float = Field(ge=0.0, description="mean absolute percentage error, in percent")
    max_abs_pct: float = Field(ge=0.0, description="largest absolute percentage error, in percent")


class PrefillRegime(_Strict):
    """`t = a·(T/1024)² + b·(T/1024)(P/1024) + c·(T/1024) + d` seconds, for total new tokens T ≤ upper_tokens."""

    upper_tokens: int | None = Field(None, gt=0, description="inclusive upper bound of T; None = unbounded")
    a: float
    b: float
    c: float
    d: float


class DecodeRegime(_Strict):
    """`t = a·(K/1024) + b·B + c + e·(K/1024)²` seconds, for total KV tokens K ≤ upper_kv_tokens."""

    upper_kv_tokens: int | None = Field(None, gt=0)
    a: float
    b: float
    c: float
    e: float = 0.0


def _check_regimes(regimes: list[Any], attr: str) -> None:
    bounds = [getattr(r, attr) for r in regimes]
    if bounds[-1] is not None:
        raise ValueError(f"the last regime must be unbounded ({attr}=null)")
    finite = [b for b in bounds[:-1]]
    if any(b is None for b in finite):
        raise ValueError(f"only the last regime may have {attr}=null")
    if finite != sorted(set(finite)):
        raise ValueError(f"regime bounds ({attr}) must be strictly increasing")


class PrefillGrid(_Strict):
    sms: int = Field(gt=0, description="SM count this grid was measured on")
    regimes: list[PrefillRegime] = Field(min_length=1)
    error: FitError | None = None

    @field_validator("regimes")
    @classmethod
    def _regimes(cls, v: list[PrefillRegime]) -> list[PrefillRegime]:
        _check_regimes(v, "upper_tokens")
        return v


class DecodeGrid(_Strict):
    sms: int = Field(gt=0)
    regimes: list[DecodeRegime] = Field(min_length=1)
    error: FitError | None = None

    @field_validator("regimes")
    @classmethod
    def _regimes(cls, v: list[DecodeRegime]) -> list[DecodeRegime]:
        _check_regimes(v, "upper_kv_tokens")
        return v


class Contention(_Strict):
    """Slowdown factors applied when the other phase co-runs (green contexts split SMs, not HBM bandwidth/L2).

    `per_sms_*` maps the phase's own SM count to a measured factor; a lookup without an exact key uses the
    nearest measured SM count, and with no measurement at all the scalar default (a worst-case guard:
    MuxWise reports decode slowdowns up to ~20% on A100 and ~30% on H100).
    """

    decode_slowdown: float = Field(1.3, ge=1.0)
    prefill_slowdown: float = Field(1.1, ge=1.0)
    per_sms_decode: dict[int, float] = Field(default_factory=dict)
    per_sms_prefill: dict[int, float] = Field(default_factory=dict)
    measured: bool = False

    @field_validator("per_sms_decode", "per_sms_prefill")
    @classmethod
    def _factors(cls, v: dict[int, float]) -> dict[int, float]:
        for sms, f in v.items():
            if sms <= 0 or not (f >= 1.0 and math.isfinite(f)):
                raise ValueError(f"contention factor for {sms} SMs must be a finite number >= 1 (got {f})")
        return v


class PrefillSample(_Strict):
    sms: int = Field(gt=0)
    new_tokens: int = Field(gt=0)
    cached_tokens: int = Field(ge=0)
    seconds: float = Field(gt=0)


class DecodeSample(_Strict):
    sms: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    kv_tokens: int = Field(gt=0)
    seconds: float = Field(gt=0)


class FitSummary(_Strict):
    """Worst and mean fit error over all grids of a profile (percent)."""

    prefill_mape: float
    prefill_max_abs_pct: float
    decode_mape: float
    decode_max_abs_pct: float
    worst_grid: str


class PerfProfile(_Strict):
    model: str = Field(min_length=1)
    device: str = Field(min_length=1)
    dtype: str = Field(min_length=1)
    total_sms: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    # Share of the prefill cost spent in each layer (sums to 1); None = an even split.
    layer_fractions: list[float] | None = None
    prefill: list[PrefillGrid] = Field(min_length=1)
    decode: list[DecodeGrid] = Field(min_length=1)
    contention: Contention = Field(default_factory=Contention)
    prefill_samples: list[PrefillSample] = Field(default_factory=list)
    decode_samples: list[DecodeSample] = Field(default_factory=list)
    created_at: str | None = None
    notes: str | None = None

    @model_validator(mode="after")
    def _check(self) -> PerfProfile:
        for name, grids in (("prefill", self.prefill), ("decode", self.decode)):
            sms = [g.sms for g in grids]
            if len(set(sms)) != len(sms):
                raise ValueError(f"duplicate SM counts in the {name} grids: {sorted(sms)}")
            if max(sms) > self.total_sms:
                raise ValueError(f"{name} grid SM count {max(sms)} exceeds total_sms {self.total_sms}")
        if self.layer_fractions is not None:
            if len(self.layer_fractions) != self.num_layers:
                raise ValueError(
                    f"layer_fractions has {len(self.layer_fractions)} entries, expected num_layers={self.num_layers}"
                )
            if any(f < 0 for f in self.layer_fractions) or not math.isclose(
                sum(self.layer_fractions), 1.0, rel_tol=1e-3
            ):
                raise ValueError("layer_fractions must be non-negative and sum to 1")
        return self

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.device, self.dtype)

    def fit_error(self) -> FitSummary:
        """Mean of the per-grid MAPEs and the worst single-sample error, per phase."""
        worst = ("", -1.0)
        out: dict[str, float] = {}
        for name, grids in (("prefill", self.prefill), ("decode", self.decode)):
            errs = [(g.sms, g.error) for g in grids if g.error is not None and g.error.samples > 0]
            out[f"{name}_mape"] = sum(e.mape for _, e in errs) / len(errs) if errs else 0.0
            out[f"{name}_max_abs_pct"] = max((e.max_abs_pct for _, e in errs), default=0.0)
            for sms, e in errs:
                if e.max_abs_pct > worst[1]:
                    worst = (f"{name}@{sms}SM", e.max_abs_pct)
        return FitSummary(**out, worst_grid=worst[0])


class ProfileFile(_Strict):
    schema_version: int
    profiles: list[PerfProfile] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ProfileFile:
        keys = [p.key for p in self.profiles]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate (model, device, dtype) profiles in one file")
        return self


def read_profile_file(path: str | Path) -> ProfileFile:
    """Parse and validate a profile file; every failure is a one-line `ProfileError`."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{p}: profile file not found (run `drift profile` first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{p}: cannot read profile file: {e}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise ProfileError(f"{p}: not a Drift profile file (no schema_version field)")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise ProfileError(
            f"{p}: profile schema_version {raw['schema_version']!r} is not supported "
            f"(this Drift reads version {SCHEMA_VERSION}); re-run `drift profile`"
        )
    try:
        return ProfileFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ProfileError(f"{p}: malformed profile at {where or '<root>'}: {first['msg']}") from None


def load_profile(
    path: str | Path, model: str | None = None, device: str | None = None, dtype: str | None = None
) -> PerfProfile:
    """The profile matching the given keys (None = any). Exactly one must match."""
    file = read_profile_file(path)
    want = {"model": model, "device": device, "dtype": dtype}
    matches = [
        prof for prof in file.profiles if all(v is None or getattr(prof, k) == v for k, v in want.items())
    ]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join("/".join(prof.key) for prof in file.profiles) or "none"
    asked = "/".join(v or "*" for v in want.values())
    if not matches:
        raise ProfileError(f"{path}: no profile for {asked} (available: {available})")
    raise ProfileError(f"{path}: {len(matches)} profiles match {asked}; name model, device and dtype")


def save_profile(path: str | Path, profile: PerfProfile) -> None:
    """Add or replace `profile` (by its key) in the file, creating it if absent; written atomically."""
    p = Path(path)
    existing: list[PerfProfile] = []
    if p.exists():
        existing = [q for q in read_profile_file(p).profiles if q.key != profile.key]
    file = ProfileFile(schema_version=SCHEMA_VERSION, profiles=[*existing, profile])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(file.model_dump_json(indent=2))
    tmp.replace(p)
