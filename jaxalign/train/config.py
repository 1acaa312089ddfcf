"""The trainer's configuration: base defaults, the allowed values, and validation.

A recipe (``configs/<name>.py``) defines ``get_config()`` that starts from ``base_config()``
and changes fields. ``base_config()`` returns a *locked* ``ml_collections.ConfigDict``, so a
recipe or a command-line override that names a field that does not exist fails at once.
``validate(config)`` checks everything else (types, allowed values, cross-field rules) and
raises ``ConfigError`` naming the key, the bad value, and the allowed values or close
matches.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from jaxalign import parallel
from jaxalign.data.truncation import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH
from jaxalign.parallel.mesh import mesh_config_dict

__all__ = [
    "ALLOWED",
    "ALLOWED_LORA_TARGETS",
    "RANGES",
    "ConfigError",
    "base_config",
    "close_matches",
    "config_comments",
    "config_diff",
    "describe",
    "flatten",
    "grad_accum_steps",
    "distill_recipe",
    "micro_batch_size",
    "online_recipe",
    "preference_recipe",
    "validate",
]


class ConfigError(ValueError):
    """A configuration error; the message names the key and what is allowed."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every field the trainer reads (one comment per field), locked."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed: parameter init (heads), data shuffling, per-step RNG
    c.steps = 1000  # total optimizer steps; 0 = derive from `epochs`
    c.epochs = 0.0  # used when steps == 0: steps = ceil(epochs * pairs / batch_size)
    c.log_every = 10  # write metrics (JSONL, TensorBoard, progress bar) every N steps
    c.eval_every = 100  # evaluate on held-out pairs every N steps (0 = only at start and end)
    c.checkpoint_every = 500  # save a checkpoint every N steps (0 = only at the end)
    c.progress_bar = True  # show a tqdm progress bar on process 0
    c.huge_pages = True  # on CPU hosts, python -m jaxalign.train restarts itself with glibc.malloc.hugetlb=1: transparent huge pages for XLA's host buffers (Linux, glibc >= 2.35; docs/performance.md)
    c.compilation_cache_dir = ""  # persistent XLA compilation cache (a restart or resume loads compiled steps): "" = JAX_COMPILATION_CACHE_DIR if set, else WORKDIR/compilation_cache; "none" = off; else a directory (runs may share one)
    c.peak_flops_per_device = 0.0  # MFU denominator (FLOP/s per device) of the logged `mfu`; 0 = the data sheet's dense peak for the device and model.dtype (known GPUs/TPUs; none on CPU: no `mfu`)
    c.max_consecutive_nonfinite = 10  # stop (checkpoint = last good state) after N consecutive skipped non-finite steps; 0 = never

    c.model = ml_collections.ConfigDict()  # the policy model and its precision
    c.model.path = ""  # Hugging Face checkpoint directory (config.json + *.safetensors)
    c.model.tokenizer = ""  # tokenizer directory; "" = model.path
    c.model.create_if_missing = False  # write a tiny random model + tokenizer at model.path if absent
    c.model.dtype = "float32"  # compute dtype of the forward pass
    c.model.param_dtype = "float32"  # dtype of the trained (master) parameters
    c.model.remat = "none"  # per-layer rematerialisation: none | full | dots_saveable | dots_with_no_batch_dims_saveable
    c.model.logits_chunk = 0  # sequence chunk for the log-prob unembedding (0 = library default)
    c.model.lm_head = "scored"  # scored: unembed only the positions the loss scores | all: every position (slower; benchmark ablation)
    c.model.query_block = 128  # queries per attention block (0 = one full [L, L] score matrix; benchmark ablation)
    c.model.scan_layers = "auto"  # layer weights stacked on a `layers` axis, blocks run by lax.scan (compile time independent of depth): auto (models of >= 4 layers) | on | off
    c.model.tiny = ml_collections.ConfigDict()  # the model written when create_if_missing
    c.model.tiny.family = "llama"  # llama | gpt2
    c.model.tiny.hidden_size = 64  # width of the residual stream
    c.model.tiny.num_layers = 2  # decoder layers
    c.model.tiny.num_heads = 4  # attention heads
    c.model.tiny.num_kv_heads = 2  # key/value heads (llama; GQA when < num_heads)
    c.model.tiny.intermediate_size = 128  # MLP width
    c.model.tiny.vocab_size = 1024  # BPE vocabulary size of the tokenizer trained for it

    c.data = ml_collections.ConfigDict()  # training and held-out data, batching
    c.data.train = ""  # training file(s): comma-separated paths or globs (jsonl[.gz], parquet), or tfds:NAME
    c.data.eval = ""  # held-out file(s); "" = hold out `eval_pairs` records of `train`
    c.data.eval_pairs = 64  # records held out from `train` when `eval` is empty (0 = no eval)
    c.data.format = "auto"  # record format (see ALLOWED["data.format"])
    c.data.prompt_key = "prompt"  # the prompt column of your data (renamed to "prompt"; python -m jaxalign.data.check --prompt-key)
    c.data.chosen_key = "chosen"  # the chosen-response column (renamed to "chosen")
    c.data.rejected_key = "rejected"  # the rejected-response column (renamed to "rejected")
    c.data.max_length = DEFAULT_MAX_LENGTH  # max tokens of prompt + completion
    c.data.max_prompt_length = DEFAULT_MAX_PROMPT_LENGTH  # max prompt tokens (cut from the left)
    c.data.batch_size = 8  # pairs (examples for SFT) per optimizer step, over all processes
    c.data.micro_batch_size = 0  # pairs per gradient-accumulation micro-batch (0 = batch_size)
    c.data.packing = False  # pack several sequences per row (segment ids)
    c.data.pack_rows = 0  # packing: most rows per micro-batch (0 = room for 1.25x an average batch's tokens + 1 row)
    c.data.buckets = (64, 128, 256, 512)  # padded row lengths (a batch uses the smallest that fits)
    c.data.shuffle = True  # reshuffle every epoch (seeded by `seed`)
    c.data.on_bad_record = "error"  # error | skip (skipped records are counted and reported)
    c.data.cache_dir = ""  # tokenized-data cache (tokenize once; later runs, resumes and processes open it): "" = $XDG_CACHE_HOME/jaxalign/data (~/.cache/jaxalign/data); "none" = off; else a directory (multi-process: one all processes share)
    c.data.synthetic_pairs = 512  # records written for data.train = "synthetic:DIR"

    c.loss = ml_collections.ConfigDict()  # the objective and its hyperparameters
    c.loss.name = "dpo"  # see ALLOWED["loss.name"]
    c.loss.beta = 0.1  # inverse temperature of the implicit reward (DPO family, VPO, DOVE)
    c.loss.label_smoothing = 0.0  # cDPO: assumed label-flip rate (dpo only; 0 = plain DPO)
    c.loss.epsilon = 0.1  # rDPO: known label-flip rate in [0, 0.5)
    c.loss.ipo_normalize = True  # IPO: divide each log-ratio by its completion length (TRL); False = sums
    c.loss.vpo_alpha = 0.1  # VPO: value-regulariser weight (the term is alpha*beta*mean log-ratio)
    c.loss.vpo_mode = "offline"  # VPO: offline (pessimism, sign -1) | online (optimism, +1)
    c.loss.vpo_calibration = "chosen"  # VPO calibration samples: chosen | reference_samples
    c.loss.vpo_max_new_tokens = 32  # VPO reference_samples, offline: tokens sampled per prompt (online runs sample online.max_new_tokens)
    c.loss.reward_margin = 0.0  # Bradley-Terry: margin subtracted from the reward difference

    c.reference = ml_collections.ConfigDict()  # where reference log-probs come from
    c.reference.mode = "frozen"  # frozen | precomputed | none (reference-free)
    c.reference.path = ""  # reference checkpoint; "" = model.path (the initial policy)
    c.reference.cache_dir = ""  # precomputed log-prob cache; "" = WORKDIR/reference_cache
    c.reference.cache_batch_size = 0  # pairs per batch of the forward-only cache pass (all processes); 0 = 4 x micro-batch

    c.lora = ml_collections.ConfigDict()  # LoRA adapters: train only low-rank updates of the base projections (the reference is the base with adapters off)
    c.lora.rank = 0  # adapter rank r (0 = off: full fine-tuning)
    c.lora.alpha = 16.0  # scale of the adapter update: y = x W + (alpha / r) * (x A) B
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # projections that get adapters (see ALLOWED_LORA_TARGETS)
    c.lora.base_dtype = ""  # dtype of the frozen base weights: "" = model.param_dtype; "bfloat16" halves their memory (the adapters stay in model.param_dtype)
    c.lora.adapter = ""  # a PEFT LoRA adapter directory to start from (its rank, alpha and targets must be the run's); "" = fresh adapters

    c.optimizer = ml_collections.ConfigDict()  # optimizer, learning-rate schedule, clipping
    c.optimizer.name = "adamw"  # adamw | sgd | adafactor
    c.optimizer.learning_rate = 1e-6  # peak learning rate
    c.optimizer.warmup_steps = 0  # linear warmup from 0 to the peak
    c.optimizer.schedule = "cosine"  # after warmup: cosine | linear (decay to end_factor*peak) | constant
    c.optimizer.end_factor = 0.0  # final learning rate as a fraction of the peak
    c.optimizer.max_grad_norm = 1.0  # clip the global gradient norm (0 = no clipping)
    c.optimizer.weight_decay = 0.0  # decoupled weight decay on linear-map weights and embeddings (never norms or biases)
    c.optimizer.b1 = 0.9  # adamw beta1
    c.optimizer.b2 = 0.999  # adamw beta2
    c.optimizer.eps = 1e-8  # adamw epsilon
    c.optimizer.momentum = 0.0  # sgd momentum (0 = plain SGD)

    c.distill = ml_collections.ConfigDict()  # distillation of preference alignment (loss dckd | adpa; docs/distillation.md)
    c.distill.teacher = ""  # the DPO-aligned teacher: HF checkpoint or jaxalign run directory (its export); must share the student's tokenizer
    c.distill.teacher_reference = ""  # ADPA: the teacher's reference (its SFT checkpoint), for the advantages
    c.distill.top_k = 50  # teacher tokens kept per position (DCKD's top-k; ADPA's candidates)
    c.distill.sft_weight = 1.0  # weight of the NLL of the chosen response (sft_on_chosen)
    c.distill.chosen_kl_weight = 0.1  # DCKD: weight of the top-k KL on chosen responses
    c.distill.rejected_kl_weight = 0.1  # DCKD: weight of the top-k KL on rejected responses
    c.distill.adpa_weight = 1.6  # ADPA: weight of the expected-advantage term
    c.distill.adpa_clip = False  # ADPA: clamp advantages to [1e-8, 1) as the released code does (paper form: False)
    c.distill.max_new_tokens = 256  # ADPA: most tokens of the student's greedy generations (the states)
    c.distill.cache_dir = ""  # teacher top-k / advantage caches; "" = WORKDIR/distill_cache
    c.distill.pipeline = "none"  # none | adpa_plus: DCKD then ADPA from the DCKD student | quickstart: the distillation quickstart's stages (jaxalign/distill/pipeline.py)

    c.online = ml_collections.ConfigDict()  # the online driver: rounds of sample -> score -> pair -> train (docs/online.md)
    c.online.rounds = 0  # online rounds; 0 = offline training on the pairs of data.train (then no other online.* key is read)
    c.online.prompts_per_round = 64  # prompts of data.train sampled per round, over all processes
    c.online.samples_per_prompt = 4  # completions sampled per prompt (K)
    c.online.max_new_tokens = 64  # most tokens per completion (prompts are cut to data.max_prompt_length)
    c.online.temperature = 1.0  # sampling temperature (0 = greedy)
    c.online.top_p = 1.0  # nucleus sampling (1 = off)
    c.online.top_k = 0  # top-k sampling (0 = off)
    c.online.sample_batch_size = 16  # prompts per sampler call, over all processes
    c.online.reward_function = ""  # module:function or path/to/file.py:function, called fn(prompts, completions, **metadata) -> floats; several: comma-separated
    c.online.reward_model = ""  # reward model: a Hugging Face sequence-classification checkpoint (a reward_model run's export) or a jaxalign reward-model run directory
    c.online.reward_weights = ()  # weight of each reward, in order: the reward model, then each function (empty = all 1)
    c.online.missing_eos_penalty = 0.0  # subtracted from the reward of a completion that reached max_new_tokens without a stop token
    c.online.pair_rule = "best_worst"  # best_worst: highest vs lowest reward of the K | random: two of the K | all_pairs: every two of the K that differ by more than tie_margin
    c.online.tie_margin = 0.0  # a pair whose rewards differ by <= this is a tie: dropped and counted
    c.online.reference = "initial"  # the reference policy: initial (the starting policy, fixed) | previous_round (the policy at the start of each round)
    c.online.train_on = "current_round"  # current_round: this round's pairs | all_rounds: every pair so far
    c.online.epochs = 1  # passes over the training pairs per round
    c.online.checkpoint_rounds = 1  # save a checkpoint after every N-th round and the last (a crash retrains the rounds since from their files)
    c.online.eval_prompts = 32  # prompts held out of data.train (data.eval when set) whose mean reward is eval/reward_mean (0 = no eval)
    c.online.eval_reward_function = ""  # the reward of eval/reward_mean ("" = the training reward); same syntax as reward_function
    c.online.bootstrap = "none"  # none | synthetic: first train an SFT policy and a reward model on the synthetic task (the online quickstart)
    c.online.bootstrap_sft_steps = 100  # bootstrap: SFT steps on completions of mixed quality
    c.online.bootstrap_reward_model_steps = 100  # bootstrap: Bradley-Terry reward-model steps on the task's pairs
    c.online.bootstrap_learning_rate = 1e-3  # bootstrap: peak learning rate of both stages

    c.mesh = parallel.mesh_config()  # device mesh axes data, fsdp, tensor (see jaxalign.parallel)
    c.distributed = parallel.distributed_config()  # multi-host start-up (see jaxalign.parallel)

    c.checkpoint = ml_collections.ConfigDict()  # checkpoint retention and the final export
    c.checkpoint.keep = 3  # keep the last N checkpoints
    c.checkpoint.keep_best = ""  # also keep the best checkpoint by this eval metric ("" = off)
    c.checkpoint.best_mode = "min"  # min | max for keep_best
    c.checkpoint.async_save = True  # write checkpoints in a background thread
    c.checkpoint.export = True  # write a Hugging Face checkpoint to WORKDIR/export at the end

    c.eval = ml_collections.ConfigDict()  # held-out evaluation
    c.eval.batch_size = 8  # pairs per eval batch
    c.eval.max_batches = 0  # cap on eval batches per evaluation (0 = all held-out pairs)
    c.eval.at_start = True  # evaluate before the first step (the starting point of the curves)

    c.profile = ml_collections.ConfigDict()  # a jax.profiler trace of a few steps, in WORKDIR/profile (process 0)
    c.profile.steps = 0  # optimizer steps to trace (0 = no trace)
    c.profile.skip_steps = 2  # steps this process runs before the trace starts (the first ones compile)

    c.debug = ml_collections.ConfigDict()  # TEST HOOKS for the fault-tolerance tests: leave empty in real runs
    c.debug.nan_at_steps = ()  # TEST HOOK: optimizer steps (1-based) whose gradients are replaced by NaN in the step
    c.debug.kill_at = ""  # TEST HOOK: "ROUND:PHASE" (sample | score | train): an online run SIGKILLs itself there

    c.lock()
    return c


def preference_recipe(loss_name: str) -> ml_collections.ConfigDict:
    """``base_config()`` with the settings the pairwise recipes (configs/dpo.py, ...) share.

    TRL's DPOConfig defaults where they exist: AdamW at 1e-6 with warmup and cosine decay,
    sequences up to 1024 tokens (prompts up to 512), 64 pairs per step in micro-batches of 8,
    a frozen reference, the best checkpoint kept by eval loss; bfloat16 compute with float32
    master weights and float32 log-probs (TRL's default is bfloat16 autocast). Pairs are packed
    into rows (about 2x the pairs/s of padded rows on HH-RLHF, docs/performance.md).
    """
    c = base_config()
    c.steps = 1000
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 500
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.buckets = (256, 512, 1024)
    c.data.batch_size = 64
    c.data.micro_batch_size = 8
    c.data.packing = True
    c.model.dtype = "bfloat16"
    c.loss.name = loss_name
    c.loss.beta = 0.1
    c.reference.mode = "frozen"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.checkpoint.keep_best = "eval/loss"
    return c


def online_recipe(loss_name: str) -> ml_collections.ConfigDict:
    """``base_config()`` with the settings the online recipes (configs/online_dpo.py, ...) share.

    RLHFlow's iterative DPO (docs/online.md §1): 3 rounds, K = 4 samples per prompt at
    temperature 1, best vs worst pairs, the reference fixed at the initial policy, AdamW at
    5e-7 with cosine decay, 2 epochs over each round's pairs; bfloat16 compute; pairs packed into
    rows (completions vary in length: padded rows would be mostly padding). The reference
    log-probs are computed once per round over the round's samples (``precomputed``).
    """
    c = base_config()
    c.log_every = 10
    c.checkpoint_every = 100
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.buckets = (256, 512, 1024)
    c.data.batch_size = 64
    c.data.micro_batch_size = 8
    c.data.packing = True
    c.model.dtype = "bfloat16"
    c.loss.name = loss_name
    c.loss.beta = 0.1
    c.reference.mode = "precomputed"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 10
    c.optimizer.schedule = "cosine"
    c.online.rounds = 3
    c.online.prompts_per_round = 1024
    c.online.samples_per_prompt = 4
    c.online.max_new_tokens = 512
    c.online.temperature = 1.0
    c.online.sample_batch_size = 32
    c.online.epochs = 2
    c.online.eval_prompts = 64
    return c


def distill_recipe(loss_name: str) -> ml_collections.ConfigDict:
    """``base_config()`` with the settings of the ADPA paper's released student recipes
    (docs/losses.md section 5; student_dckd.yaml, student_adpa.yaml): AdamW at 5e-7, cosine with
    10% warmup, 32 pairs per step, one epoch, sequences up to 1024 tokens, bfloat16 compute, no
    reference model (the teachers' signals are cached before training)."""
    c = base_config()
    c.steps = 0
    c.epochs = 1.0
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 500
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.buckets = (256, 512, 1024)
    c.data.batch_size = 32
    c.data.micro_batch_size = 8
    c.model.dtype = "bfloat16"
    c.loss.name = loss_name
    c.reference.mode = "none"
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 10
    c.optimizer.schedule = "cosine"
    return c


# Fields with a closed set of values.
ALLOWED: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "lora.base_dtype": ("", "float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),
    "model.lm_head": ("scored", "all"),
    "model.scan_layers": ("auto", "on", "off"),
    "model.tiny.family": ("llama", "gpt2"),
    "data.format": ("auto", "standard", "conversational", "implicit", "dove", "sft"),
    "data.on_bad_record": ("error", "skip"),
    "loss.name": (
        "dpo", "ipo", "hinge", "rdpo", "vpo", "dove", "sft", "bradley_terry", "dckd", "adpa",
    ),
    "loss.vpo_mode": ("offline", "online"),
    "loss.vpo_calibration": ("chosen", "reference_samples"),
    "reference.mode": ("frozen", "precomputed", "none"),
    "optimizer.name": ("adamw", "sgd", "adafactor"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "checkpoint.best_mode": ("min", "max"),
    "online.pair_rule": ("best_worst", "random", "all_pairs"),
    "online.reference": ("initial", "previous_round"),
    "online.train_on": ("current_round", "all_rounds"),
    "online.bootstrap": ("none", "synthetic"),
    "distill.pipeline": ("none", "adpa_plus", "quickstart"),
}

# Numeric ranges: key -> (low, high, low included, high included); None = unbounded.
_AT_LEAST_1 = (1, None, True, False)
_AT_LEAST_0 = (0, None, True, False)
_ABOVE_0 = (0, None, False, False)
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    **dict.fromkeys((
        "log_every", "data.batch_size", "data.max_length", "data.max_prompt_length", "data.synthetic_pairs",
        "eval.batch_size", "checkpoint.keep", "loss.vpo_max_new_tokens", "model.tiny.hidden_size",
        "model.tiny.num_layers", "model.tiny.num_heads", "model.tiny.num_kv_heads", "model.tiny.intermediate_size",
        "model.tiny.vocab_size", "distributed.initialization_timeout", "distributed.heartbeat_timeout",
        "online.prompts_per_round", "online.samples_per_prompt", "online.max_new_tokens", "online.sample_batch_size",
        "online.epochs", "online.checkpoint_rounds", "online.bootstrap_sft_steps", "online.bootstrap_reward_model_steps", "distill.top_k",
        "distill.max_new_tokens",
    ), _AT_LEAST_1),
    **dict.fromkeys((
        "steps", "epochs", "eval_every", "checkpoint_every", "max_consecutive_nonfinite", "peak_flops_per_device",
        "data.micro_batch_size", "data.pack_rows", "data.eval_pairs", "eval.max_batches", "model.logits_chunk",
        "model.query_block", "reference.cache_batch_size", "profile.steps", "profile.skip_steps",
        "optimizer.warmup_steps", "optimizer.max_grad_norm", "optimizer.weight_decay", "loss.vpo_alpha",
        "loss.reward_margin", "distributed.num_processes", "online.rounds", "online.temperature", "online.top_k",
        "online.missing_eos_penalty", "online.tie_margin", "online.eval_prompts", "distill.sft_weight",
        "distill.chosen_kl_weight", "distill.rejected_kl_weight", "distill.adpa_weight", "lora.rank",
    ), _AT_LEAST_0),
    **dict.fromkeys(("optimizer.learning_rate", "optimizer.eps", "loss.beta", "online.bootstrap_learning_rate",
                     "lora.alpha"),
                    _ABOVE_0),
    "online.top_p": (0, 1, False, True),
    "optimizer.end_factor": (0, 1, True, True),
    **dict.fromkeys(("optimizer.b1", "optimizer.b2", "optimizer.momentum"), (0, 1, True, False)),
    **dict.fromkeys(("loss.epsilon", "loss.label_smoothing"), (0, 0.5, True, False)),
    "distributed.process_id": (-1, None, True, False),
}


def allowed_text(values: tuple[str, ...]) -> str:
    """``a, b, c``: a closed set of values in words (the empty string as ``""``)."""
    return ", ".join(v or '""' for v in values)


def range_text(bounds: tuple[float | None, float | None, bool, bool]) -> str:
    """``>= 1``, ``> 0``, ``in [0, 0.5)``, ...: the allowed range in words."""
    low, high, low_in, high_in = bounds
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _in_range(value: float, bounds: tuple[float | None, float | None, bool, bool]) -> bool:
    low, high, low_in, high_in = bounds
    above = low is None or (value >= low if low_in else value > low)
    below = high is None or (value <= high if high_in else value < high)
    return above and below


def config_comments() -> dict[str, str]:
    """``{"a.b": comment}``: the comment beside each field's default in ``base_config`` (and in
    the mesh and distributed sections of ``jaxalign.parallel``)."""
    import inspect
    import re

    from jaxalign.parallel import distributed, mesh

    out = {}
    for match in re.finditer(r"^\s*c\.([\w.]+) = .*?  # (.*)$", inspect.getsource(base_config), re.M):
        out[match[1]] = match[2]
    for section, fn in (("mesh", mesh.mesh_config), ("distributed", distributed.distributed_config)):
        for match in re.finditer(r'^\s*"(\w+)": .*?,  # (.*)$', inspect.getsource(fn), re.M):
            out[f"{section}.{match[1]}"] = match[2]
    return out


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of ``config`` as ``key = value  # comment``, one a line, in order."""
    comments = config_comments()
    return "\n".join(f"{key} = {value!r}" + (f"  # {comments[key]}" if key in comments else "")
                     for key, value in flatten(config).items())


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of a nested config."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, Mapping)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def close_matches(name: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Up to ``n`` candidates close to ``name`` (whole dotted path, then its last part)."""
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not found:
        last = name.rsplit(".", 1)[-1]
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        found = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=n, cutoff=0.6)]
    return found


def _unknown_key_message(name: str, known: list[str]) -> str:
    matches = close_matches(name, known)
    hint = f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
    return f"unknown config key {name!r}{hint}"


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def _iter_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    schema = flatten(base_config())
    values = flatten(config)
    known = list(schema)
    for name, value in values.items():
        if name not in schema:
            yield _unknown_key_message(name, known)
            continue
        default = schema[name]
        if not _type_ok(value, default):
            yield f"config key {name!r} must be of type {type(default).__name__}, got {value!r}"
            continue
        if name in ALLOWED and value not in ALLOWED[name]:
            allowed = allowed_text(ALLOWED[name])
            matches = difflib.get_close_matches(str(value), ALLOWED[name], n=1)
            hint = f" (did you mean {matches[0]!r}?)" if matches else ""
            yield f"config key {name!r} = {value!r} is not allowed{hint}; allowed: {allowed}"
    missing = [name for name in schema if name not in values]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        yield f"{len(missing)} config key(s) missing ({shown}): recipes must start from base_config()"
        return
    get = values.get
    for name, bounds in RANGES.items():
        value = get(name)
        if isinstance(value, (int, float)) and not _in_range(value, bounds):
            yield f"config key {name!r} must be {range_text(bounds)}, got {value!r}"
    try:
        mesh_config_dict({axis: get(f"mesh.{axis}") for axis in parallel.MESH_AXES})
    except ValueError as e:  # "mesh config: mesh.data must be ...": the key first
        name, rest = str(e).removeprefix("mesh config: ").split(" ", 1)
        yield f"config key {name!r} {rest}"
    batch, micro = get("data.batch_size"), get("data.micro_batch_size")
    if isinstance(batch, int) and isinstance(micro, int) and micro > 0 and batch % micro:
        yield (
            f"config key 'data.batch_size' = {batch} must be a multiple of "
            f"'data.micro_batch_size' = {micro}"
        )
    if get("steps") == 0 and not get("epochs"):
        yield "config keys 'steps' and 'epochs' are both 0: set one of them"
    if get("data.max_prompt_length", 0) >= get("data.max_length", 1):
        yield (
            f"config key 'data.max_prompt_length' = {get('data.max_prompt_length')} must be "
            f"smaller than 'data.max_length' = {get('data.max_length')}"
        )
    if os.path.isfile(get("data.cache_dir", "")):
        yield f"config key 'data.cache_dir' = {get('data.cache_dir')!r} is a file: name a directory, or \"none\""
    nan_steps = get("debug.nan_at_steps")
    if isinstance(nan_steps, (list, tuple)) and not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in nan_steps
    ):
        yield f"config key 'debug.nan_at_steps' must hold optimizer steps (ints >= 1), got {tuple(nan_steps)!r}"
    if get("online.rounds"):
        yield from _online_problems(get)
    if get("loss.name") in DISTILL_LOSSES:
        yield from _distill_problems(get)
    if get("lora.rank"):
        yield from _lora_problems(get)
    else:
        for key in ("lora.adapter", "lora.base_dtype"):
            if get(key):
                yield f"config key {key!r} needs --config.lora.rank > 0 (it only applies to LoRA runs)"
    if not get("data.train"):
        yield "config key 'data.train' is empty: name the training data"
    if not get("model.path"):
        yield "config key 'model.path' is empty: name a Hugging Face checkpoint directory"


ONLINE_LOSSES = ("dpo", "ipo", "hinge", "rdpo", "vpo")  # the pairwise losses the online driver trains


def _online_problems(get: Any) -> Iterator[str]:
    """The cross-field rules of an online run (``online.rounds > 0``)."""
    if get("loss.name") not in ONLINE_LOSSES:
        yield (f"config key 'loss.name' = {get('loss.name')!r} cannot train online rounds; online losses: "
               f"{', '.join(ONLINE_LOSSES)}")
    if get("loss.name") == "vpo" and (get("loss.vpo_mode"), get("loss.vpo_calibration")) != ("online", "reference_samples"):
        yield ("online VPO samples its calibration responses from the reference policy: set "
               "--config.loss.vpo_mode=online --config.loss.vpo_calibration=reference_samples")
    scorers = [f for f in get("online.reward_function").split(",") if f.strip()]
    has_model = bool(get("online.reward_model")) or get("online.bootstrap") == "synthetic"
    if not scorers and not has_model:
        yield ("an online run needs a reward: set --config.online.reward_function=module:function (or "
               "path/to/file.py:function) and/or --config.online.reward_model=PATH")
    weights = get("online.reward_weights")
    count = len(scorers) + has_model
    if weights and len(weights) != count:
        yield (f"config key 'online.reward_weights' has {len(weights)} weight(s) for {count} reward(s) (the reward "
               "model first, then each function)")
    if get("online.samples_per_prompt") < 2:
        yield "config key 'online.samples_per_prompt' must be >= 2 in an online run: a pair needs two completions"
    if get("online.max_new_tokens") + get("data.max_prompt_length") > get("data.max_length"):
        yield (f"online.max_new_tokens ({get('online.max_new_tokens')}) + data.max_prompt_length "
               f"({get('data.max_prompt_length')}) must be <= data.max_length ({get('data.max_length')}): a sampled "
               "pair must fit the training rows")


DISTILL_LOSSES = ("dckd", "adpa")  # the losses that distil a teacher (config group ``distill``)


def _distill_problems(get: Any) -> Iterator[str]:
    """The cross-field rules of a distillation run (``loss.name`` dckd | adpa)."""
    if not get("distill.teacher"):
        yield (f"config key 'distill.teacher' is empty: loss.name = {get('loss.name')!r} distils from a teacher; set "
               "--config.distill.teacher=PATH (an HF checkpoint or jaxalign run directory sharing the student's "
               "tokenizer)")
    if get("loss.name") == "adpa" and not get("distill.teacher_reference"):
        yield ("config key 'distill.teacher_reference' is empty: ADPA's advantages need the teacher's reference; set "
               "--config.distill.teacher_reference=PATH (the teacher's SFT checkpoint)")


# Projections that may carry LoRA adapters (config key ``lora.targets``): Llama family, then GPT-2.
ALLOWED_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "c_attn", "c_proj", "c_fc")


def _lora_problems(get: Any) -> Iterator[str]:
    """The rules of a LoRA run (``lora.rank > 0``)."""
    targets = get("lora.targets")
    if not targets:
        yield "config key 'lora.targets' is empty: name the projections that get adapters"
    for target in targets or ():
        if target not in ALLOWED_LORA_TARGETS:
            matches = difflib.get_close_matches(str(target), ALLOWED_LORA_TARGETS, n=1)
            hint = f" (did you mean {matches[0]!r}?)" if matches else ""
            yield (f"config key 'lora.targets' holds unknown projection {target!r}{hint}; allowed: "
                   f"{', '.join(ALLOWED_LORA_TARGETS)}")
    if get("lora.adapter") and get("distill.pipeline") == "quickstart":
        yield "config key 'lora.adapter' is not used by distill.pipeline = 'quickstart' (it trains its own models)"
    if get("reference.path"):
        yield ("config key 'reference.path' must be empty with LoRA: the reference is the base model with the "
               "adapters switched off")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ``ConfigError`` listing every problem; returns the config when it is valid."""
    problems = list(_iter_problems(config))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def micro_batch_size(config: ml_collections.ConfigDict) -> int:
    """Pairs per micro-batch (``data.micro_batch_size``, or the whole batch when 0)."""
    return config.data.micro_batch_size or config.data.batch_size


def grad_accum_steps(config: ml_collections.ConfigDict) -> int:
    """Micro-batches per optimizer step."""
    return config.data.batch_size // micro_batch_size(config)


def config_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: tuple[str, ...] = ()
) -> list[str]:
    """Dotted keys whose values differ between two flattened configs (missing counts as differing)."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k not in ignore and saved.get(k, object()) != current.get(k, object())]
