"""The rule table: expected PartitionSpecs per logical name, fallbacks, errors, real placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.parallel import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    create_sharded,
    logical_to_spec,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    shard_tree,
    sharding_fn,
    with_logical_constraint,
)


@pytest.fixture(scope="module")
def mesh222():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def mesh_fsdp8():
    return make_mesh({"fsdp": 8})


@pytest.mark.parametrize(
    "name, spec",
    [
        ("vocab", P("tensor")),
        ("embed", P("fsdp")),
        ("mlp", P("tensor")),
        ("heads", P("tensor")),
        ("kv_heads", P("tensor")),
        ("head_dim", P()),
        ("norm", P()),
        ("layers", P()),
        ("batch", P(("data", "fsdp"))),
        ("length", P()),
    ],
)
def test_each_logical_name(mesh222, name, spec):
    assert logical_to_spec((name,), (16,), mesh222) == spec


@pytest.mark.parametrize(
    "axes, shape, spec",
    [
        (("vocab", "embed"), (64, 32), P("tensor", "fsdp")),  # token embedding
        (("embed", "vocab"), (32, 64), P("fsdp", "tensor")),  # unembedding
        (("embed", "heads", "head_dim"), (32, 4, 8), P("fsdp", "tensor")),  # q projection
        (("embed", "kv_heads", "head_dim"), (32, 2, 8), P("fsdp", "tensor")),  # k/v projection
        (("heads", "head_dim", "embed"), (4, 8, 32), P("tensor", None, "fsdp")),  # o projection
        (("embed", "mlp"), (32, 64), P("fsdp", "tensor")),  # gate/up
        (("mlp", "embed"), (64, 32), P("tensor", "fsdp")),  # down
        (("layers", "embed", "mlp"), (3, 32, 64), P(None, "fsdp", "tensor")),  # scanned layers
        (("norm",), (32,), P()),
        ((None, "embed"), (5, 32), P(None, "fsdp")),
    ],
)
def test_llama_tensors(mesh222, axes, shape, spec):
    assert logical_to_spec(axes, shape, mesh222) == spec


def test_size_one_axes_are_dropped(mesh_fsdp8):
    assert logical_to_spec(("vocab", "embed"), (64, 32), mesh_fsdp8) == P(None, "fsdp")
    assert logical_to_spec(("batch",), (8,), mesh_fsdp8) == P("fsdp")


def test_indivisible_dims_fall_back(mesh222, mesh_fsdp8):
    # GPT-2-like vocab 50257 is odd: replicated over tensor, embed still fsdp-sharded.
    assert logical_to_spec(("vocab", "embed"), (50257, 32), mesh222) == P(None, "fsdp")
    # 12 is not divisible by fsdp=8: replicated.
    assert logical_to_spec(("embed", "mlp"), (12, 64), mesh_fsdp8) == P()
    # a batch of 2 rows over data*fsdp=4 keeps the divisible prefix ("data",).
    assert logical_to_spec(("batch",), (2,), mesh222) == P("data")


def test_mesh_axis_used_once(mesh222):
    assert logical_to_spec(("embed", "embed"), (32, 32), mesh222) == P("fsdp")
    assert logical_to_spec(("heads", "mlp"), (4, 64), mesh222) == P("tensor")


def test_errors(mesh222):
    with pytest.raises(ValueError, match=r"unknown logical axis name 'hidden'.*knows \["):
        logical_to_spec(("hidden", "mlp"), (32, 64), mesh222)
    with pytest.raises(ValueError, match=r"have 1 names but the tensor has shape \(32, 64\)"):
        logical_to_spec(("embed",), (32, 64), mesh222)
    with pytest.raises(ValueError, match=r"mesh axis 'model' not in mesh axes"):
        logical_to_spec(("embed",), (32,), mesh222, rules=(("embed", "model"),))


def test_custom_rules_and_flax_compatibility(mesh222):
    rules = (("embed", "tensor"), ("mlp", "fsdp"))
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh222, rules) == P("tensor", "fsdp")
    # The table is in Flax's format: nnx's own resolver reads it the same way for simple names.
    with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        var = nnx.Param(jnp.zeros((32, 64)), out_sharding=("embed", "mlp"), eager_sharding=False)
        assert nnx.get_partition_spec(var).get_value() == P("fsdp", "tensor")


def test_sharding_fn(mesh222):
    place = sharding_fn(mesh222)
    sharding = place(("embed", "mlp"), (32, 64))
    assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh222
    assert sharding.spec == P("fsdp", "tensor")
    assert place(None, (32,)).spec == P()


def test_batch_sharding(mesh222):
    assert batch_sharding(mesh222).spec == P(("data", "fsdp"))


def test_param_and_optimizer_shardings(mesh222, toy):
    abstract = nnx.eval_shape(toy.make_model)
    _, params = nnx.split(abstract)
    shardings = param_shardings(params, mesh222)
    assert shardings["q"].get_value().spec == P("fsdp", "tensor")
    assert shardings["o"].get_value().spec == P("tensor", None, "fsdp")
    assert shardings["attn_norm"].get_value().spec == P()
    # a Module is read through its state
    assert param_shardings(abstract, mesh222)["down"].get_value().spec == P("tensor", "fsdp")

    # optax moments of a Variable State keep the metadata: same specs as their params.
    opt_state = jax.eval_shape(toy.OPTIMIZER.init, params)
    opt_sh = param_shardings(opt_state, mesh222)
    adam = opt_sh[0]
    assert adam.count.spec == P()
    for name in ("embedding", "q", "down", "final_norm"):
        assert adam.mu[name].get_value().spec == shardings[name].get_value().spec
        assert adam.nu[name].get_value().spec == shardings[name].get_value().spec
    # the structural route gives the same answer, also for plain-array parameter trees
    same = opt_state_shardings(opt_state, params, shardings, mesh222)
    assert jax.tree.leaves(same) == jax.tree.leaves(opt_sh)

    pure_params = nnx.to_pure_dict(params)
    pure_sh = nnx.to_pure_dict(shardings)
    pure_opt = jax.eval_shape(optax.adamw(1e-3).init, pure_params)
    pure_opt_sh = opt_state_shardings(pure_opt, pure_params, pure_sh, mesh222)
    assert pure_opt_sh[0].mu["q"].spec == P("fsdp", "tensor")
    assert pure_opt_sh[0].count.spec == P()


def test_fsdp8_each_device_holds_an_eighth(mesh_fsdp8, toy):
    model = create_sharded(toy.make_model, mesh_fsdp8)
    unembed = model.unembed.get_value()  # [embed=32, vocab=64] -> P("fsdp")
    assert unembed.sharding.spec == P("fsdp")
    shards = unembed.addressable_shards
    assert len(shards) == 8
    assert {s.data.shape for s in shards} == {(4, 64)}
    assert sum(s.data.nbytes for s in shards) == unembed.nbytes
    assert len({s.device for s in shards}) == 8
    # pieces reassemble to an unsharded (eager) creation's values; jit may round 0.2 * normal
    # differently from eager by one ulp, hence the tolerance.
    np.testing.assert_allclose(np.asarray(unembed), np.asarray(toy.make_model().unembed.get_value()), rtol=0, atol=1e-7)


def test_shard_tree_moves_concrete_state(mesh222, toy):
    _, params = nnx.split(toy.make_model())
    placed = shard_tree(params, mesh222)
    assert placed["gate"].get_value().sharding.spec == P("fsdp", "tensor")
    assert placed["gate"].get_value().addressable_shards[0].data.shape == (16, 32)
    np.testing.assert_array_equal(np.asarray(placed["gate"].get_value()), np.asarray(params["gate"].get_value()))


def test_every_name_of_jaxalign_models_is_in_the_table(mesh222):
    from jaxalign.models import ModelConfig, abstract_model

    llama = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8, intermediate_size=64, max_position=16)
    gpt2 = ModelConfig(family="gpt2", vocab_size=63, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                       head_dim=8, intermediate_size=64, max_position=16, attention_bias=True,
                       attention_out_bias=True, mlp_bias=True)
    specs = {}
    for name, cfg in (("llama", llama), ("gpt2", gpt2)):
        shardings = param_shardings(abstract_model(cfg), mesh222)  # raises on an unknown name
        flat = nnx.to_flat_state(shardings)
        specs[name] = {".".join(map(str, path)): var.get_value().spec for path, var in flat}
    assert specs["llama"]["layers.0.self_attn.q_proj.kernel"] == P("fsdp", "tensor")
    assert specs["llama"]["layers.0.self_attn.k_proj.kernel"] == P("fsdp", "tensor")
    assert specs["llama"]["layers.0.self_attn.o_proj.kernel"] == P("tensor", None, "fsdp")
    assert specs["llama"]["layers.0.mlp.down_proj.kernel"] == P("tensor", "fsdp")
    assert specs["llama"]["embed_tokens.embedding"] == P("tensor", "fsdp")
    assert specs["llama"]["lm_head"] == P("fsdp", "tensor")
    assert specs["llama"]["norm.scale"] == P()
    # GPT-2: odd vocabulary 63 falls back to replication over tensor; fused qkv keeps its None dim
    assert specs["gpt2"]["wte.embedding"] == P(None, "fsdp")
    assert specs["gpt2"]["h.0.attn.c_attn.kernel"] == P("fsdp", None, "tensor")
    assert specs["gpt2"]["wpe.embedding"] == P(None, "fsdp")


def test_with_logical_constraint(mesh222):
    x = jnp.ones((8, 4, 16))
    assert with_logical_constraint(x, ("batch", "length", "embed")) is x  # no mesh context: identity

    @jax.jit
    def f(x, q):
        return (with_logical_constraint(x * 2, ("batch", "length", "embed")),
                with_logical_constraint(q * 2, ("batch", "length", "heads", "head_dim")))

    with jax.set_mesh(mesh222):
        y, q = f(x, jnp.ones((8, 4, 4, 2)))
    assert y.sharding.spec == P(("data", "fsdp"))  # embed lost fsdp to batch
    assert q.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 16)))
