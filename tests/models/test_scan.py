"""Stacked, scanned layers (``ModelConfig.scan_layers``) compute what the unrolled blocks do:
logits, a DPO step with and without remat, the HF round trip, decoding and LoRA adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.models import from_pretrained, save_pretrained
from jaxalign.models.lora import adapted_projections, add_adapters, load_adapter, merge_adapters, save_adapter
from jaxalign.models.stacked import is_stacked, layout, stacked_path
from jaxalign.sampling import generate

from .conftest import VOCAB, jitted, label_logps, tiny_model

LAYERS = 3
IDS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 10)), jnp.int32)
MASK = jnp.asarray([[1] * 10, [0, 0, 0] + [1] * 7, [1] * 6 + [0] * 4, [1] * 10], jnp.int32)


def pair(family: str, **overrides):
    """The same random model (same seed) unrolled and stacked."""
    return (tiny_model(family, num_layers=LAYERS, **overrides),
            tiny_model(family, num_layers=LAYERS, **overrides, scan=True))


def unstacked(params: nnx.State) -> dict[tuple, np.ndarray]:
    """Flat ``{unrolled path: array}`` of a stacked or unrolled model's parameters."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        value = np.asarray(var[...])
        if is_stacked(var):
            out.update({(path[0], i, *path[1:]): value[i] for i in range(value.shape[0])})
        else:
            out[path] = value
    return out


def assert_same_params(unrolled: nnx.State, stacked: nnx.State, atol: float):
    a, b = unstacked(unrolled), unstacked(stacked)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=atol, err_msg=str(k))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scanned_logits_equal_unrolled(family):
    unrolled, scanned = pair(family)
    assert layout(nnx.state(scanned)) == "stacked" and layout(nnx.state(unrolled)) == "unrolled"
    assert_same_params(nnx.state(unrolled, nnx.Param), nnx.state(scanned, nnx.Param), atol=0)
    a, b = jitted(unrolled)(IDS, MASK), jitted(scanned)(IDS, MASK)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


def _dpo_step(model):
    """One Adam step of DPO (rows 0-1 chosen, 2-3 rejected) against the initial weights."""
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(1e-2)

    def sums(p):
        return (label_logps(nnx.merge(graphdef, p)(IDS, MASK), IDS) * MASK[:, 1:]).sum(-1)

    def loss(p, ref):
        s = sums(p)
        return losses.dpo(s[:2], s[2:], ref[:2], ref[2:], beta=0.1)[0]

    @jax.jit
    def step(p):
        grads = jax.grad(loss)(p, jax.lax.stop_gradient(sums(p)))
        updates, _ = optimizer.update(grads, optimizer.init(p), p)
        return optax.apply_updates(p, updates), grads

    return step(params)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_dpo_step_equals_unrolled(remat):
    unrolled, scanned = pair("llama", remat=remat)
    (a, grads), (b, _) = _dpo_step(unrolled), _dpo_step(scanned)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
    assert_same_params(a, b, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_round_trip_through_stacked_layout(family, tmp_path):
    unrolled, scanned = pair(family)
    save_pretrained(scanned, tmp_path / "stacked")
    save_pretrained(unrolled, tmp_path / "unrolled")
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "unrolled" / "model.safetensors"), load_file(tmp_path / "stacked" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for scan in (True, False):
        loaded = from_pretrained(tmp_path / "stacked", scan_layers=scan)
        assert loaded.config.scan_layers is scan
        assert_same_params(nnx.state(unrolled, nnx.Param), nnx.state(loaded, nnx.Param), atol=0)
    assert from_pretrained(tmp_path / "stacked").config.scan_layers is False  # auto: 3 < SCAN_MIN_LAYERS


def test_hf_import_places_stacked_shards(tmp_path):
    _, scanned = pair("llama")
    save_pretrained(scanned, tmp_path)
    from jaxalign import parallel

    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    loaded = from_pretrained(tmp_path, scan_layers=True, sharding_fn=parallel.sharding_fn(mesh))
    kernel = loaded.layers.self_attn.q_proj.kernel[...]
    assert kernel.shape == (LAYERS, 32, 4, 8)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(scanned.layers.self_attn.q_proj.kernel[...]))


def test_scanned_decode_equals_unrolled():
    unrolled, scanned = pair("gpt2")
    kw = dict(max_new_tokens=5, temperature=1.0, rng=jax.random.key(3), eos_ids=())
    a, b = generate(unrolled, IDS, MASK, **kw), generate(scanned, IDS, MASK, **kw)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_allclose(np.asarray(b.logps), np.asarray(a.logps), rtol=0, atol=1e-5)
    assert scanned.init_cache(2, 8).keys.shape[0] == LAYERS


def test_lora_on_stacked_layers(tmp_path):
    targets = ("q_proj", "o_proj", "down_proj")
    unrolled, scanned = pair("llama")
    for model in (unrolled, scanned):
        add_adapters(model, rank=2, alpha=8, targets=targets, seed=1)
    assert scanned.layers.self_attn.q_proj.lora_a.shape == (LAYERS, 32, 2)
    assert scanned.layers.self_attn.q_proj.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    rng = np.random.default_rng(2)
    for (path, proj) in adapted_projections(unrolled):  # the same nonzero B in both layouts
        proj.lora_b[...] = jnp.asarray(0.05 * rng.standard_normal(proj.lora_b.shape), jnp.float32)
    for path, proj in adapted_projections(scanned):
        proj.lora_b[...] = jnp.stack([dict(adapted_projections(unrolled))[(path[0], i, *path[1:])].lora_b[...]
                                      for i in range(LAYERS)])
    assert_same_params(nnx.state(unrolled, nnx.Param), nnx.state(scanned, nnx.Param), atol=0)
    a, b = jitted(unrolled)(IDS, MASK), jitted(scanned)(IDS, MASK)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
    save_adapter(scanned, tmp_path / "stacked", alpha=8)
    save_adapter(unrolled, tmp_path / "unrolled", alpha=8)
    from safetensors.numpy import load_file

    sa, ua = load_file(tmp_path / "stacked" / "adapter_model.safetensors"), load_file(
        tmp_path / "unrolled" / "adapter_model.safetensors")
    assert sa.keys() == ua.keys() and all(np.array_equal(sa[k], ua[k]) for k in sa)
    fresh = add_adapters(tiny_model("llama", num_layers=LAYERS, scan=True), rank=2, alpha=8, targets=targets)
    load_adapter(fresh, tmp_path / "unrolled")
    assert_same_params(nnx.state(scanned, nnx.Param), nnx.state(fresh, nnx.Param), atol=0)
    merged_a, merged_b = merge_adapters(unrolled), merge_adapters(scanned)
    assert_same_params(nnx.state(merged_a, nnx.Param), nnx.state(merged_b, nnx.Param), atol=1e-7)


def test_stacked_paths():
    assert stacked_path(("layers", 2, "mlp", "up_proj", "kernel")) == (("layers", "mlp", "up_proj", "kernel"), 2)
    assert stacked_path(("h", 0, "ln_1", "scale")) == (("h", "ln_1", "scale"), 0)
    assert stacked_path(("norm", "scale")) == (("norm", "scale"), None)


def test_weight_decay_mask_of_stacked_parameters():
    from jaxalign.train.optimizer import decay_mask

    _, scanned = pair("gpt2")
    mask = {path: bool(v.get_value()) for path, v in nnx.to_flat_state(decay_mask(nnx.state(scanned, nnx.Param)))}
    assert mask[("h", "mlp", "c_fc", "kernel")] and mask[("wte", "embedding")]
    assert not any(mask[("h", *p)] for p in (("ln_1", "scale"), ("ln_2", "bias"), ("mlp", "c_fc", "bias")))
