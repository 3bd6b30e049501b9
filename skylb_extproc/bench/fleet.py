"""Per-region fleets and load levels from the bench flags.

`--profile` names one calibration profile for every region, or one per region
(`us=h100-llama3.1-8b,eu=l4-llama3.1-8b,asia=l4-llama3.1-8b`: every region named once, all
serving the same model, since a balancer routes one model). `--replicas-per-region` is one
count for every region or one count per region in region order. `--rate-scale` is one level or
a comma list of levels (a load sweep). Errors are `ValueError`s whose message starts with the
flag, so the CLI can print them and exit 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from skylb_extproc.sim.profiles import PROFILES, Profile

__all__ = ["level_name", "parse_counts", "parse_levels", "parse_profiles", "per_region"]


def parse_profiles(text: str, regions: Sequence[str]) -> str | tuple[str, ...]:
    """One profile name (every region), or a name per region in region order."""
    text = text.strip()
    if "=" not in text:
        _known(text)
        return text
    given: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        region, sep, name = part.partition("=")
        if not sep or not region.strip() or region.strip() in given:
            raise ValueError(f"--profile: expected region=profile once per region, got {part!r}")
        given[region.strip()] = _known(name.strip())
    unknown = sorted(set(given) - set(regions))
    missing = [r for r in regions if r not in given]
    if unknown or missing:
        raise ValueError(
            f"--profile: every region needs a profile: missing {missing}, unknown {unknown} "
            f"(regions: {', '.join(regions)})"
        )
    names = tuple(given[r] for r in regions)
    models = {PROFILES[n].model for n in names}
    if len(models) > 1:
        different = sorted(models)
        raise ValueError(f"--profile: the regions' profiles serve different models: {different}")
    return names[0] if len(set(names)) == 1 else names


def _known(name: str) -> str:
    if name not in PROFILES:
        raise ValueError(f"--profile: unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    return name


def parse_counts(text: str, regions: Sequence[str]) -> int | tuple[int, ...]:
    """One replica count (every region) or one per region, each >= 1."""
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--replicas-per-region: not integers: {text!r}") from None
    if any(c < 1 for c in counts):
        raise ValueError("--replicas-per-region must be >= 1")
    if len(counts) == 1:
        return counts[0]
    if len(counts) != len(regions):
        raise ValueError(
            f"--replicas-per-region: {len(counts)} counts for {len(regions)} regions "
            "(give one count, or one per region)"
        )
    return counts


def parse_levels(text: str) -> tuple[float, ...]:
    """`--rate-scale`: one level or a comma list, each a finite number > 0, no repeats."""
    try:
        levels = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--rate-scale: not numbers: {text!r}") from None
    if any(not math.isfinite(x) or x <= 0 for x in levels):
        raise ValueError(f"--rate-scale: every level must be a number > 0, got {text!r}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"--rate-scale: a level is repeated in {text!r}")
    return levels


def level_name(level: float) -> str:
    """`x4`, `x1.5`: the records folder and table heading of a level."""
    return f"x{level:g}"


def per_region(value: str | tuple[str, ...], regions: Sequence[str]) -> dict[str, Profile]:
    """Region -> Profile from a parsed `--profile`."""
    names = (value,) * len(regions) if isinstance(value, str) else value
    return {r: PROFILES[n] for r, n in zip(regions, names, strict=True)}
