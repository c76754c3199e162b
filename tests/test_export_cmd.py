"""`dialogtrain export RUN/checkpoints/TAG --output DIR`: a saved DeepSpeed checkpoint becomes the same
Hugging Face folder as RUN/final, offline (ZeRO-0 from its model states, ZeRO 1-3 through DeepSpeed's
zero_to_fp32), tied embeddings kept tied. One process here; two processes under ZeRO-3 in test_resume.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from launcher.cli import cli
from tests.checkpoint_helpers import assert_same_hf_folder, final_weights
from tests.sft_harness import train_in_process, write_pairs_csv, write_run_dir


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (3, "fp32"), (2, "bf16")])
def test_the_export_of_the_last_checkpoint_equals_final(zero, precision, gpt2_dir, tmp_path):
    """bf16: zero_to_fp32 gives the fp32 master weights; cast to bf16 they are the trained weights, and the
    tied LM head stays the embedding (a cast tensor by tensor would save it twice)."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")),
                                   micro_batch=2, lr=5e-3, max_steps=4, save_every=2, zero=zero, precision=precision,
                                   gpus="cpu"))
    exported = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(run_dir / "checkpoints" / "step-000004"), "--output", str(exported)])
    assert result.exit_code == 0, result.output
    assert f"exported {run_dir / 'checkpoints' / 'step-000004'} to {exported}" in result.output
    assert_same_hf_folder(run_dir / "final", exported)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied

    # A run folder means its latest checkpoint; an earlier one exports its own weights.
    assert CliRunner().invoke(cli, ["export", str(run_dir), "--output", str(tmp_path / "latest")]).exit_code == 0
    assert_same_hf_folder(run_dir / "final", tmp_path / "latest")
    earlier = tmp_path / "step-2"
    assert CliRunner().invoke(cli, ["export", str(run_dir / "checkpoints" / "step-000002"), "--output",
                                    str(earlier)]).exit_code == 0
    assert final_weights(earlier).keys() == final_weights(exported).keys()
    assert any((final_weights(earlier)[k] != final_weights(exported)[k]).any() for k in final_weights(exported))


def test_export_of_something_that_is_no_checkpoint_is_one_clear_error(tmp_path):
    missing = CliRunner().invoke(cli, ["export", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert f"error: {tmp_path / 'nowhere'}: no such checkpoint folder" in missing.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(cli, ["export", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert empty.exit_code == 2 and "not a dialogtrain checkpoint (no progress.json)" in empty.output
    assert not (tmp_path / "out").exists()
