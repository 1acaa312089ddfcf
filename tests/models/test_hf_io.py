"""HF checkpoint import/export without torch: sharded index, placement with a sharding_fn on
8 CPU devices, dtypes, overwrite protection, and clear errors for bad checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.models import (
    CheckpointError,
    UnsupportedModelError,
    from_pretrained,
    make_model,
    save_pretrained,
)
from jaxalign.models.hf_import import INDEX_FILE, SINGLE_FILE
from jaxalign.models.safetensors_io import SafetensorsFile, save_file
from jaxalign.models.tiny import tiny_config

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)))
MASK = jnp.asarray([[1] * 8, [0, 0, 0] + [1] * 5])


def _perturbed(model, seed=1):
    """Give every parameter (norms, biases too) O(0.3) random values, so logits are O(1)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(np.float32)) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A GQA Llama with q/k/v/o biases, saved once as a single-file checkpoint."""
    model = _perturbed(make_model(tiny_config("llama", vocab_size=64, hidden_size=32, num_heads=4,
                                              num_kv_heads=2, attention_bias=True, max_position=64)))
    path = save_pretrained(model, tmp_path_factory.mktemp("llama") / "ckpt")
    return model, path


def _params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def test_single_file_load_is_exact(llama):
    model, path = llama
    assert (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).exists()
    loaded = from_pretrained(path)
    want, got = _params(model), _params(loaded)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_sharded_index_load(llama, tmp_path):
    model, _ = llama
    out = save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) >= 3 and all((out / f).is_file() for f in shards)
    assert not (out / SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in _params(model).values())
    loaded = from_pretrained(out)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(loaded)[k], v, err_msg=str(k))


def test_sharding_fn_places_params_on_a_mesh(llama):
    model, path = llama
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    rules = {"vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": None,
             "head_dim": None, "norm": None}
    seen = []

    def sharding_fn(axes, shape):
        seen.append((axes, shape))
        return NamedSharding(mesh, PartitionSpec(*(None if a is None else rules[a] for a in axes)))

    sharded = from_pretrained(path, sharding_fn=sharding_fn)
    emb = sharded.embed_tokens.embedding[...]
    assert emb.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("tensor", "fsdp")), 2)
    assert {s.data.shape for s in emb.addressable_shards} == {(16, 16)}  # [64, 32] over 4 x 2
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(16, 1, 8)}
    assert ((("embed", "heads", "head_dim"), (32, 4, 8))) in seen
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(sharded)[k], v, err_msg=str(k))
    graphdef, params = nnx.split(sharded)
    logits = jax.jit(lambda p: nnx.merge(graphdef, p)(IDS, MASK))(params)
    # Sharded matmuls sum their partial products in another order: float32 rounding, relative.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(IDS, MASK)), rtol=1e-5, atol=1e-5)


def test_bf16_compute_runs_and_stays_close(llama):
    model, path = llama
    ref = np.asarray(model(IDS, MASK))
    bf16 = from_pretrained(path, dtype=jnp.bfloat16)
    assert bf16.embed_tokens.embedding[...].dtype == jnp.float32  # storage stays float32
    hidden = bf16.hidden_states(IDS, MASK)
    assert hidden.dtype == jnp.bfloat16
    logits = np.asarray(bf16(IDS, MASK))
    assert logits.dtype == np.float32
    real = np.asarray(MASK) == 1
    scale = np.abs(ref[real]).max()
    assert scale > 0.5
    assert np.abs(logits - ref)[real].max() <= 0.05 * scale
    # Same next-token choice almost everywhere.
    assert (logits.argmax(-1) == ref.argmax(-1))[real].mean() >= 0.9


def test_bf16_params_export_and_reload(llama, tmp_path):
    _, path = llama
    model = from_pretrained(path, param_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in _params(model).values())
    out = save_pretrained(model, tmp_path / "bf16")
    f = SafetensorsFile(out / SINGLE_FILE)
    assert f.get("model.norm.weight").dtype == jnp.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = from_pretrained(out, param_dtype=jnp.bfloat16)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(again)[k], v, err_msg=str(k))


def test_export_refuses_to_overwrite_and_replaces_stale_shards(llama, tmp_path):
    model, _ = llama
    out = save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, out)
    save_pretrained(model, out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", SINGLE_FILE]
    from_pretrained(out)


# ----------------------------------------------------------------------------- errors


def test_unsupported_architecture(llama, tmp_path):
    path = _copy(llama[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: model_type='falcon'.*FalconForCausalLM"):
        from_pretrained(path)


def test_unsupported_rope_type(llama, tmp_path):
    path = _copy(llama[1], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rope_parameters\.rope_type='yarn'"):
        from_pretrained(path)


def test_missing_directory_config_and_weights(llama, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    path = _copy(llama[1], tmp_path)
    (path / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json does not exist"):
        from_pretrained(path)


def test_corrupt_weight_file(llama, tmp_path):
    path = _copy(llama[1], tmp_path)
    data = (path / SINGLE_FILE).read_bytes()
    (path / SINGLE_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' has offsets .*\(truncated or corrupt file\)"):
        from_pretrained(path)
    (path / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        from_pretrained(path)
    (path / SINGLE_FILE).write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        from_pretrained(path)


def _rewrite(path, change):
    f = SafetensorsFile(path / SINGLE_FILE)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    change(tensors)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})


def test_missing_tensor(llama, tmp_path):
    path = _copy(llama[1], tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        from_pretrained(path)


def test_misshaped_tensor(llama, tmp_path):
    path = _copy(llama[1], tmp_path)

    def change(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]

    _rewrite(path, change)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                              r"has shape \(63, 32\), expected \(64, 32\)"):
        from_pretrained(path)


def test_index_naming_a_missing_shard(llama, tmp_path):
    out = save_pretrained(llama[0], tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((out / INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (out / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"weight file .*{victim} does not exist"):
        from_pretrained(out)


def test_gpt2_hub_names_without_transformer_prefix(tmp_path):
    """Hub GPT-2 checkpoints name tensors ``h.0.attn.c_attn.weight`` (no ``transformer.`` prefix)."""
    model = make_model(tiny_config("gpt2", vocab_size=64, hidden_size=32, max_position=16), seed=2)
    path = save_pretrained(model, tmp_path / "gpt2")

    def strip(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)

    _rewrite(path, strip)
    assert "h.0.attn.c_attn.weight" in SafetensorsFile(path / SINGLE_FILE).keys()
    loaded = from_pretrained(path)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(loaded)[k], v, err_msg=str(k))
