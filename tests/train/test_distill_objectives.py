"""DCKD and ADPA objectives: equal to ``losses.dckd`` / ``losses.sft_adpa`` on full logits (values and
gradients, padded and packed, filler pairs), the golden numbers of docs/losses.md 5.4, a train step
that lowers the loss, ``from_config`` and the config's distillation rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.data import EncodedPair, EncodedSequence, packed_batch, padded_batch, plan_pack, stack_micro_batches
from jaxalign.models import make_model
from jaxalign.models.tiny import tiny_config
from jaxalign.objectives import from_config, real_token_mask
from jaxalign.objectives.distill import adpa, dckd
from jaxalign.scoring.forward import Forward
from jaxalign.train.config import ConfigError, base_config, validate
from jaxalign.train.optimizer import make_optimizer
from jaxalign.train.state import init_state
from jaxalign.train.step import device_keys, make_train_step

VOCAB, K = 320, 4
LENGTHS = [(9, 14), (20, 6), (7, 11)]


@pytest.fixture(scope="module")
def student():
    model = make_model(tiny_config("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                   intermediate_size=64, max_position=64), seed=3)
    return nnx.split(model, nnx.Param)


def _side(rng, n, prompt, kind, carries):
    """Label-aligned ``[n, K]`` side arrays on the completion tokens (0 on the prompt, all 0 unless ``carries``)."""
    ids = np.stack([rng.permutation(VOCAB)[:K] for _ in range(n)]).astype(np.int32)
    if kind == "dckd":
        probs = np.sort(rng.dirichlet(np.ones(K + 1), n)[:, :K], axis=-1)[:, ::-1].astype(np.float32)
        values = {"teacher_topk_ids": ids, "teacher_topk_probs": probs}
    else:
        values = {"candidate_ids": ids, "advantages": rng.standard_normal((n, K)).astype(np.float32)}
    keep = (np.arange(n) >= prompt)[:, None] & carries
    return {key: np.where(keep, v, 0).astype(v.dtype) for key, v in values.items()}


def _batches(kind):
    """A padded batch (3 pairs + 1 filler) and a packed one of pairs carrying ``kind``'s side arrays."""
    rng = np.random.default_rng(0)

    def seq(n, carries):  # ADPA: the chosen (dataset) answer carries zeros
        return EncodedSequence(rng.integers(1, VOCAB, n).astype(np.int32), 4, False,
                               side=_side(rng, n, 4, kind, carries))

    pairs = [EncodedPair(seq(c, kind == "dckd"), seq(r, True), i) for i, (c, r) in enumerate(LENGTHS)]
    place, _ = plan_pack(LENGTHS, slots=3, rows=3, length=32)
    out = {"padded": padded_batch(pairs + [None], length=24, pad_id=0),
           "packed": packed_batch(pairs, place, rows=3, length=32, pad_id=0)}
    return {name: {k: v for k, v in b.items() if k != "example_index"} for name, b in out.items()}


def _full_loss(kind, graphdef, params, batch, **weights):
    """``losses.dckd`` / ``losses.sft_adpa`` on the student's full, label-aligned logits."""
    model = nnx.merge(graphdef, params)
    logits = losses.align_logits_to_labels(model(batch["input_ids"], positions=batch["positions"],
                                                 segment_ids=batch["segment_ids"]))
    real, seq, p = real_token_mask(batch), batch["sequence_ids"], batch["pair_mask"].shape[0]
    chosen, rejected = jnp.where((seq >= 0) & (seq < p), real, 0.0), jnp.where(seq >= p, real, 0.0)
    labels = batch["input_ids"]
    if kind == "dckd":
        ids, probs = batch["teacher_topk_ids"], batch["teacher_topk_probs"]
        return losses.dckd(logits, labels, ids, probs, chosen, logits, ids, probs, rejected, **weights)
    return losses.sft_adpa(logits, labels, chosen, logits, batch["candidate_ids"], batch["advantages"], rejected,
                           **weights)


CASES = {
    "dckd": (dckd, {"sft_weight": 0.7, "chosen_kl_weight": 0.3, "rejected_kl_weight": 0.2}, {}),
    "adpa": (adpa, {"sft_weight": 0.9, "adpa_weight": 1.6}, {}),
    "adpa_clip": (adpa, {"sft_weight": 1.0, "adpa_weight": 1.6}, {"clip": True}),
}


@pytest.mark.parametrize("case, layout", [("dckd", "padded"), ("dckd", "packed"), ("adpa", "padded"),
                                          ("adpa", "packed"), ("adpa_clip", "packed")])
def test_objective_equals_the_loss_on_full_logits(student, case, layout):
    build, weights, options = CASES[case]
    kind = case.split("_")[0]
    graphdef, params = student
    objective = build(*weights.values(), *options.values())
    batch = jax.tree.map(jnp.asarray, _batches(kind)[layout])
    full_weights = {**weights, **({"clip_advantages": options["clip"]} if options else {})}

    def ours(p):
        return objective.loss_fn(Forward(graphdef, chunk=3, row_groups=2), {"model": p}, batch, None)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)
    (want, want_metrics), want_grads = jax.jit(jax.value_and_grad(
        lambda p: _full_loss(kind, graphdef, p, batch, **full_weights), has_aux=True))(params)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        np.testing.assert_allclose(float(metrics[key]), float(want_metrics[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert objective.batch_keys == (("teacher_topk_ids", "teacher_topk_probs") if kind == "dckd"
                                    else ("candidate_ids", "advantages"))
    assert objective.unit == "tokens" and not objective.uses_reference


@dataclasses.dataclass(frozen=True)
class _Model:
    """The fake model of ``_FakeForward``: an identity unembedding, so logits = hidden states."""

    vocab: int

    @property
    def config(self):
        return type("Config", (), {"param_dtype": jnp.float32})

    def unembedding(self, dtype):
        return jnp.eye(self.vocab, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class _FakeForward:
    """A forward whose final hidden states are the parameters ``{"hidden": [R, L, V]}``."""

    vocab: int
    chunk: int = 0
    row_groups: int = 1

    def hidden_states(self, params, batch):
        return params["hidden"], _Model(self.vocab)


def _golden_batch(chosen_student, rejected_student, side):
    """One pair, rows ``[prompt token, completion token]``: the student's distribution for the
    completion token is the hidden state at position 0 (log-probs), the gold chosen token is 0."""
    v = len(chosen_student)
    hidden = np.zeros((2, 2, v), np.float32)
    hidden[0, 0], hidden[1, 0] = np.log(chosen_student), np.log(rejected_student)
    batch = {"input_ids": np.array([[1, 0], [1, 2]], np.int32), "positions": np.array([[0, 1], [0, 1]], np.int32),
             "segment_ids": np.ones((2, 2), np.int32), "loss_mask": np.array([[0, 1], [0, 1]], np.float32),
             "sequence_ids": np.array([[0, 0], [1, 1]], np.int32), "pair_mask": np.ones(1, np.float32)}
    for key, (chosen, rejected) in side.items():
        batch[key] = np.zeros((2, 2, v), np.asarray(chosen).dtype)
        batch[key][0, 1], batch[key][1, 1] = chosen, rejected
    return jax.tree.map(jnp.asarray, batch), {"model": {"hidden": jnp.asarray(hidden)}}


def test_golden_numbers_of_losses_md():
    # DCKD (5.4): 3-token vocabulary = top-3; teacher chosen [0.7, 0.2, 0.1], rejected [0.6, 0.3, 0.1].
    ids = np.arange(3, dtype=np.int32)
    batch, params = _golden_batch([0.5, 0.3, 0.2], [0.2, 0.5, 0.3], {
        "teacher_topk_ids": (ids, ids), "teacher_topk_probs": ([0.7, 0.2, 0.1], [0.6, 0.3, 0.1])})
    loss, metrics = jax.jit(lambda p, b: dckd().loss_fn(_FakeForward(3), p, b, None))(params, batch)
    np.testing.assert_allclose(float(loss), 0.741265, atol=1e-6)
    np.testing.assert_allclose([float(metrics[k]) for k in ("dckd/sft", "dckd/chosen_kl", "dckd/rejected_kl")],
                               [0.693147, 0.085123, 0.396058], atol=1e-6)

    # ADPA (5.4): 4 candidates = the vocabulary, uniform student state, gold chosen token at 0.5.
    ids = np.arange(4, dtype=np.int32)
    advantages = np.log([0.5, 0.3, 0.15, 0.05]) - np.log([0.4, 0.4, 0.1, 0.1])
    batch, params = _golden_batch([0.5, 0.2, 0.2, 0.1], [0.25] * 4, {
        "candidate_ids": (np.zeros(4, np.int32), ids), "advantages": (np.zeros(4, np.float32),
                                                                      advantages.astype(np.float32))})
    for clip, expected in ((False, 0.834035), (True, 0.441704)):
        loss, _ = jax.jit(lambda p, b: adpa(clip=clip).loss_fn(_FakeForward(4), p, b, None))(params, batch)
        np.testing.assert_allclose(float(loss), expected, atol=1e-6)
    paper = adpa(sft_weight=0.0, adpa_weight=1.0)
    grad = jax.jit(jax.grad(lambda p: paper.loss_fn(_FakeForward(4), p, batch, None)[0]))(params)
    np.testing.assert_allclose(np.asarray(grad["model"]["hidden"][1, 0]), [-0.07780, 0.04991, -0.12338, 0.15127],
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["dckd", "adpa"])
def test_train_step_runs_and_lowers_the_loss(student, kind):
    graphdef, params = student
    c = base_config()
    c.loss.name = kind
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    objective = from_config(c.loss, "none", c.distill)
    optimizer, schedule = make_optimizer(c.optimizer, 10)
    step = make_train_step(forward=Forward(graphdef), objective=objective, optimizer=optimizer, schedule=schedule,
                           reference_mode="none", donate=False)
    padded = _batches(kind)["padded"]
    batch = stack_micro_batches([{k: padded[k] for k in device_keys(objective, "none")}])
    state = init_state({"model": params}, optimizer, seed=0)
    history = []
    for _ in range(4):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert all(np.isfinite(history)) and history[-1] < history[0] - 0.05, history
    assert metrics["num_tokens"] == real_token_mask(jax.tree.map(jnp.asarray, padded)).sum()


def test_from_config_and_the_config_rules():
    c = base_config()
    c.distill.sft_weight, c.distill.adpa_weight, c.distill.adpa_clip = 0.5, 2.0, True
    c.loss.name = "adpa"
    assert from_config(c.loss, "none", c.distill).name == "adpa"
    with pytest.raises(ValueError, match="loss.name 'adpa' needs the config's distill group"):
        from_config(c.loss, "none")
    c.loss.name = "dckd"
    assert from_config(c.loss, "frozen", c.distill).batch_keys == ("teacher_topk_ids", "teacher_topk_probs")

    c.model.path, c.data.train = "student", "pairs.jsonl"
    with pytest.raises(ConfigError, match="'distill.teacher' is empty: loss.name = 'dckd' distils from a teacher"):
        validate(c)
    c.distill.teacher = "teacher"
    validate(c)
    c.loss.name = "adpa"
    with pytest.raises(ConfigError, match="'distill.teacher_reference' is empty: ADPA's advantages need"):
        validate(c)
    c.distill.teacher_reference = "teacher-sft"
    validate(c)
