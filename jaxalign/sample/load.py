"""The policy to sample from: a Hugging Face checkpoint directory or a jaxalign run directory.

``load_policy(path, mesh=..., dtype=..., tokenizer=...)`` returns the model's graph, its
parameters placed on ``mesh`` (``jaxalign.parallel`` rules, as the trainer places them), its
config and tokenizer. A *run directory* (what ``jaxalign.train`` writes: its own
``config.json`` with a ``model`` section, ``checkpoints/``, maybe ``export/``) gives:

* the architecture: ``config.json`` of the run's ``model.path`` (or of ``export/`` when that
  directory is gone); compute dtype ``model.dtype`` unless ``dtype`` is given, parameters in
  ``model.param_dtype`` as they were trained;
* the parameters: the policy (``state.params["model"]``) of the newest usable checkpoint,
  read alone from the Orbax state (a partial restore straight onto the mesh: the optimizer
  state is never read) and checked against the checksums the trainer saved; an unusable step
  (no commit marker, unreadable, checksum mismatch) is reported on stderr and the previous
  one is tried. Nothing in the run directory is changed. Without checkpoints: ``export/``;
* the tokenizer: ``model.tokenizer`` or ``model.path`` of the run (or ``export/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxalign import models, parallel
from jaxalign.tokenizers import load_tokenizer

__all__ = ["Policy", "SampleError", "is_run_dir", "load_policy"]

RUN_CONFIG = "config.json"  # jaxalign.train.loop.CONFIG_FILE
CHECKPOINTS, EXPORT = "checkpoints", "export"


class SampleError(Exception):
    """Bad input to the sampler; the message (one line) says what and where."""


@dataclasses.dataclass
class Policy:
    graphdef: nnx.GraphDef
    params: Any
    config: models.ModelConfig
    tokenizer: Any
    source: str  # what the parameters were read from, for the log
    model_dir: str  # the HF directory of the architecture (its config.json)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(f"{path}: not readable JSON ({e})") from None


def is_run_dir(path: str) -> bool:
    """A jaxalign run directory (trainer config + checkpoints) rather than an HF checkpoint."""
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return True
    config = _read_json(os.path.join(path, RUN_CONFIG))
    return isinstance(config, dict) and isinstance(config.get("model"), dict) and "model_type" not in config


def _tokenizer(path: str, model_config: models.ModelConfig) -> Any:
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise SampleError(f"tokenizer: {e}") from None
    if len(tokenizer) > model_config.vocab_size:
        raise SampleError(f"the tokenizer ({path}) has {len(tokenizer)} tokens, more than the model's vocabulary of "
                          f"{model_config.vocab_size}: use the model's own tokenizer (--tokenizer)")
    return tokenizer


def _from_hf(path: str, mesh: Mesh, dtype: str, param_dtype: str = "float32") -> tuple[nnx.GraphDef, Any, Any]:
    try:
        model = models.from_pretrained(path, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                       sharding_fn=parallel.sharding_fn(mesh))
    except (OSError, models.CheckpointError, models.UnsupportedModelError) as e:
        raise SampleError(f"loading {path}: {e}") from None
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, model.config


def _restore_policy(directory: str, abstract: Any, mesh: Mesh) -> tuple[Any, int] | None:
    """``(policy params, step)`` of the newest usable checkpoint under ``directory``, read alone
    (``RunCheckpoints.restore_latest(partial=True)``, nothing renamed); None when there is no
    checkpoint at all; ``SampleError`` when none is usable."""
    from jaxalign.train.checkpoint import CheckpointError, RunCheckpoints

    shardings = parallel.param_shardings(abstract, mesh)
    target = {"params": {"model": jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)}}
    checkpoints = RunCheckpoints(directory, async_save=False)
    try:
        restored = checkpoints.restore_latest(target, partial=True, set_aside=False)
    except CheckpointError as e:
        raise SampleError(f"{directory}: no usable checkpoint: {' '.join(str(e).split())}") from None
    finally:
        checkpoints.close()
    return None if restored is None else (restored.state["params"]["model"], restored.step)


def _from_run(run: str, mesh: Mesh, dtype: str | None, tokenizer: str | None) -> Policy:
    config = _read_json(os.path.join(run, RUN_CONFIG))
    model_section = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model_section, dict):
        raise SampleError(f"{os.path.join(run, RUN_CONFIG)}: no 'model' section (not a jaxalign run directory?)")
    dtype = dtype or model_section.get("dtype") or "float32"
    param_dtype = model_section.get("param_dtype") or "float32"
    export = os.path.join(run, EXPORT)
    candidates = [p for p in (model_section.get("path"), export) if p]
    architecture = next((p for p in candidates if os.path.isfile(os.path.join(p, "config.json"))), None)
    if architecture is None:
        raise SampleError(f"run directory {run}: its model.path {model_section.get('path')!r} holds no config.json "
                          f"and there is no {export}; cannot know the architecture")
    try:
        model_config = models.load_config(architecture, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
    except (models.CheckpointError, models.UnsupportedModelError) as e:
        raise SampleError(f"run directory {run}: {e}") from None
    graphdef, abstract = nnx.split(models.abstract_model(model_config), nnx.Param)
    restored = None
    if os.path.isdir(os.path.join(run, CHECKPOINTS)):
        restored = _restore_policy(os.path.join(run, CHECKPOINTS), abstract, mesh)
    if restored is not None:
        params, step = restored
        source = f"checkpoint at step {step} of {run}"
    elif os.path.isfile(os.path.join(export, "config.json")):
        graphdef, params, model_config = _from_hf(export, mesh, dtype, param_dtype)
        source = f"export of {run} ({export})"
    else:
        raise SampleError(f"run directory {run} holds no checkpoint and no export")
    tokenizer_dir = tokenizer or model_section.get("tokenizer") or architecture
    if not tokenizer and not os.path.isdir(tokenizer_dir):
        tokenizer_dir = export
    return Policy(graphdef, params, model_config, _tokenizer(tokenizer_dir, model_config), source, architecture)


def load_policy(path: str, *, mesh: Mesh, dtype: str | None = None, tokenizer: str | None = None) -> Policy:
    """The policy at ``path`` (HF checkpoint or run directory) on ``mesh``; see the module docstring."""
    if not os.path.isdir(path):
        raise SampleError(f"--model {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SampleError(f"--model {path} holds no config.json (expected a Hugging Face checkpoint directory "
                          "or a jaxalign run directory)")
    if is_run_dir(path):
        return _from_run(path, mesh, dtype, tokenizer)
    graphdef, params, config = _from_hf(path, mesh, dtype or "float32")
    return Policy(graphdef, params, config, _tokenizer(tokenizer or path, config), f"checkpoint {path}", path)
