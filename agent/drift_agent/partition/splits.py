"""Which (prefill, decode) SM splits to pre-create: pure functions, unit-tested without a GPU."""

from __future__ import annotations

from .base import Split

# Green-context partition constraints by compute capability major: (minimum SMs per partition, alignment).
# From the CUDA driver API green-context guidelines (6.x: ≥1; 7.x: ≥2, even; 8.x: ≥4, even; 9.0+: ≥8, multiple
# of 8), the same table as SGLang's get_arch_constraints and FlashInfer's round_up(min_count, 8). Used only when
# the driver does not report `minSmPartitionSize` / `smCoscheduledAlignment` (CUDA 13 fields).
_ARCH_CONSTRAINTS: dict[int, tuple[int, int]] = {6: (1, 1), 7: (2, 2), 8: (4, 2)}


def arch_constraints(compute_capability: tuple[int, int]) -> tuple[int, int]:
    """(min SMs per partition, SM alignment) for a compute capability; ValueError below 6.0."""
    major = compute_capability[0]
    if major < 6:
        raise ValueError(
            f"green contexts need compute capability >= 6.0, got {major}.{compute_capability[1]}"
        )
    return _ARCH_CONSTRAINTS.get(major, (8, 8))


def candidate_splits(
    total_sms: int,
    min_size: int,
    alignment: int,
    *,
    max_mixed: int = 6,
    min_decode_sms: int = 16,
    prefill_majority: bool = True,
) -> list[Split]:
    """[(N, 0), mixed splits with the prefill share descending, (0, N)].

    The prefill partition is the one carved out of the device (so its size obeys `min_size` and `alignment`);
    decode gets the remainder, which the driver allows to be unaligned. As in SGLang's `divide_sm`, mixed splits
    keep prefill ≥ decode (decode needs "just enough" SMs; a decode that needs more than half the GPU runs on
    (0, N)) and decode ≥ `min_decode_sms`. Unlike SGLang, when there are more candidates than `max_mixed` we
    keep evenly spaced ones *including both extremes*, so the smallest decode share is always available.
    With no valid mixed split (a small device), only the two whole-device ends are returned.
    """
    if total_sms <= 0 or min_size <= 0 or alignment <= 0 or max_mixed < 0:
        raise ValueError("candidate_splits: total_sms, min_size and alignment must be positive")
    first = -(-min_size // alignment) * alignment  # smallest aligned size ≥ min_size
    values = [
        x
        for x in range(first, total_sms, alignment)
        if total_sms - x >= max(min_decode_sms, 1) and (x >= total_sms - x or not prefill_majority)
    ]
    if len(values) > max_mixed:
        if max_mixed == 0:
            values = []
        elif max_mixed == 1:
            values = [values[-1]]
        else:
            last = len(values) - 1
            picks = sorted({round(i * last / (max_mixed - 1)) for i in range(max_mixed)})
            values = [values[i] for i in picks]
    mixed = [Split(x, total_sms - x) for x in sorted(values, reverse=True)]
    return [Split(total_sms, 0), *mixed, Split(0, total_sms)]


def nearest_split(splits: list[Split], prefill_share: float) -> Split:
    """The mixed split whose prefill share is closest to `prefill_share` (ties: more decode SMs); for the
    static-split policy. Falls back to all splits when none is mixed."""
    pool = [s for s in splits if s.is_mixed] or list(splits)
    if not pool:
        raise ValueError("no splits to choose from")
    return min(pool, key=lambda s: (abs(s.prefill_sms / s.total - prefill_share), s.prefill_sms))
