"""`dialogtrain plot`: PNGs from the metrics.jsonl of fake runs, clear errors for missing ones."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from launcher.cli import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def sft_records(scale=1.0):
    return [{"step": s, "loss": scale * (3 - 0.2 * s), "lr": 1e-4, "tokens_per_s": 500.0 + s, "mfu": 0.3}
            for s in range(1, 11)] + [{"step": 10, "eval_loss": 2.1 * scale, "eval_ppl": 8.2}]


def dpo_records():
    return [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
             "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5, "tokens_per_s": 300.0} for s in range(1, 6)] + \
        [{"step": 5, "eval_loss": 0.6, "eval_rewards/accuracies": 0.75}]


def test_plot_overlays_several_runs_into_a_png(tmp_path):
    runs = [fake_run(tmp_path / "sft-a", sft_records()), fake_run(tmp_path / "sft-b", sft_records(0.9)),
            fake_run(tmp_path / "dpo", dpo_records())]
    output = tmp_path / "out" / "curves.png"
    result = CliRunner().invoke(cli, ["plot", *map(str, runs), "--output", str(output)])
    assert result.exit_code == 0, result.output
    data = output.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_plot_of_one_run_reads_its_metrics_file_too(tmp_path):
    from dialogtrain.plot import plot_runs

    run = fake_run(tmp_path / "run", sft_records())
    output = plot_runs([run / "metrics.jsonl"], tmp_path / "one.png")
    assert output.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_runs_are_clear_errors(tmp_path, make):
    good = fake_run(tmp_path / "good", sft_records())
    bad = tmp_path / "bad"
    if make == "empty":
        fake_run(bad, [])
    result = CliRunner().invoke(cli, ["plot", str(good), str(bad), "--output", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert f"error: {bad}" in result.output
    assert ("no metrics.jsonl" if make == "missing" else "empty") in result.output
    assert not (tmp_path / "x.png").exists()


def test_plot_needs_a_run():
    result = CliRunner().invoke(cli, ["plot"])
    assert result.exit_code != 0 and "RUN" in result.output
