"""The TRL side of the online benchmark: ``trl.experimental.online_dpo.OnlineDPOTrainer`` (PyTorch, CPU).

Set by the benchmark: ``use_cpu`` (no CUDA device), ``bf16=False`` (float32, as jaxalign's
side), ``per_device_train_batch_size`` = pairs per optimizer step (one pair per prompt),
``gradient_accumulation_steps=1``, ``max_new_tokens``, ``temperature``, the reward function
``jaxalign.bench.online_reward.plain_text_reward``, ``max_steps`` (the benchmark stops the
loop itself), ``save_strategy="no"``, ``report_to="none"``, ``disable_tqdm``, the seed. TRL's
defaults otherwise: 2 samples per prompt (hard-coded), ``top_k=0``, ``top_p=1``, sigmoid loss,
beta 0.1, lr 5e-7, ``max_length`` 512, no ``missing_eos_penalty``, ties kept (chosen = the
first sample), a frozen deep copy as the reference, AdamW, logging every 10 steps. A variant
chooses ``gradient_checkpointing``: on is TRL's default, and it also turns the KV cache off
in TRL's ``generate`` call (``use_cache = not gradient_checkpointing``).

Measurement: ``trainer.train()`` runs in the worker and the callback of
``jaxalign.bench.trl_side`` answers the parent at step ends (set up after ``warmup_steps``,
then windows of ``n`` steps), so TRL's own loop is timed. Inside each step, wrappers on the
trainer instance time ``generate`` (``_generate``: prompt tokenization, ``model.generate``,
cutting after EOS) and ``score`` (decoding the completions, ``batch_decode``, and
``_calculate_rewards_from_functions``); ``train`` is the rest of the window (policy and
reference forwards, loss, backward, optimizer, TRL's logging and data loading).
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OnlineTRLVariant", "instrument", "serve_online_trl"]


@dataclass(frozen=True)
class OnlineTRLVariant:
    """A TRL configuration (float32 always; what else differs from TRL's defaults)."""

    name: str
    gradient_checkpointing: bool = True  # TRL's default; it also disables the KV cache in generate


def _timed(fn: Callable[..., Any], seconds: dict[str, float], key: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start

    return wrapper


def instrument(trainer: Any, steps: deque) -> None:
    """Wraps ``trainer``'s generation, scoring and ``training_step``: each step appends
    ``{"prompts", "pairs", "tokens", "generate_s", "score_s", "cpu_s"}`` to ``steps``
    (``tokens``: the completions' tokens up to and including EOS; ``cpu_s``: the process's CPU
    time in ``training_step``, all threads)."""
    seconds = {"generate_s": 0.0, "score_s": 0.0}
    tokens = [0]
    generate = _timed(trainer._generate, seconds, "generate_s")

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        tokens[0] += int(out[3].sum())  # completion_mask
        return out

    trainer._generate = counting_generate
    trainer._calculate_rewards_from_functions = _timed(trainer._calculate_rewards_from_functions, seconds, "score_s")
    tokenizer = trainer.processing_class
    tokenizer.batch_decode = _timed(tokenizer.batch_decode, seconds, "score_s")
    step = trainer.training_step

    def training_step(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seconds.update(generate_s=0.0, score_s=0.0)
        tokens[0] = 0
        cpu = time.process_time()
        loss = step(model, inputs, *args, **kwargs)
        prompts = float(len(inputs["prompt"]))
        steps.append({"prompts": prompts, "pairs": prompts, "tokens": float(tokens[0]), **seconds,
                      "cpu_s": time.process_time() - cpu})
        return loss

    trainer.training_step = training_step


def _trainer(*, model_dir: str, prompts_file: str, variant: OnlineTRLVariant, batch: int, new_tokens: int,
             temperature: float, workdir: str, seed: int, callback: Any):
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from jaxalign.bench.online_reward import plain_text_reward

    args = OnlineDPOConfig(
        output_dir=workdir, use_cpu=not torch.cuda.is_available(), bf16=False,
        gradient_checkpointing=variant.gradient_checkpointing, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, max_new_tokens=new_tokens, temperature=temperature, max_steps=1_000_000,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=seed,
    )
    dataset = datasets.Dataset.from_json(prompts_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return OnlineDPOTrainer(model=model_dir, reward_funcs=plain_text_reward, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[callback])


def serve_online_trl(conn, *, model_dir: str, prompts_file: str, variant: OnlineTRLVariant, batch: int,
                     new_tokens: int, temperature: float, warmup_steps: int, workdir: str, threads: int,
                     seed: int = 0) -> None:
    """Worker entry point (``jaxalign.bench.session.Worker``): builds the trainer on ``setup``
    and runs ``train()``, whose callback serves ``window n`` (``n`` steps) and ``finish``."""
    try:
        import torch
        import transformers
        import trl

        from jaxalign.bench.trl_side import _make_callback
        from jaxalign.perf.memory import peak_rss_bytes

        torch.set_num_threads(threads)
        request = conn.recv()
        if request[0] != "setup":
            raise ValueError(f"expected a setup request first, got {request!r}")
        started = time.perf_counter()
        steps: deque = deque()
        callback = _make_callback(conn, warmup_steps, steps, started)
        trainer = _trainer(model_dir=model_dir, prompts_file=prompts_file, variant=variant, batch=batch,
                           new_tokens=new_tokens, temperature=temperature, workdir=workdir, seed=seed,
                           callback=callback)
        instrument(trainer, steps)
        callback.setup_info.update(
            mixed_precision=str(trainer.accelerator.mixed_precision), model_dtype=str(trainer.model.dtype),
            gradient_checkpointing=variant.gradient_checkpointing,
            generate_use_cache=bool(trainer.generation_config.use_cache), torch_threads=torch.get_num_threads(),
            torch_version=torch.__version__, transformers_version=transformers.__version__,
            trl_version=trl.__version__, prompts_in_dataset=len(trainer.train_dataset),
        )
        trainer.train()
        loss = next((float(h["loss"]) for h in reversed(trainer.state.log_history) if "loss" in h), None)
        conn.send({"peak_rss_bytes": peak_rss_bytes(), "last_logged_loss": loss, "pid": os.getpid()})
    except Exception:  # reported to the parent, which raises BenchError naming the worker
        conn.send({"error": traceback.format_exc()})
