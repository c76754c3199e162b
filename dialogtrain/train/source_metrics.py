"""Eval metrics per data source (`eval_loss/support`, ...): sums kept by source, reduced over all ranks.

The eval examples carry the name of their source (data.prepare tags them). With two sources or more,
an evaluation adds each example's value and weight under its source (SFT: the summed token NLL and
the token count; preference pairs: the pair loss and 1), and reports value / weight per source. Every
rank holds the whole eval set, so every rank knows the same names and reduces the same list.
"""

from __future__ import annotations

from collections.abc import Sequence


class SourceTotals:
    """Value and weight sums by source name; inactive (falsy, adds nothing) with fewer than two sources."""

    def __init__(self, examples: Sequence[dict]):
        self.sources = [example.get("source", "") for example in examples]
        self.names = sorted(set(self.sources)) if len(set(self.sources)) > 1 else []
        self.totals = {name: [0.0, 0.0] for name in self.names}

    def __bool__(self) -> bool:
        return bool(self.names)

    def add(self, indices: Sequence[int], values: Sequence[float], weights: Sequence[float]) -> None:
        """Example indices[k] scored values[k] with weight weights[k]."""
        for i, value, weight in zip(indices, values, weights, strict=True):
            total = self.totals[self.sources[i]]
            total[0] += value
            total[1] += weight

    def means(self, world, metric: str) -> dict[str, float]:
        """{f"{metric}/{name}": all ranks' value sum / weight sum} for each source; {} when inactive."""
        if not self:
            return {}
        sums = world.sum(*(x for name in self.names for x in self.totals[name]))
        return {f"{metric}/{name}": sums[2 * k] / max(sums[2 * k + 1], 1e-12) for k, name in enumerate(self.names)}
