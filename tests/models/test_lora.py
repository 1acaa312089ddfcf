"""LoRA adapters: identity at init, merging, sharding axes, and parity with transformers + peft."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import save_pretrained
from jaxalign.models.lora import LoRAParam, add_adapters, adapted_projections, merge_adapters, save_adapter
from jaxalign.parallel import param_shardings

from .conftest import VOCAB, jitted, tiny_model

ALL_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_GPT2 = ("c_attn", "c_proj", "c_fc")


def _ids(seed=0, shape=(2, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def _randomise_b(model, seed=1, std=0.05):
    rng = np.random.default_rng(seed)
    for _, proj in adapted_projections(model):
        proj.lora_b[...] = jnp.asarray(std * rng.standard_normal(proj.lora_b.shape), proj.lora_b[...].dtype)
    return model


@pytest.mark.parametrize("family,targets", [("llama", ALL_LLAMA), ("gpt2", ALL_GPT2)])
def test_fresh_adapters_leave_logits_unchanged(family, targets):
    ids = _ids()
    base = jitted(tiny_model(family))(ids)
    model = add_adapters(tiny_model(family), rank=4, alpha=16, targets=targets)
    per_layer = 4 if family == "gpt2" else 7  # GPT-2's c_proj is in the attention and in the MLP
    assert len(adapted_projections(model)) == per_layer * model.config.num_layers
    # B = 0: the same function (up to XLA fusing a different program differently).
    np.testing.assert_allclose(np.asarray(jitted(model)(ids)), np.asarray(base), atol=1e-6)


@pytest.mark.parametrize("family,targets", [("llama", ("q_proj", "o_proj", "down_proj")), ("gpt2", ALL_GPT2)])
def test_merged_kernels_equal_adapted_forward(family, targets):
    ids = _ids(1)
    model = _randomise_b(add_adapters(tiny_model(family), rank=3, alpha=8, targets=targets))
    adapted = np.asarray(jitted(model)(ids))
    assert np.abs(adapted - np.asarray(jitted(tiny_model(family))(ids))).max() > 1e-3  # the adapters matter
    merged = merge_adapters(model)
    assert not adapted_projections(merged)
    np.testing.assert_allclose(np.asarray(jitted(merged)(ids)), adapted, atol=1e-5)


def test_adapters_split_from_base_weights_with_logical_axes():
    model = add_adapters(tiny_model("llama"), rank=4, alpha=16, targets=("q_proj", "o_proj"))
    _, adapters, base = nnx.split(model, LoRAParam, nnx.Param)
    flat = dict(nnx.to_flat_state(adapters))
    q_a, q_b = flat[("layers", 0, "self_attn", "q_proj", "lora_a")], flat[("layers", 0, "self_attn", "q_proj", "lora_b")]
    o_a = flat[("layers", 0, "self_attn", "o_proj", "lora_a")]
    assert q_a.get_metadata()["out_sharding"] == ("embed", None) and q_a.shape == (32, 4)
    assert q_b.get_metadata()["out_sharding"] == (None, "heads", "head_dim") and q_b.shape == (4, 4, 8)
    assert o_a.get_metadata()["out_sharding"] == ("heads", "head_dim", None)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(base))
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    param_shardings(adapters, mesh)  # the rule table resolves every adapter axis


def test_bad_targets_and_rank():
    with pytest.raises(ValueError, match=r"\['gate_proj'\] name no projection of the gpt2 model"):
        add_adapters(tiny_model("gpt2"), rank=2, alpha=16, targets=("c_attn", "gate_proj"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_adapters(tiny_model("llama"), rank=0, alpha=16, targets=("q_proj",))


@pytest.mark.parity
@pytest.mark.parametrize("family,targets", [("llama", ALL_LLAMA), ("gpt2", ALL_GPT2)])
def test_merged_export_and_peft_adapter_match_transformers(tmp_path, family, targets):
    """jaxalign logits == transformers on the merged export == transformers base + peft adapter
    (GPT-2: peft's ``fan_in_fan_out`` layout of its Conv1D projections)."""
    import torch
    import peft
    from transformers import AutoModelForCausalLM

    model = _randomise_b(add_adapters(tiny_model(family), rank=4, alpha=16, targets=targets, seed=3))
    ids = _ids(2, (2, 11))
    ours = np.asarray(jitted(model)(ids))
    save_pretrained(model, tmp_path / "base")  # the kernels only: the base weights
    save_adapter(model, tmp_path / "adapter", alpha=16, base_model=str(tmp_path / "base"))
    save_pretrained(merge_adapters(model), tmp_path / "merged")

    def logits(hf_model):
        with torch.no_grad():
            return hf_model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    np.testing.assert_allclose(logits(merged), ours, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(logits(with_adapter), ours, atol=1e-4)
