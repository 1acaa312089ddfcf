"""A few steps of the ``configs/reward_model.py`` recipe on a tiny model: ``WORKDIR/export`` is an
HF sequence classifier whose scores equal jaxalign's head on the run's final (checkpointed)
parameters, and ``RewardModel`` scores it the same."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need torch (the 'parity' extra)")
transformers = pytest.importorskip("transformers")

from jaxalign.data.encoding import Encoder  # noqa: E402
from jaxalign.data.synthetic import synthetic_records  # noqa: E402
from jaxalign.models import from_pretrained  # noqa: E402
from jaxalign.models.tiny import write_tiny_checkpoint  # noqa: E402
from jaxalign.scoring.forward import init_reward_head, sequence_rewards  # noqa: E402
from jaxalign.scoring.reward_model import RewardModel  # noqa: E402
from jaxalign.train.cli import parse_command_line  # noqa: E402
from jaxalign.train.loop import train  # noqa: E402

pytestmark = pytest.mark.parity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2


def _final_params(checkpoint_dir: str, model) -> tuple[nnx.GraphDef, nnx.State, np.ndarray]:
    """``(graphdef, params, head kernel)`` of the run's last checkpoint, read from its files."""
    path = os.path.join(checkpoint_dir, str(STEPS), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))["params"]
    graphdef, state = nnx.split(model, nnx.Param)
    leaves = []
    for key, var in nnx.to_flat_state(state):
        node = restored["model"]
        for k in key:
            node = node[str(k)]
        leaves.append((key, var.replace(jnp.asarray(node["value"]))))
    return graphdef, nnx.from_flat_state(leaves), np.asarray(restored["head"]["kernel"])


def test_reward_model_run_exports_an_hf_sequence_classifier(tmp_path):
    records = synthetic_records(24, seed=0)
    corpus = [r["prompt"] + r[s] for r in records for s in ("chosen", "rejected")]
    write_tiny_checkpoint(tmp_path / "tiny", hidden_size=32, intermediate_size=64, num_layers=1, num_kv_heads=2,
                          max_position=64, corpus=corpus)
    argv = [
        "jaxalign.train", "--config", os.path.join(ROOT, "configs", "reward_model.py"),
        "--workdir", str(tmp_path / "run"), f"--config.model.path={tmp_path / 'tiny'}",
        "--config.model.create_if_missing=False", "--config.data.train=synthetic", "--config.data.synthetic_pairs=24",
        "--config.data.eval_pairs=0", "--config.data.batch_size=4", "--config.data.micro_batch_size=2",
        "--config.data.max_length=64", "--config.data.max_prompt_length=32", "--config.data.buckets=(64,)",
        f"--config.steps={STEPS}", "--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=0",
        "--config.checkpoint.keep_best=", "--config.checkpoint.async_save=False", "--config.checkpoint.export=True",
        "--config.optimizer.learning_rate=1e-2", "--config.optimizer.warmup_steps=0", "--config.progress_bar=False",
        "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
    ]
    config, _, _ = parse_command_line(argv)
    assert config.loss.name == "bradley_terry"
    result = train(config, str(tmp_path / "run"))
    assert result.status == "finished" and result.step == STEPS
    export = result.export_dir
    assert json.loads(open(os.path.join(export, "config.json")).read())["architectures"] == [
        "LlamaForSequenceClassification"]
    assert not os.path.exists(os.path.join(export, "reward_head.safetensors"))

    graphdef, params, head = _final_params(result.checkpoint_dir, from_pretrained(tmp_path / "tiny"))
    assert np.abs(head - np.asarray(init_reward_head(32, config.seed)["kernel"])).max() > 1e-4  # trained

    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    prompts = [r["prompt"] for r in records[:4]] * 2
    completions = [r["chosen"] for r in records[:4]] + [r["rejected"] for r in records[:4]]
    encoder = Encoder(tokenizer)
    rows = [encoder.encode_sequence(p, c).ids for p, c in zip(prompts, completions)]
    length = max(len(r) for r in rows)
    batch = {key: np.zeros((len(rows), length), np.int32) for key in ("input_ids", "positions", "segment_ids")}
    batch["sequence_ids"] = np.full((len(rows), length), -1, np.int32)
    for i, r in enumerate(rows):
        batch["input_ids"][i, : len(r)], batch["positions"][i, : len(r)] = r, np.arange(len(r))
        batch["segment_ids"][i, : len(r)], batch["sequence_ids"][i, : len(r)] = 1, i
    ours = np.asarray(sequence_rewards(graphdef, params, {"kernel": jnp.asarray(head)}, batch,
                                       num_sequences=len(rows)))

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    assert hf.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = np.where(batch["segment_ids"] == 1, batch["input_ids"], hf.config.pad_token_id)
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(batch["segment_ids"], dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(got, ours, rtol=0, atol=1e-4)
    assert np.std(ours) > 1e-3
    scorer = RewardModel.load(export, batch_size=4, buckets=(32, 64))
    np.testing.assert_allclose(scorer.score(prompts, completions), ours, rtol=0, atol=1e-5)
