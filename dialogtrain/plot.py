"""`dialogtrain plot RUN [RUN...]`: the curves of one or more runs' metrics.jsonl in one PNG.

Panels, each drawn only when some run has the metric: training loss, held-out loss (eval_loss),
held-out loss by data source (eval_loss/NAME, one line style per source), DPO rewards (chosen /
rejected, and the held-out reward accuracy), and throughput (tokens_per_s, mfu). Every run is one
colour across the panels, labelled with its folder name.
"""

from __future__ import annotations

from pathlib import Path

from dialogtrain.errors import UserError

# (title, [(metric, label suffix)]) per panel; the metrics of one panel get the line styles in turn
PANELS = [
    ("training loss", [("loss", "")]),
    ("held-out loss", [("eval_loss", "")]),
    ("DPO rewards", [("rewards/chosen", " chosen"), ("rewards/rejected", " rejected"),
                     ("rewards/margins", " margin")]),
    ("held-out reward accuracy", [("eval_rewards/accuracies", "")]),
    ("tokens/s", [("tokens_per_s", "")]),
    ("MFU", [("mfu", "")]),
]
STYLES = ["-", "--", ":", "-."]
SOURCE_PANEL = ("held-out loss by source", "eval_loss/")  # after the held-out loss; a line per source found


def panels_of(data: dict[str, list[dict]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels the runs have a metric of: PANELS, and the per-source panel when some run has eval_loss/NAME
    (its series: each source name, sorted, labelled " NAME")."""
    found = {name for records in data.values() for record in records for name in record}
    panels = [(title, series) for title, series in PANELS if any(name in found for name, _ in series)]
    title, prefix = SOURCE_PANEL
    sources = sorted(name for name in found if name.startswith(prefix))
    if sources:
        at = next((k + 1 for k, (t, _) in enumerate(panels) if t == "held-out loss"), len(panels))
        panels.insert(at, (title, [(name, " " + name.removeprefix(prefix)) for name in sources]))
    return panels


def read_runs(runs: list[str | Path]) -> dict[str, list[dict]]:
    """{label: records} of each run folder (or metrics.jsonl file); a missing or empty one is a UserError."""
    from dialogtrain.train.metrics import read_metrics

    out = {}
    for run in runs:
        path = Path(run)
        metrics = path if path.is_file() else path / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"{run}: no metrics.jsonl (is it a run folder of dialogtrain sft/dpo?)")
        records = read_metrics(metrics)
        if not records:
            raise UserError(f"{metrics}: empty, nothing to plot")
        label = (path.parent if path.is_file() else path).name or str(path)
        while label in out:
            label += "'"
        out[label] = records
    return out


def plot_runs(runs: list[str | Path], output: str | Path) -> Path:
    """Write the PNG of `runs` to `output`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_runs(runs)
    panels = panels_of(data)
    columns = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes.flat, panels):
        for k, (label, records) in enumerate(data.items()):
            for k_series, (name, suffix) in enumerate(series):
                style = STYLES[k_series % len(STYLES)]
                points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, color=colours[k % len(colours)],
                            marker="o" if len(points) < 3 else None, markersize=3, label=label + suffix)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
