"""Resource arithmetic of the control plane, in one place. Pure logic, no Ray.

    free = free_of(total, [run.group.bundles for run in running])   # what our jobs leave free
    free = take(free, bundles_of(plan, cfg.resources))              # a job admitted on it
    free = give_back(free, run.group.bundles)                       # what a job would release

Resources are node id -> {"CPU": n, "GPU": n, ...} (Ray's names); bundles are (node, resources)
pairs, `workers.placement.bundles_of` of a plan. Every function returns a new mapping; CPU counts
are rounded to 4 decimals, so fractions of a CPU per rank add up exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.placement import Bundle

Resources = dict[str, dict[str, float]]


def _moved(free: Resources, bundles: Iterable[Bundle], sign: int, only_known: bool) -> Resources:
    out = {node: dict(res) for node, res in free.items()}
    for node, bundle in bundles:
        if only_known and node not in out:  # a node that left the cluster holds nothing any more
            continue
        res = out.setdefault(node, {})
        for key, amount in bundle.items():
            res[key] = round(res.get(key, 0) + sign * amount, 4)
    return out


def take(free: Resources, bundles: Iterable[Bundle]) -> Resources:
    """`free` less what `bundles` hold (on nodes still listed)."""
    return _moved(free, bundles, -1, only_known=True)


def give_back(free: Resources, bundles: Iterable[Bundle]) -> Resources:
    """`free` plus what `bundles` hold: the room a job would leave if it stopped."""
    return _moved(free, bundles, +1, only_known=False)


def free_of(total: Resources, holdings: Iterable[Iterable[Bundle]]) -> Resources:
    """What is free on each alive node once every holding (one job's bundles each) is taken."""
    free = {node: dict(res) for node, res in total.items()}
    for bundles in holdings:
        free = take(free, bundles)
    return free
