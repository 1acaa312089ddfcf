"""Top-k KL, DCKD, ADPA and the SFT + ADPA objective: goldens, gradients, numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

ONE = jnp.ones(1)


def logits_of(probs):
    return jnp.log(jnp.asarray([probs], jnp.float32))  # one position, softmax(logits) = probs


# docs/losses.md 5.4, 3-token vocabulary = top-3 (no residual mass).
IDS3 = jnp.array([[0, 1, 2]])
CHOSEN_STUDENT, CHOSEN_TEACHER = logits_of([0.5, 0.3, 0.2]), jnp.array([[0.7, 0.2, 0.1]])
REJECTED_STUDENT, REJECTED_TEACHER = logits_of([0.2, 0.5, 0.3]), jnp.array([[0.6, 0.3, 0.1]])

# docs/losses.md 5.4 ADPA: 4-token vocabulary = the candidates, uniform student.
IDS4 = jnp.array([[0, 1, 2, 3]])
ADVANTAGES = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])) - jnp.log(jnp.array([[0.4, 0.4, 0.1, 0.1]]))
UNIFORM = jnp.zeros((1, 4))


def test_topk_kl_golden_positions_and_gradient():
    for student, teacher, expected in [
        (CHOSEN_STUDENT, CHOSEN_TEACHER, 0.085123),
        (REJECTED_STUDENT, REJECTED_TEACHER, 0.396058),
    ]:
        kl, metrics = losses.topk_kl(student, IDS3, teacher, ONE)
        np.testing.assert_allclose(float(kl), expected, atol=1e-6)
        assert float(metrics["distill/tokens"]) == 1.0
        # Forward KL through a softmax: d KL / d logits = p_S - p_T when the top-k covers the vocabulary.
        grad = jax.grad(lambda z: losses.topk_kl(z, IDS3, teacher, ONE)[0])(student)
        np.testing.assert_allclose(np.asarray(grad[0]), np.exp(np.asarray(student[0])) - np.asarray(teacher[0]), atol=1e-6)


def numpy_topk_kl(logits, ids, probs, mask):
    """float64 reference of docs/losses.md 5.2: 51-bin style KL with clamps, token mean."""
    logits = np.asarray(logits, np.float64)
    p_full = np.exp(logits - logits.max(-1, keepdims=True))
    p_full /= p_full.sum(-1, keepdims=True)
    student = np.take_along_axis(p_full, np.asarray(ids), -1)
    student = np.concatenate([student, 1 - student.sum(-1, keepdims=True)], -1).clip(1e-7, 1 - 1e-8)
    teacher = np.asarray(probs, np.float64)
    teacher = np.concatenate([teacher, 1 - teacher.sum(-1, keepdims=True)], -1).clip(1e-8, 1 - 1e-8)
    per_position = (teacher * (np.log(teacher) - np.log(student))).sum(-1)
    return (per_position * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    b, length, v, k = 2, 5, 13, 4
    teacher_logits = rng.normal(size=(b, length, v)) * 2
    teacher = np.exp(teacher_logits) / np.exp(teacher_logits).sum(-1, keepdims=True)
    ids = np.argsort(-teacher, -1)[..., :k].astype(np.int32)
    return {
        "logits": rng.normal(size=(b, length, v)).astype(np.float32),
        "ids": ids,
        "probs": np.take_along_axis(teacher, ids, -1).astype(np.float32),
        "advantages": rng.normal(size=(b, length, k)).astype(np.float32),
        "mask": np.array([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], np.float32),
    }


def test_topk_kl_with_residual_bin_equals_numpy_reference(batch):
    kl, _ = jax.jit(losses.topk_kl)(*(jnp.asarray(batch[k]) for k in ("logits", "ids", "probs", "mask")))
    expected = numpy_topk_kl(batch["logits"], batch["ids"], batch["probs"], batch["mask"])
    np.testing.assert_allclose(float(kl), expected, rtol=1e-5)


def test_masked_positions_do_not_count(batch):
    args = {k: jnp.asarray(batch[k]) for k in ("logits", "ids", "probs", "advantages", "mask")}
    masked = args["mask"] == 0
    noisy = {
        "logits": jnp.where(masked[..., None], 50.0, args["logits"]),
        "probs": jnp.where(masked[..., None], 0.9, args["probs"]),
        "advantages": jnp.where(masked[..., None], -100.0, args["advantages"]),
    }
    a = losses.topk_kl(args["logits"], args["ids"], args["probs"], args["mask"])[0]
    b = losses.topk_kl(noisy["logits"], args["ids"], noisy["probs"], args["mask"])[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    a = losses.adpa(args["logits"], args["ids"], args["advantages"], args["mask"])[0]
    b = losses.adpa(noisy["logits"], args["ids"], noisy["advantages"], args["mask"])[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    empty, _ = losses.topk_kl(args["logits"], args["ids"], args["probs"], jnp.zeros_like(args["mask"]))
    assert float(empty) == 0.0


def test_dckd_golden():
    loss, metrics = losses.dckd(
        CHOSEN_STUDENT, jnp.array([0]), IDS3, CHOSEN_TEACHER, ONE,
        REJECTED_STUDENT, IDS3, REJECTED_TEACHER, ONE,
    )  # fmt: skip
    np.testing.assert_allclose(float(loss), 0.741265, atol=1e-6)
    np.testing.assert_allclose(float(metrics["dckd/sft"]), 0.693147, atol=1e-6)
    np.testing.assert_allclose(float(metrics["dckd/chosen_kl"]), 0.085123, atol=1e-6)
    np.testing.assert_allclose(float(metrics["dckd/rejected_kl"]), 0.396058, atol=1e-6)
    weighted, _ = losses.dckd(
        CHOSEN_STUDENT, jnp.array([0]), IDS3, CHOSEN_TEACHER, ONE,
        REJECTED_STUDENT, IDS3, REJECTED_TEACHER, ONE,
        sft_weight=0.0, chosen_kl_weight=1.0, rejected_kl_weight=2.0,
    )  # fmt: skip
    np.testing.assert_allclose(float(weighted), 0.085123 + 2 * 0.396058, atol=2e-6)


@pytest.mark.parametrize("clip, expected", [(False, 0.088055), (True, -0.157152)])
def test_adpa_golden_forms(clip, expected):
    loss, metrics = losses.adpa(UNIFORM, IDS4, ADVANTAGES, ONE, clip_advantages=clip)
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)
    np.testing.assert_allclose(float(metrics["adpa/expected_advantage"]), -expected, atol=1e-6)


def test_adpa_paper_form_gradient():
    grad = jax.grad(lambda z: losses.adpa(z, IDS4, ADVANTAGES, ONE)[0])(UNIFORM)[0]
    np.testing.assert_allclose(np.asarray(grad), [-0.07780, 0.04991, -0.12338, 0.15127], atol=5e-6)
    # -p_j (A_j - sum_i p_i A_i), to full precision.
    a = np.asarray(ADVANTAGES[0], np.float64)
    np.testing.assert_allclose(np.asarray(grad), -0.25 * (a - 0.25 * a.sum()), atol=1e-7)


def numpy_adpa(logits, ids, advantages, mask, clip):
    logits = np.asarray(logits, np.float64)
    p_full = np.exp(logits - logits.max(-1, keepdims=True))
    p_full /= p_full.sum(-1, keepdims=True)
    student = np.take_along_axis(p_full, np.asarray(ids), -1)
    if clip:
        expected = (student * np.clip(advantages, 1e-8, 1 - 1e-8)).sum(-1) + 1e-8 * (1 - student.sum(-1))
    else:
        expected = (student * advantages).sum(-1)
    return -(expected * mask).sum() / mask.sum()


@pytest.mark.parametrize("clip", [False, True])
def test_adpa_equals_numpy_reference_with_residual_mass(batch, clip):
    args = [jnp.asarray(batch[k]) for k in ("logits", "ids", "advantages", "mask")]
    loss, _ = jax.jit(lambda *a: losses.adpa(*a, clip_advantages=clip))(*args)
    expected = numpy_adpa(batch["logits"], batch["ids"], batch["advantages"], batch["mask"], clip)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("clip, expected", [(False, 0.834035), (True, 0.441704)])
def test_sft_adpa_composite_golden(clip, expected):
    # Chosen gold token has student probability 0.5 (NLL 0.693147); adpa_weight 1.6 (recipe default).
    loss, metrics = losses.sft_adpa(
        CHOSEN_STUDENT, jnp.array([0]), ONE, UNIFORM, IDS4, ADVANTAGES, ONE, clip_advantages=clip
    )
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)
    np.testing.assert_allclose(float(metrics["sft_adpa/sft"]), 0.693147, atol=1e-6)


def test_distill_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"topk_kl: teacher_topk_probs must have shape \[1\] \+ \[K\], got \[2, 3\]"):
        losses.topk_kl(CHOSEN_STUDENT, IDS3, jnp.ones((2, 3)), ONE)
    with pytest.raises(ValueError, match=r"topk_kl: mask must have shape \[1\], got \[2\]"):
        losses.topk_kl(CHOSEN_STUDENT, IDS3, CHOSEN_TEACHER, jnp.ones(2))
    with pytest.raises(ValueError, match=r"adpa: candidate_ids must be integer token ids"):
        losses.adpa(UNIFORM, IDS4.astype(jnp.float32), ADVANTAGES, ONE)
    with pytest.raises(ValueError, match=r"adpa: candidate arrays differ"):
        losses.adpa(UNIFORM, IDS4, ADVANTAGES[:, :3], ONE)
    with pytest.raises(ValueError, match=r"dckd: chosen_labels and chosen_mask must have shape \[1\], got \[2\] and \[1\]"):
        losses.dckd(CHOSEN_STUDENT, jnp.array([0, 1]), IDS3, CHOSEN_TEACHER, ONE,
                    REJECTED_STUDENT, IDS3, REJECTED_TEACHER, ONE)  # fmt: skip
