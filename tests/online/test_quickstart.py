"""The online quickstart as the README runs it: SFT, reward model, 6 online DPO rounds; the
held-out reward scored by the task's rule (not by the learned reward model) rises clearly."""

from __future__ import annotations

import os

import pytest

from jaxalign.train.cli import main
from jaxalign.train.metrics import read_metrics


@pytest.mark.slow
def test_the_online_quickstart_raises_the_held_out_rule_reward(tmp_path, helpers, capsys):
    workdir = tmp_path / "online_quickstart"
    argv = ["jaxalign.train", "--config", os.path.join(helpers.root, "configs", "online_quickstart.py"),
            "--workdir", str(workdir), f"--config.model.path={tmp_path / 'tiny-model-online'}",
            "--config.progress_bar=False", "--config.huge_pages=False"]
    assert main(argv) == 0, capsys.readouterr().err
    rounds = [e for e in read_metrics(workdir) if "round" in e]
    assert [int(e["round"]) for e in rounds] == list(range(7))
    curve = [e["eval/reward_mean"] for e in rounds]
    print("eval/reward_mean by round:", [round(v, 3) for v in curve])
    assert curve[-1] > curve[0] + 0.4 and max(curve[-2:]) > 0.8
    assert all(e["online/pairs"] > 0 for e in rounds[1:])
    for stage in ("sft", "reward_model"):
        assert (workdir / "bootstrap" / stage / "export" / "config.json").is_file()
    assert (workdir / "export" / "model.safetensors").is_file()
