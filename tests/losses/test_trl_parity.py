"""Parity with TRL's DPOTrainer (trl 1.16) through TRL's own loss code, on random inputs.

TRL computes every DPO-family loss inside ``DPOTrainer._compute_loss(self, model, inputs,
return_outputs)``. We call that unbound method with a minimal stand-in ``self`` (the attributes
it reads), a stand-in model that returns per-token log-probs whose sums are the given sequence
log-probs, and precomputed reference log-probs in ``inputs``; TRL then runs its real loss and
metric code, and we compare loss, gradients and metrics in float64 within 1e-6.

cDPO is not compared here: TRL >= 0.29 removed label smoothing from its ``sigmoid`` loss, so cDPO
is checked against its formula in test_preference.py instead.
"""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="TRL parity needs torch (pip install -e '.[parity]')")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL parity needs trl (the parity extra)")

from jaxalign import losses  # noqa: E402

pytestmark = pytest.mark.parity

P = 16
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]


class _StubPolicy:
    """Stands in for TRL's fused-LM-head model output: only ``log_probs`` matter for the loss."""

    training = True

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **_kwargs):
        lp = self.per_token_logps
        zeros = torch.zeros_like(lp.detach())
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo_loss(loss_type, pc, pr, rc, rr, chosen_lengths, rejected_lengths, *, beta, label_smoothing=0.0):
    """TRL's loss, d loss / d policy log-probs and logged metrics for per-pair float64 inputs."""
    lengths = np.concatenate([chosen_lengths, rejected_lengths])
    width = int(lengths.max()) + 1
    # completion_mask row i: 0 on the one-token "prompt", 1 on lengths[i] completion tokens.
    completion_mask = torch.zeros(2 * P, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, 1 : 1 + n] = 1
    # Per-token log-probs (shifted, width - 1 columns) whose row sums are the sequence log-probs.
    policy_logps = torch.tensor(np.concatenate([pc, pr]), dtype=torch.float64, requires_grad=True)
    per_token = torch.nn.functional.pad(policy_logps[:, None], (0, width - 2))
    model = _StubPolicy(per_token)
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * P, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(rc, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(rr, dtype=torch.float64),
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    grad = policy_logps.grad.numpy()
    metrics = {name: trainer._metrics["train"][name][-1] for name in METRICS}
    return float(loss.detach()), grad[:P], grad[P:], metrics


def random_pairs(seed):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.uniform(-80.0, -5.0, P) for _ in range(4))
    rc = pc + rng.normal(0.0, 3.0, P)  # policy near the reference, as in training
    chosen_lengths = rng.integers(1, 12, P)
    rejected_lengths = rng.integers(1, 12, P)
    return pc, pr, rc, rr, chosen_lengths, rejected_lengths


CASES = [
    ("sigmoid", losses.dpo, {"beta": 0.1}, {}),
    ("sigmoid", losses.dpo, {"beta": 0.5}, {}),
    ("robust", losses.rdpo, {"beta": 0.1, "label_smoothing": 0.1}, {"epsilon": 0.1}),
    ("robust", losses.rdpo, {"beta": 0.3, "label_smoothing": 0.35}, {"epsilon": 0.35}),
    ("hinge", losses.hinge, {"beta": 0.1}, {}),
    ("hinge", losses.hinge, {"beta": 0.05}, {}),
    ("ipo", losses.ipo, {"beta": 0.1}, "lengths"),
    ("ipo", losses.ipo, {"beta": 0.5}, "lengths"),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[2]['beta']}" for c in CASES])
def test_matches_trl_loss_gradient_and_metrics(case):
    loss_type, fn, trl_kwargs, our_kwargs = CASES[case]
    pc, pr, rc, rr, chosen_lengths, rejected_lengths = random_pairs(case)
    trl_loss, trl_grad_chosen, trl_grad_rejected, trl_metrics = trl_dpo_loss(
        loss_type, pc, pr, rc, rr, chosen_lengths, rejected_lengths, **trl_kwargs
    )
    with jax.enable_x64(True):
        if our_kwargs == "lengths":
            our_kwargs = {"chosen_lengths": jnp.asarray(chosen_lengths), "rejected_lengths": jnp.asarray(rejected_lengths)}
        ref = (jnp.asarray(rc), jnp.asarray(rr))

        def ours(policy_chosen, policy_rejected):
            return fn(policy_chosen, policy_rejected, *ref, beta=trl_kwargs["beta"], **our_kwargs)

        (loss, metrics), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(jnp.asarray(pc), jnp.asarray(pr))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[0]), trl_grad_chosen, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.asarray(grads[1]), trl_grad_rejected, rtol=1e-6, atol=1e-9)
        for name in METRICS:
            np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_trl_parity_in_float32():
    pc, pr, rc, rr, chosen_lengths, rejected_lengths = random_pairs(99)
    trl_loss, *_ = trl_dpo_loss("robust", pc, pr, rc, rr, chosen_lengths, rejected_lengths, beta=0.1, label_smoothing=0.2)
    loss, _ = losses.rdpo(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta=0.1, epsilon=0.2)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-5, atol=1e-5)
