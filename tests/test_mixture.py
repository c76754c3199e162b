"""Dataset mixtures (issue 13/13, part 2): reading `--data a.jsonl:0.7,b.yml:0.3`, bad weights refused naming
the flag, the exact per-source counts of each epoch from the seed (also as the worker trains them), resume
equality with a mixture, per-source eval losses that add up to the overall one, and their plot panel."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dialogtrain.sft as sft
from dialogtrain.data.encode import IGNORE_INDEX, encode_conversations
from dialogtrain.data.mixture import EpochDraw, MixtureError, epoch_counts, parse_sources, sources_fingerprint
from dialogtrain.data.prepare import CONVERSATIONS, select_examples
from dialogtrain.data.sources import DataError, data_fingerprint
from dialogtrain.options import DataOptions
from dialogtrain.train.metrics import read_metrics
from launcher.cli import cli
from tests.checkpoint_helpers import final_weights, metrics_after, rewind
from tests.sft_harness import PAIRS, train_in_process, write_pairs_csv, write_run_dir
from tests.test_dedup import write_chats, write_prefs

SMALL = [("is it warm", "it is sunny"), ("who are you", "a bot"), ("good day", "good day to you")]


@pytest.fixture
def two_sources(tmp_path) -> tuple[Path, Path]:
    """a.jsonl: 3 conversations; b.csv: 5 (PAIRS[:5])."""
    return write_chats(tmp_path / "a.jsonl", SMALL), write_pairs_csv(tmp_path / "b.csv", PAIRS[:5])


# ----------------------------------------------------------------------------------------------------
# reading --data


def test_the_weight_is_the_number_after_the_last_colon_and_existing_paths_stay_whole(tmp_path):
    odd = tmp_path / "v1:2,3"  # a ',' in a path: only as the whole value
    odd.mkdir()
    write_chats(odd / "chats.jsonl")
    assert [(s.location, s.name, s.weight) for s in parse_sources(str(odd))] == [(str(odd), "v1:2,3", None)]
    (tmp_path / "v1:2").mkdir()
    data = write_chats(tmp_path / "v1:2" / "chats.jsonl")
    sources = parse_sources(f"{data}:0.7,org/chat:en@train[:10%]:3,plain.jsonl:0.1")
    assert [(s.location, s.name, s.weight) for s in sources] == [
        (str(data), "chats", 0.7), ("org/chat:en@train[:10%]", "chat", 3.0), ("plain.jsonl", "plain", 0.1)]
    assert [(s.location, s.weight) for s in parse_sources("org/chat:en,b.jsonl")] == [("org/chat:en", None),
                                                                                     ("b.jsonl", None)]
    assert [s.name for s in parse_sources("x/train.jsonl:1,y/train.jsonl:1")] == ["x/train", "y/train"]


@pytest.mark.parametrize("value, why", [
    ("a.jsonl:0.7,b.jsonl", "give every source a weight (SOURCE:WEIGHT) or none"),
    ("a.jsonl:-1,b.jsonl:1", "weights must be finite numbers > 0, got -1"),
    ("a.jsonl:0,b.jsonl:1", "weights must be finite numbers > 0, got 0"),
    ("a.jsonl:inf,b.jsonl:1", "weights must be finite numbers > 0, got inf"),
    ("a.jsonl:0.5", "a weight needs two sources at least"),
    ("a.jsonl:0.5,,b.jsonl:0.5", "an empty source"),
    ("a.jsonl:0.5,a.jsonl:0.5", "a.jsonl is given twice"),
])
def test_bad_weights_are_refused_at_launch_naming_the_flag(tmp_path, value, why):
    with pytest.raises(MixtureError, match=re.escape(why)):
        parse_sources(value)
    for flag in ("--data", "--eval-data"):
        args = ["--data", "ok.jsonl", flag, value] if flag == "--eval-data" else ["--data", value]
        result = CliRunner().invoke(cli, ["sft", "--model", "m", *args, "--output", str(tmp_path / "run"),
                                          "--gpus", "cpu", "--dry-run"])
        assert result.exit_code == 2 and f"{flag} {value!r}: {why}" in result.output, result.output


def test_a_yaml_list_in_config_is_a_mixture(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  - support.jsonl:0.7\n  - chitchat.yml:0.3\n")
    result = CliRunner().invoke(cli, ["sft", "--config", str(config), "--model", "m", "--output", str(tmp_path / "run"),
                                      "--gpus", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert '"data": "support.jsonl:0.7,chitchat.yml:0.3"' in result.output


def test_sft_and_preference_sources_cannot_mix(tmp_path):
    chats, prefs = write_chats(tmp_path / "chats.jsonl"), write_prefs(tmp_path / "prefs.jsonl")
    with pytest.raises(DataError, match=f"{prefs}: holds preference pairs, this command trains on conversations; "
                                        "SFT and preference sources cannot be mixed"):
        select_examples(DataOptions(data=f"{chats}:1,{prefs}:1"), CONVERSATIONS, 0)


def test_resume_compares_every_source_and_weight(two_sources):
    a, b = two_sources
    assert sources_fingerprint(str(a)) == data_fingerprint(str(a))  # checkpoints of one source are unchanged
    assert sources_fingerprint(f"{a}:0.7,{b}:0.3") == sources_fingerprint(f"{a}:0.7,{b}:0.3")
    assert len({sources_fingerprint(f"{a}:0.7,{b}:0.3"), sources_fingerprint(f"{a}:0.6,{b}:0.4"),
                sources_fingerprint(f"{a},{b}")}) == 3


# ----------------------------------------------------------------------------------------------------
# the draw


def test_epoch_counts_are_weight_shares_of_all_examples_by_largest_remainder():
    assert epoch_counts([500, 1500], [0.7, 0.3]) == [1400, 600]
    assert epoch_counts([3, 5], [3, 1]) == [6, 2]
    assert epoch_counts([3, 4], [1, 1]) == [4, 3]  # 3.5 / 3.5: the tie goes to the first source
    assert epoch_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]


def test_each_epoch_draws_exact_counts_repeating_the_small_source_and_walking_the_large_one():
    sources = ["a"] * 3 + ["b"] * 5  # indices 0-2 and 3-7
    draw = EpochDraw.of("a.jsonl:0.75,b.csv:0.25", sources, seed=7)
    assert draw.counts == [6, 2]
    assert draw.summary() == ("mixture, per epoch of 8: a 0.75 -> 6 of its 3 (repeated 2.00x), "
                              "b 0.25 -> 2 of its 5 (subsampled, 40%)")
    epochs = [draw.examples(epoch) for epoch in range(5)]
    for drawn in epochs:
        assert collections.Counter(drawn[:6]) == {0: 2, 1: 2, 2: 2}  # a: every example twice
    walked = [i for drawn in epochs for i in drawn[6:]]  # b, epoch after epoch: 2 each
    assert sorted(walked[:5]) == [3, 4, 5, 6, 7] and sorted(walked[5:10]) == [3, 4, 5, 6, 7]
    assert epochs == [EpochDraw.of("a.jsonl:0.75,b.csv:0.25", sources, seed=7).examples(e) for e in range(5)]
    assert epochs != [EpochDraw.of("a.jsonl:0.75,b.csv:0.25", sources, seed=8).examples(e) for e in range(5)]
    assert EpochDraw.of("a.jsonl,b.csv", sources, seed=7).examples(3) == list(range(8))  # no weights: all


def mixture_flags(gpt2_dir, a: Path, b: Path, **extra) -> dict:
    return dict(model=str(gpt2_dir), data=f"{a}:0.75,{b}:0.25", micro_batch=2, epochs=2, lr=5e-3,
                precision="fp32", gpus="cpu", **extra)


def test_the_worker_trains_each_epochs_draw(gpt2_dir, tmp_path, two_sources, monkeypatch, capfd):
    trained = []

    def recording(engine, run, state, indices):
        trained.append([run.train_set[i]["source"] for i in indices])
        return real_step(engine, run, state, indices)

    real_step = sft.train_step
    monkeypatch.setattr(sft, "train_step", recording)
    train_in_process(write_run_dir(tmp_path / "run", **mixture_flags(gpt2_dir, *two_sources)))
    assert len(trained) == 8  # 8 examples per epoch, batch 2, 2 epochs
    for epoch in (trained[:4], trained[4:]):
        assert collections.Counter(name for step in epoch for name in step) == {"a": 6, "b": 2}
    err = capfd.readouterr().err
    assert "train mixture, per epoch of 8: a 0.75 -> 6 of its 3 (repeated 2.00x), b 0.25 -> 2 of its 5" in err


def test_a_mixture_resumes_exactly(gpt2_dir, tmp_path, two_sources):
    flags = mixture_flags(gpt2_dir, *two_sources, save_every=2)
    train_in_process(write_run_dir(tmp_path / "run", **flags))
    resumed = rewind(tmp_path / "run", tmp_path / "resumed", step=6)  # epoch 1, 2 steps in
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    assert [r["step"] for r in metrics_after(resumed, 6)] == [7, 8]
    assert metrics_after(resumed, 6) == metrics_after(tmp_path / "run", 6)
    want, got = final_weights(tmp_path / "run" / "final"), final_weights(resumed / "final")
    assert all(torch.equal(want[name], got[name]) for name in want)


# ----------------------------------------------------------------------------------------------------
# per-source evaluation


def test_eval_loss_per_source_adds_up_to_the_overall_loss(gpt2_dir, gpt2_tokenizer, tmp_path, two_sources):
    a, b = two_sources
    ea = write_chats(tmp_path / "ea.jsonl", [("hello", "hi"), ("what is the road like", "it is long")])
    eb = write_chats(tmp_path / "eb.yml", [("tell me a joke", "no"), ("the lazy dog", "jumps"), ("ok", "fine")])
    flags = mixture_flags(gpt2_dir, a, b, eval_data=f"{ea},{eb}", eval_every=2)
    train_in_process(write_run_dir(tmp_path / "run", **flags))
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    tokens = {}
    for name, path in (("ea", ea), ("eb", eb)):
        conversations = [item.example for item in select_examples(DataOptions(data=str(path)), CONVERSATIONS, 0).train]
        examples, _ = encode_conversations(gpt2_tokenizer, conversations, 512)
        tokens[name] = sum(label != IGNORE_INDEX for e in examples for label in e["labels"])
    for record in evals:
        combined = (record["eval_loss/ea"] * tokens["ea"] + record["eval_loss/eb"] * tokens["eb"]) / sum(tokens.values())
        assert record["eval_loss"] == pytest.approx(combined, rel=1e-5)  # metrics.jsonl keeps 6 digits
        assert record["eval_loss/ea"] != pytest.approx(record["eval_loss/eb"], rel=1e-3)


def test_plot_draws_a_panel_of_the_per_source_eval_curves(tmp_path):
    from dialogtrain.plot import panels_of

    records = [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 5)] + [
        {"step": s, "eval_loss": 1.5, "eval_loss/support": 1.2, "eval_loss/chitchat": 1.9} for s in (2, 4)]
    panels = panels_of({"run": records})
    assert [title for title, _ in panels] == ["training loss", "held-out loss", "held-out loss by source"]
    assert panels[2][1] == [("eval_loss/chitchat", " chitchat"), ("eval_loss/support", " support")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "run"), "--output", str(tmp_path / "curves.png")])
    assert result.exit_code == 0 and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG", result.output


def test_a_preference_mixture_trains_and_reports_eval_loss_per_source(gpt2_dir, tmp_path):
    a = write_prefs(tmp_path / "a.jsonl", [(f"question {i}", "yes", "no") for i in range(3)])
    b = write_prefs(tmp_path / "b.csv", [(f"tell me {i}", "sure", "never") for i in range(5)])
    ea = write_prefs(tmp_path / "ea.jsonl", [("what is it", "yes", "no")])
    eb = write_prefs(tmp_path / "eb.jsonl", [("tell me more", "sure", "never"), ("tell me less", "sure", "no")])
    run_json = write_run_dir(tmp_path / "run", command="dpo", model=str(gpt2_dir), data=f"{a}:1,{b}:3",
                             eval_data=f"{ea},{eb}", micro_batch=2, max_steps=2, lr=1e-2, precision="fp32", gpus="cpu")
    train_in_process(run_json, "dpo")
    final = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r][-1]
    assert final["eval_loss"] == pytest.approx((final["eval_loss/ea"] + 2 * final["eval_loss/eb"]) / 3, rel=1e-5)
    assert final["eval_loss/ea"] != pytest.approx(final["eval_loss/eb"], rel=1e-3)
