"""One DPO step of jaxalign's trainer equals one step of TRL's DPOTrainer (same weights, same data).

Both start from the same tiny HF checkpoint (policy) and a second one (reference, so that the
rewards are not all 0), read the same 8 pairs as one batch, and take one plain SGD step
(lr 0.5, no clipping, no weight decay). Compared: the loss, TRL's ``rewards/*`` and
``logps/*`` metrics, the gradient norm, and every updated parameter (HF names, via our export).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics

torch = pytest.importorskip("torch", reason="parity with TRL needs the 'parity' extra (torch)")
trl = pytest.importorskip("trl", reason="parity with TRL needs the 'parity' extra (trl)")
datasets = pytest.importorskip("datasets", reason="TRL's DPOTrainer needs the 'datasets' package")

LR, BETA, PAIRS = 0.5, 0.1, 8
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "grad_norm")


def trl_step(policy_dir: str, reference_dir: str, rows: list[dict], out_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        weight_decay=0.0, beta=BETA, loss_type=["sigmoid"], logging_steps=1, report_to=[], use_cpu=True,
        bf16=False, gradient_checkpointing=False, save_strategy="no", max_length=None, seed=0,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    params = {k: v.detach().cpu().numpy() for k, v in policy.state_dict().items()}
    return logged, params


@pytest.mark.parity
def test_one_dpo_step_matches_trl(make_config, records, tiny_model_dir, reference_model_dir, tmp_path):
    rows = records[:PAIRS]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = make_config(**{
        "steps": 1, "data.train": str(data), "data.eval_pairs": 0, "data.batch_size": PAIRS,
        "data.shuffle": False, "loss.name": "dpo", "loss.beta": BETA, "reference.mode": "frozen",
        "reference.path": reference_model_dir, "optimizer.name": "sgd", "optimizer.learning_rate": LR,
        "optimizer.schedule": "constant", "optimizer.max_grad_norm": 0.0, "checkpoint.export": True,
    })
    ours = train(config, tmp_path / "ours")
    mine = next(e for e in read_metrics(tmp_path / "ours") if "loss" in e)
    theirs, torch_params = trl_step(tiny_model_dir, reference_model_dir, rows, str(tmp_path / "trl"))

    assert abs(theirs["rewards/margins"]) > 1e-3  # the reference differs from the policy
    for key in COMPARED:
        assert mine[key] == pytest.approx(theirs[key], abs=1e-4), key
    exported = load_file(os.path.join(ours.export_dir, "model.safetensors"))
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    compared = 0
    for name, value in exported.items():
        if name not in torch_params:
            continue
        assert np.max(np.abs(value - torch_params[name])) <= 1e-4, name
        compared += 1
        moved = np.max(np.abs(initial[name] - torch_params[name]))
        assert moved > 0 or "norm" in name, name  # the step changed the weights
    assert compared == len(exported)
