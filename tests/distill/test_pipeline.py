"""The distillation quickstart end to end, and the teacher checks a distillation run makes
before it loads anything."""

from __future__ import annotations

import os

import pytest

from jaxalign.data.synthetic import synthetic_records
from jaxalign.distill.pipeline import EVALUATED
from jaxalign.models.tiny import write_tiny_checkpoint
from jaxalign.train.cli import main
from jaxalign.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_the_distillation_quickstart_logs_every_model_and_distillation_lifts_the_student(tmp_path, capsys):
    workdir = tmp_path / "distill_quickstart"
    argv = ["jaxalign.train", "--config", os.path.join(ROOT, "configs", "distill_quickstart.py"), "--workdir",
            str(workdir), f"--config.model.path={tmp_path / 'student'}", "--config.progress_bar=False",
            "--config.huge_pages=False"]
    assert main(argv) == 0, capsys.readouterr().err
    rewards = {EVALUATED[int(e["stage"])]: e["eval/reward_mean"] for e in read_metrics(workdir) if "stage" in e}
    print(rewards)
    assert set(rewards) == set(EVALUATED)
    assert rewards["teacher"] > rewards["teacher_reference"] + 0.5  # DPO aligned the teacher
    assert rewards["dckd"] > rewards["student_sft"] + 0.5  # distillation lifted the student
    for stage in ("teacher_sft", "teacher_dpo", "student_sft", "dckd", "adpa"):
        assert (workdir / "stages" / stage / "export" / "config.json").is_file()
    # rerunning finds every stage done and logs nothing twice
    assert main(argv) == 0
    assert sum("stage" in e for e in read_metrics(workdir)) == len(EVALUATED)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A student and a teacher with other vocabularies (BPE sizes 300 and 400)."""
    records = synthetic_records(32, seed=0)
    corpus = [r["prompt"] + r[s] for r in records for s in ("chosen", "rejected")]
    root = tmp_path_factory.mktemp("models")
    for name, size in (("student", 300), ("other", 400)):
        write_tiny_checkpoint(root / name, hidden_size=32, intermediate_size=64, num_layers=1, num_kv_heads=2,
                              max_position=64, corpus=corpus, bpe_vocab_size=size)
    return root


def _dckd(models, tmp_path, teacher: str) -> list[str]:
    return ["jaxalign.train", "--config", os.path.join(ROOT, "configs", "dckd.py"), "--workdir", str(tmp_path / "run"),
            f"--config.model.path={models / 'student'}", f"--config.distill.teacher={teacher}",
            "--config.data.train=synthetic", "--config.data.synthetic_pairs=24", "--config.data.eval_pairs=0",
            "--config.data.max_length=64", "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
            "--config.data.batch_size=4", "--config.data.micro_batch_size=4", "--config.steps=1",
            "--config.progress_bar=False", "--config.huge_pages=False", "--config.model.dtype=float32"]


def test_a_teacher_with_another_vocabulary_is_refused_before_training(models, tmp_path, capsys):
    assert main(_dckd(models, tmp_path, str(models / "other"))) == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and "do not share a vocabulary" in err
    assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))  # nothing trained


def test_a_missing_teacher_is_a_clear_error(models, tmp_path, capsys):
    assert main(_dckd(models, tmp_path, str(tmp_path / "nowhere"))) == 2
    assert "distill.teacher" in capsys.readouterr().err
