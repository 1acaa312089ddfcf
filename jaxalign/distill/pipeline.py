"""Distillation pipelines: chains of offline runs, each resumable in its own directory.

``distill.pipeline`` (``python -m jaxalign.train`` runs ``train`` when it is not ``none``):

* ``adpa_plus`` (ADPA+, the paper's best): DCKD from ``model.path`` (``WORKDIR/stages/dckd``),
  then ADPA from the DCKD student (``WORKDIR/stages/adpa``), whose own greedy generations are
  ADPA's states. The released recipes run the two in sequence, never summed.
* ``quickstart``: the whole pipeline on the synthetic task (``jaxalign/data/synthetic.py``), on
  a CPU: a teacher (a larger tiny model) is SFT-trained on completions of mixed quality (its
  reference) and DPO-trained from there (the aligned teacher); a smaller student is SFT-trained
  on the same mixed completions, then distilled with DCKD, then ADPA. Every model's greedy
  completions on held-out prompts are scored by the task's rule
  (``synthetic_reward``) and logged as ``eval/reward_mean`` rows of ``WORKDIR/metrics.jsonl``
  with the model's number ``stage`` in ``EVALUATED``.

Each stage is ``jaxalign.train.loop.train`` on a config derived from the pipeline's (its loss,
model, data, steps); rerunning the command skips finished stages and resumes the unfinished
one from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np

from jaxalign import parallel
from jaxalign.data.batching import bucket_ladder
from jaxalign.data.jsonl import read_jsonl, write_jsonl
from jaxalign.data.synthetic import synthetic_records, synthetic_reward
from jaxalign.models.tiny import ensure_tiny_checkpoint
from jaxalign.online.prompts import load_prompts
from jaxalign.sampling import FINISH_STOP, SamplingConfig, sample
from jaxalign.tokenizers import load_tokenizer, stop_ids
from jaxalign.train import build
from jaxalign.train.config import DISTILL_LOSSES, base_config
from jaxalign.train.loop import RunResult, run_directory, train as train_offline
from jaxalign.train.metrics import MetricsLog, read_metrics

__all__ = ["EVALUATED", "QUICKSTART", "train"]

# The distill keys a stage of each loss does not read (reset, so that changing them leaves its run resumable).
UNUSED_BY = {"dckd": ("teacher_reference", "adpa_weight", "adpa_clip", "max_new_tokens"),
             "adpa": ("chosen_kl_weight", "rejected_kl_weight")}

# The quickstart's evaluated models, in the order of their ``stage`` number in metrics.jsonl.
EVALUATED = ("teacher_reference", "teacher", "student_sft", "dckd", "adpa")

# The quickstart's teacher (the student is model.tiny) and its stages' steps and learning rates.
QUICKSTART = {
    "teacher": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256},
    "teacher_sft": (400, 1e-3), "teacher_dpo": (60, 5e-5), "student_sft": (200, 1e-3),
    "dckd": (100, 3e-4), "adpa": (60, 1e-5),
    "eval_prompts": 32, "eval_new_tokens": 24,
}


def _derive(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
    """A stage's config: ``config`` with ``changes`` (``a__b=v`` sets ``a.b``), no pipeline, and
    of the ``distill`` keys only those its loss reads (``UNUSED_BY``)."""
    c = ml_collections.ConfigDict(config.to_dict())
    defaults = base_config()
    c.online = defaults.online.to_dict()
    loss = changes.get("loss__name", config.loss.name)
    for key in c.distill.keys():
        if loss not in DISTILL_LOSSES or key in UNUSED_BY.get(loss, ()):
            c.distill[key] = defaults.distill[key]
    c.distill.pipeline = "none"
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c


def _stage(config: ml_collections.ConfigDict, workdir: str, name: str) -> RunResult:
    """Runs (or resumes, or finds finished) the stage ``name``; ``RunError`` unless it ends."""
    result = train_offline(config, os.path.join(workdir, "stages", name))
    if result.status != "finished" or result.export_dir is None:
        raise build.RunError(f"stage {name} ended {result.status}: {result.message}", exit_code=1)
    return result


def adpa_plus(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """DCKD, then ADPA from the DCKD student (module docstring)."""
    dckd = _stage(_derive(config, loss__name="dckd"), workdir, "dckd")
    # With LoRA each stage trains adapters on its starting model; DCKD's export is merged, so a
    # starting adapter (lora.adapter) belongs to the first stage only.
    return _stage(_derive(config, loss__name="adpa", model__path=dckd.export_dir, lora__adapter=""), workdir, "adpa")


def greedy_reward(config: ml_collections.ConfigDict, model_dir: str, prompts: list[Any], mesh: Any) -> float:
    """The mean ``synthetic_reward`` of the greedy completions of ``model_dir`` on ``prompts``."""
    tokenizer = load_tokenizer(model_dir)
    model = build.load_model(config, model_dir, mesh)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    settings = SamplingConfig(max_new_tokens=QUICKSTART["eval_new_tokens"], temperature=0.0,
                              stop_ids=stop_ids(tokenizer, model_dir), batch_size=len(prompts),
                              pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                              buckets=bucket_ladder(config.data.max_prompt_length))
    out = sample(model.graphdef, model.params, [p.ids for p in prompts], settings, mesh=mesh)
    texts = []
    for i in range(len(prompts)):
        ids = out.tokens[i, 0][out.mask[i, 0] == 1]
        texts.append(tokenizer.decode(ids[:-1] if out.finish[i, 0] == FINISH_STOP else ids, skip_special_tokens=True))
    return float(np.mean(synthetic_reward([p.text for p in prompts], texts)))


def quickstart(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """The distillation quickstart (module docstring)."""
    q, is_main = QUICKSTART, parallel.is_main_process()
    resolved = build.resolve_inputs(config, workdir, is_main)  # the synthetic pairs and the tiny student
    pairs, student = resolved.data.train, resolved.model.path
    data = os.path.join(workdir, "data")
    mixed, held_out = os.path.join(data, "synthetic-sft-mixed.jsonl"), os.path.join(data, "held-out-prompts.jsonl")
    teacher = os.path.join(workdir, "teacher-model")
    if is_main:
        if not os.path.exists(mixed):
            write_jsonl(mixed, [{"prompt": r["prompt"], "completion": r[side]}
                                for r in read_jsonl(pairs) for side in ("chosen", "rejected")])
        if not os.path.exists(held_out):
            write_jsonl(held_out, [{"prompt": r["prompt"]} for r in synthetic_records(q["eval_prompts"], config.seed + 1)])
        records = list(read_jsonl(pairs))
        ensure_tiny_checkpoint(teacher, family=config.model.tiny.family, bpe_vocab_size=config.model.tiny.vocab_size,
                               corpus=[r["prompt"] + r[s] for r in records for s in ("chosen", "rejected")],
                               seed=config.seed + 1, max_position=max(config.data.buckets), **q["teacher"])
    parallel.barrier("distill-quickstart-data")

    def stage(name: str, model: str, loss: str, train_data: str, **changes: Any) -> RunResult:
        steps, lr = q[name]
        c = _derive(resolved, loss__name=loss, model__path=model, model__create_if_missing=False,
                    data__train=train_data, steps=steps, epochs=0.0, eval_every=steps, checkpoint_every=steps,
                    optimizer__learning_rate=lr, optimizer__warmup_steps=max(1, steps // 10),
                    checkpoint__keep_best="", reference__mode="frozen" if loss == "dpo" else "none", **changes)
        return _stage(c, workdir, name)

    teacher_reference = stage("teacher_sft", teacher, "sft", mixed).export_dir
    aligned = stage("teacher_dpo", teacher_reference, "dpo", pairs).export_dir
    sft_student = stage("student_sft", student, "sft", mixed).export_dir
    distill = dict(distill__teacher=aligned, distill__teacher_reference=teacher_reference)
    dckd = stage("dckd", sft_student, "dckd", pairs, **distill).export_dir
    result = stage("adpa", dckd, "adpa", pairs, **distill)

    mesh = build.build_mesh(config.mesh)
    prompts = load_prompts(held_out, load_tokenizer(student), max_prompt_length=config.data.max_prompt_length).prompts
    log = MetricsLog(workdir, enabled=is_main)
    done = {int(e["stage"]) for e in read_metrics(workdir) if "stage" in e} if is_main else set()
    models = dict(zip(EVALUATED, (teacher_reference, aligned, sft_student, dckd, result.export_dir)))
    for i, name in enumerate(EVALUATED):
        if i not in done:
            reward = greedy_reward(config, models[name], prompts, mesh)
            log.write(i, {"stage": i, "eval/reward_mean": reward})
            if is_main:
                print(f"stage {i} ({name}): eval/reward_mean {reward:.3f} (greedy completions of "
                      f"{len(prompts)} held-out prompts, scored by the task's rule)", flush=True)
    log.close()
    return dataclasses.replace(result, workdir=workdir, metrics_file=log.path)


def train(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Runs the pipeline ``config.distill.pipeline`` in ``workdir`` (module docstring)."""
    workdir = os.path.abspath(workdir)
    with run_directory(config, workdir):
        if config.distill.pipeline == "adpa_plus":
            return adpa_plus(config, workdir)
        return quickstart(config, workdir)
