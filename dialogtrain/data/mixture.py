"""Dataset mixtures: `--data support.jsonl:0.7,chitchat.yaml:0.3` read into sources, and each epoch drawn by weight.

Reading a --data value (parse_sources), so that paths may hold ',' and ':':
1. a value that names an existing file or folder as a whole is one source;
2. otherwise it is a comma-separated list of sources. In each, the text after the LAST ':' is a weight
   when it reads as a number and the text before it is the source (`data/v1:2/a.jsonl:0.5` is the file
   `data/v1:2/a.jsonl`, weight 0.5); otherwise the whole item is the source (a hub id `name:config`).
Either every source has a weight or none has. Several sources without weights are concatenated, each
used whole every epoch, like the files of a folder. Weights are relative (0.7/0.3 and 7/3 are one
mixture), finite and > 0, and need two sources at least. `--eval-data` reads the same way; its
weights are ignored (every eval example is evaluated once).

Each source has a name for messages and metrics (`eval_loss/support`): its file or folder name without
the extension (a hub id: the dataset's name), with parent folders added while names clash.

The draw (EpochDraw): an epoch has as many examples as all sources together (N), and source i gives
round(w_i N) of them (largest remainders, so the counts sum to N). They are the next stretch of an
endless stream of the source's examples, seeded permutations one after the other (permutation r of
source i seeded by (seed, i, r)): a source larger than its share is subsampled, using all its examples
before any twice; a smaller one repeats, each example k or k+1 times per epoch. The epoch's examples
are then shuffled into steps like any data set (data.sampling), so an epoch is a function of (seed,
epoch) only and a resumed run draws the same.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dialogtrain.data.sources import DATA_EXTENSIONS, looks_like_path, parse_hub_id


@dataclass(frozen=True)
class Source:
    """One source of a --data value: where it is (a path or hub id), its name, its weight (None: none given)."""

    location: str
    name: str
    weight: float | None = None


class MixtureError(ValueError):
    """A --data value that cannot be read as sources; the message says why, without the flag."""


def parse_sources(value: str) -> list[Source]:
    """The sources of a --data value (module docstring). Raises MixtureError for an empty source, a bad
    weight, weights on some sources only, a weight on a single source, or a source given twice."""
    if Path(value).expanduser().exists():
        items = [(value, None)]
    else:
        items = [split_weight(item.strip()) for item in value.split(",")]
    if any(not location for location, _ in items):
        raise MixtureError(f"{value!r}: an empty source (sources are separated by ',')")
    weights = [weight for _, weight in items if weight is not None]
    for weight in weights:
        if not (math.isfinite(weight) and weight > 0):
            raise MixtureError(f"{value!r}: weights must be finite numbers > 0, got {weight:g}")
    if weights and len(weights) != len(items):
        raise MixtureError(f"{value!r}: give every source a weight (SOURCE:WEIGHT) or none")
    if len(items) == 1 and weights:
        raise MixtureError(f"{value!r}: a weight needs two sources at least (a.jsonl:0.7,b.yaml:0.3)")
    locations = [location for location, _ in items]
    twice = next((location for k, location in enumerate(locations) if location in locations[:k]), None)
    if twice is not None:
        raise MixtureError(f"{value!r}: {twice} is given twice (a larger weight gives it more)")
    names = source_names(locations)
    return [Source(location, name, weight) for (location, weight), name in zip(items, names, strict=True)]


def split_weight(item: str) -> tuple[str, float | None]:
    """`support.jsonl:0.7` -> ("support.jsonl", 0.7); an existing path or an item whose text after the last
    ':' is no number stays whole: `org/set:config` -> ("org/set:config", None)."""
    location, colon, tail = item.rpartition(":")
    if not colon or Path(item).expanduser().exists():
        return item, None
    try:
        return location, float(tail)
    except ValueError:
        return item, None


def source_names(locations: list[str]) -> list[str]:
    """Short unique names: the last path part without a data extension (`data/support.jsonl` -> support),
    or a hub id's dataset name (`org/chat:en@train` -> chat); more parent parts while two names clash."""
    parts = [name_parts(location) for location in locations]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or all(depth >= len(p) for p in parts):
            return names
        depth += 1


def name_parts(location: str) -> list[str]:
    """The path parts a name is made of, the last without its data extension."""
    if not (Path(location).expanduser().exists() or looks_like_path(location)):
        location = parse_hub_id(location)[0]  # org/name, without config and split
    path = PurePosixPath(location.replace("\\", "/"))
    parts = [part for part in path.parts if part not in ("/", ".", "..", "~")] or [location]
    last = parts[-1]
    for extension in DATA_EXTENSIONS:
        if last.lower().endswith(extension):
            last = last[:-len(extension)]
            break
    return parts[:-1] + [last or parts[-1]]


def weighted(sources: list[Source]) -> bool:
    return len(sources) > 1 and all(source.weight is not None for source in sources)


def sources_fingerprint(value: str) -> str:
    """What resume compares: one source's data_fingerprint (as before mixtures), else a sha256 over every
    source's fingerprint and weight."""
    from dialogtrain.data.sources import data_fingerprint

    sources = parse_sources(value)
    if len(sources) == 1:
        return data_fingerprint(sources[0].location)
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{data_fingerprint(source.location)}\0{source.weight}\0".encode())
    return digest.hexdigest()


def epoch_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Examples drawn from each source per epoch: weight shares of sum(sizes), largest remainders first.

    sizes [500, 1500], weights [0.7, 0.3] -> [1400, 600]; sizes [1, 1, 1], weights [1, 1, 1] -> [1, 1, 1].
    """
    total, weight_sum = sum(sizes), sum(weights)
    quotas = [total * w / weight_sum for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class EpochDraw:
    """Which examples (indices into the training set) make each epoch. Unweighted: all of them, in order."""

    names: list[str]
    weights: list[float] | None
    members: list[list[int]]  # the example indices of each source
    counts: list[int]  # drawn from each source per epoch
    seed: int

    @classmethod
    def of(cls, data: str, example_sources: list[str], seed: int) -> EpochDraw:
        """The draw of a run whose --data is `data` and whose i-th training example came from the source
        named example_sources[i]. Raises MixtureError when a weighted source has no examples left."""
        sources = parse_sources(data)
        if not weighted(sources):
            everything = list(range(len(example_sources)))
            return cls([s.name for s in sources], None, [everything], [len(everything)], seed)
        members: dict[str, list[int]] = {source.name: [] for source in sources}
        for i, name in enumerate(example_sources):
            if name not in members:
                raise MixtureError(f"training example {i} comes from {name!r}, not one of the sources")
            members[name].append(i)
        empty = [source.name for source in sources if not members[source.name]]
        if empty:
            raise MixtureError(f"source {empty[0]} has no training example left to draw from (all bad, "
                               "duplicates of an earlier source, or held out)")
        weights = [source.weight for source in sources]
        counts = epoch_counts([len(members[s.name]) for s in sources], weights)
        return cls([s.name for s in sources], weights, list(members.values()), counts, seed)

    def examples(self, epoch: int) -> list[int]:
        """The training-set indices of `epoch`: every example once (unweighted), else each source's stretch
        of its stream, source after source (data.sampling shuffles them into steps)."""
        if self.weights is None:
            return list(self.members[0])
        drawn = []
        for k, (members, count) in enumerate(zip(self.members, self.counts, strict=True)):
            drawn += self.stream(k, members, epoch * count, (epoch + 1) * count)
        return drawn

    def stream(self, k: int, members: list[int], start: int, stop: int) -> list[int]:
        """Positions [start, stop) of source k's stream: permutation r of its members covers r*n .. r*n+n-1."""
        n, out = len(members), []
        for r in range(start // n, -(-stop // n)):
            order = list(members)
            random.Random(f"{self.seed}/{k}/{r}").shuffle(order)
            out += order[max(start - r * n, 0):min(stop - r * n, n)]
        return out

    def summary(self) -> str:
        """e.g. `mixture, per epoch of 2000: support 0.7 -> 1400 of its 500 (repeated 2.8x), chitchat 0.3 ->
        600 of its 1500 (subsampled, 40%)`; '' when unweighted."""
        if self.weights is None:
            return ""
        total = sum(self.counts)
        parts = []
        for name, weight, members, count in zip(self.names, self.weights, self.members, self.counts, strict=True):
            size = len(members)
            how = ("all" if count == size else f"repeated {count / size:.2f}x" if count > size
                   else f"subsampled, {100 * count / size:.0f}%")
            parts.append(f"{name} {weight:g} -> {count} of its {size} ({how})")
        return f"mixture, per epoch of {total}: " + ", ".join(parts)
