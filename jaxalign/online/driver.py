"""The online driver: rounds of sample -> score -> pair -> train in one resumable program.

``train(config, workdir)`` (``python -m jaxalign.train`` with ``online.rounds > 0``) builds the
run from the trainer's builders (``jaxalign.train.build``) and then, for round ``r = 1..R``:

1. **sample** ``K`` completions of each of the round's ``M`` prompts (``jaxalign.online.prompts``)
   from the train state's own parameters (``jaxalign.sampling.sample``; sample ``s`` of the
   prompt at stream position ``i`` is seeded by ``(seed, i, s)``);
2. **score** them (``jaxalign.online.rewards``: reward functions, a reward model, their
   weighted sum, the missing-EOS penalty);
3. **pair** them (``jaxalign.online.pairs``; ties dropped and counted);
4. **reference**: the reference log-probs of every sampled sequence (and of the training
   pairs of earlier rounds, and of VPO's calibration samples, drawn from the reference once
   per prompt), computed once per round; the reference is the initial policy or the policy at
   the start of the round (``online.reference``);
5. **train** the objective on the round's pairs (or all pairs so far) for ``online.epochs``
   passes through the step runner (``jaxalign.train.runner``: metrics, checkpoints, signals,
   the non-finite guard);
6. **evaluate**: the mean reward of the policy's completions on the held-out prompts
   (``eval/reward_mean``; also before round 1, as round 0), and write the round's metrics.

Each phase's outputs go to ``WORKDIR/rounds/NNNN/`` (``jaxalign.online.rounds``) before the
next phase starts, and the checkpoints' metadata holds the round and the pair loader's
position: rerunning the same command after a crash at any point redoes only the unfinished
phase, with the same seeds, and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import models, parallel
from jaxalign.caches.calibration import attach_samples
from jaxalign.caches.fingerprint import host_array
from jaxalign.caches.reference import ReferenceCache
from jaxalign.data.batching import bucket_ladder, stack_micro_batches
from jaxalign.data.dataset import DataReport, EncodedDataset
from jaxalign.data.encoding import EncodedExample, EncodedPair, EncodedSequence
from jaxalign.data.flat import FlatExamples, flatten, join
from jaxalign.data.formats import KeyMap
from jaxalign.data.loader import Loader
from jaxalign.data.records import DataError
from jaxalign.data.store import ArrayStore, read_store, save_examples
from jaxalign.models.lora import adapters_off, join_adapters
from jaxalign.objectives import Objective, from_config
from jaxalign.online import pairs as pairing
from jaxalign.online.prompts import Prompt, at_positions, load_prompts, round_positions, split_eval
from jaxalign.online.rewards import ARGUMENTS, RewardError, Scorer, combine, function_scorer, parse_functions
from jaxalign.online.rounds import RoundFiles
from jaxalign.runtime.preemption import StopAgreement, StopSignals
from jaxalign.runtime.profiling import PROFILE_DIR, StepTrace
from jaxalign.sampling import FINISH_STOP, Samples, SamplingConfig, sample
from jaxalign.scoring.forward import sequence_logps_fn
from jaxalign.tokenizers import stop_ids
from jaxalign.train import build
from jaxalign.train.batches import BatchPlacer
from jaxalign.train.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxalign.train.config import grad_accum_steps, micro_batch_size, validate
from jaxalign.train.loop import RunResult, _check_resume, _write_config, export, run_directory
from jaxalign.train.metrics import MetricsLog, Progress, read_metrics
from jaxalign.train.runner import Cadence, StepRunner
from jaxalign.train.step import reference_keys

__all__ = ["train"]

RunError = build.RunError
SCORE_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask")
EVAL_SEED_OFFSET, CALIBRATION_SEED_OFFSET = 1, 2  # sampling streams of eval prompts and VPO calibration


@dataclasses.dataclass
class Round:
    """One round's samples: its prompts in stream order and their K completions each."""

    positions: np.ndarray  # [M] stream positions
    prompts: list[Prompt]  # [M]
    completions: list[list[np.ndarray]]  # [M][K] sampled ids (stop token included)
    texts: list[list[str]]  # [M][K]
    stopped: np.ndarray  # [M, K] bool
    logps: np.ndarray  # [M, K] summed log-probs under the sampling policy


@dataclasses.dataclass
class Online:
    """The assembled pieces of an online run."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    tokenizer: Any
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    prompt_summary: str
    graphdef: nnx.GraphDef
    state: Any
    initial_reference: Any  # the initial policy's parameters (online.reference = initial), else None
    base: Any  # LoRA's frozen base weights (the state holds the adapters), else None
    objective: Objective
    train_step: Any
    logps_fn: Any
    scorers: list[Scorer]
    weights: list[float]
    eval_scorers: list[Scorer]
    eval_weights: list[float]
    sampling: SamplingConfig
    pad_id: int
    bos_id: int | None
    accum: int
    is_main: bool


# -- assembly ----------------------------------------------------------------------------------


def planned_steps(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of the whole run if no pair were dropped: the learning-rate schedule's length."""
    o = config.online
    k = o.samples_per_prompt
    per_prompt = k * (k - 1) // 2 if o.pair_rule == "all_pairs" else 1
    micro, accum = micro_batch_size(config), grad_accum_steps(config)
    total = 0
    for r in range(1, o.rounds + 1):
        pairs = o.prompts_per_round * per_prompt * (r if o.train_on == "all_rounds" else 1)
        total += math.ceil(o.epochs * math.ceil(pairs / micro) / accum)
    return total


def _scorers(config: ml_collections.ConfigDict, mesh: Mesh, functions: str, reward_model: str) -> list[Scorer]:
    scorers = []
    if reward_model:
        from jaxalign.scoring.reward_model import RewardModel

        path = build.model_dir(reward_model, "online.reward_model")
        try:
            model = RewardModel.load(path, mesh=mesh, dtype=config.model.dtype)
        except (OSError, ValueError, models.CheckpointError, models.UnsupportedModelError) as e:
            raise RunError(f"online.reward_model {reward_model}: {e}") from None
        scorers.append(Scorer(f"reward model {path}", lambda p, c, _: model.score(p, c)))
    try:
        scorers += [function_scorer(name) for name in parse_functions(functions)]
    except RewardError as e:
        raise RunError(str(e)) from None
    return scorers


def _prompts(config: ml_collections.ConfigDict, tokenizer: Any) -> tuple[list[Prompt], list[Prompt], str]:
    d = config.data
    keys = KeyMap(d.prompt_key, d.chosen_key, d.rejected_key)
    load = lambda spec: load_prompts(spec, tokenizer, max_prompt_length=d.max_prompt_length, keys=keys,  # noqa: E731
                                     on_bad_record=d.on_bad_record)
    try:
        train_set = load(d.train)
        if d.eval:
            eval_set = load(d.eval)
            train, held = train_set.prompts, eval_set.prompts[: config.online.eval_prompts]
        else:
            train, held = split_eval(train_set.prompts, config.online.eval_prompts, config.seed)
    except DataError as e:
        raise RunError(f"data: {e}\n(to skip such rows and count them instead, set "
                       "--config.data.on_bad_record=skip)") from None
    except ValueError as e:
        raise RunError(f"data: {e}") from None
    clash = sorted({c for p in train + held for c in p.metadata} & set(ARGUMENTS))
    if clash:
        raise RunError(f"data: the prompt rows' column(s) {clash} would pass to the reward function under the name "
                       f"of its own argument(s) ({', '.join(ARGUMENTS)}); rename the column(s)")
    return train, held, f"{train_set.summary()}; {len(train)} for training, {len(held)} held out for eval"


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Online:
    """Assembles an online run from a validated config (see the module docstring)."""
    validate(config)
    parallel.initialize_distributed(config.distributed)
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    o = config.online
    mesh = build.build_mesh(config.mesh)
    config = build.resolve_inputs(config, workdir, is_main)
    if o.prompts_per_round % jax.process_count() or o.sample_batch_size % jax.process_count():
        raise RunError(f"online.prompts_per_round ({o.prompts_per_round}) and online.sample_batch_size "
                       f"({o.sample_batch_size}) must be multiples of the {jax.process_count()} processes")
    tokenizer = build.build_tokenizer(config)
    train_prompts, eval_prompts, summary = _prompts(config, tokenizer)
    mode = "none" if config.reference.mode == "none" else "precomputed"
    objective = from_config(config.loss, mode, config.distill)
    policy = build.build_policy(config, mesh, objective)
    trainable, base = build.trainable(config, policy)
    initial = None
    if objective.uses_reference and o.reference == "initial":
        initial = (adapters_off(base, trainable["model"]) if base is not None
                   else build.build_reference(config, mesh, policy).params)
    steps = planned_steps(config)
    state, shardings, optimizer, schedule = build.build_state(config, trainable, mesh, steps)
    train_step = build.build_steps(config, mesh, objective, policy=policy.graphdef, reference=None,
                                   optimizer=optimizer, schedule=schedule, state_shardings=shardings).train
    scorers = _scorers(config, mesh, o.reward_function, o.reward_model)
    weights = list(o.reward_weights) or [1.0] * len(scorers)
    eval_scorers, eval_weights = scorers, weights
    if o.eval_reward_function:
        eval_scorers = _scorers(config, mesh, o.eval_reward_function, "")
        eval_weights = [1.0] * len(eval_scorers)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = SamplingConfig(
        max_new_tokens=o.max_new_tokens, num_samples=o.samples_per_prompt, temperature=o.temperature, top_p=o.top_p,
        top_k=o.top_k, seed=config.seed, stop_ids=stop_ids(tokenizer, config.model.path), pad_id=int(pad),
        batch_size=o.sample_batch_size, buckets=bucket_ladder(config.data.max_prompt_length),
    )
    return Online(
        config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, train_prompts=train_prompts,
        eval_prompts=eval_prompts, prompt_summary=summary, graphdef=policy.graphdef, state=state,
        initial_reference=initial, base=base, objective=objective, train_step=train_step,
        logps_fn=sequence_logps_fn(build.forward_for(config, policy.graphdef, mesh), 1), scorers=scorers,
        weights=weights, eval_scorers=eval_scorers, eval_weights=eval_weights, sampling=sampling, pad_id=int(pad),
        bos_id=tokenizer.bos_token_id, accum=grad_accum_steps(config), is_main=is_main,
    )


# -- phases ------------------------------------------------------------------------------------


def model_params(run: Online, params: Any) -> Any:
    """The policy model's parameters from the train state's: with LoRA, its adapters joined to the base (no copy)."""
    return params["model"] if run.base is None else join_adapters(run.base, params["model"])


def _kill_point(run: Online, round_index: int, phase: str) -> None:
    """TEST HOOK (``debug.kill_at = "ROUND:PHASE"``): SIGKILL this process there."""
    if run.config.debug.kill_at == f"{round_index}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def _gather(value: np.ndarray) -> np.ndarray:
    """Every process's rows, in stream order (process ``q`` holds positions ``q, q+C, ...``)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    stacked = np.asarray(multihost_utils.process_allgather(value))  # [C, m, ...]
    return np.swapaxes(stacked, 0, 1).reshape(-1, *value.shape[1:])


def _decode(tokenizer: Any, ids: np.ndarray, stopped: bool) -> str:
    return tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)


def _generate(run: Online, params: Any, prompts: list[Prompt], indices: np.ndarray, config: SamplingConfig,
              desc: str, on_progress: Any = None) -> tuple[Samples, float, int]:
    """``(samples of all processes, seconds, tokens)``: process ``q`` of ``C`` samples rows
    ``q::C`` (the list padded with copies of its last prompt to a multiple of ``C``, their
    samples dropped), then the rows are gathered."""
    from tqdm.auto import tqdm

    q, c, n = jax.process_index(), jax.process_count(), len(prompts)
    padded = prompts + prompts[-1:] * (-n % c)
    indices = np.concatenate([indices, np.repeat(indices[-1:], -n % c)])
    local = padded[q::c]
    bar = tqdm(total=len(local), unit="prompt", desc=desc, dynamic_ncols=True,
               disable=not (run.is_main and run.config.progress_bar))
    start, generated = time.perf_counter(), 0

    def progress(done: int, tokens: int) -> None:
        nonlocal generated
        generated += tokens
        bar.set_postfix(tokens_per_s=f"{generated / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
        bar.update(done - bar.n)
        if on_progress is not None:
            on_progress()

    try:
        out = sample(run.graphdef, params, [p.ids for p in local], config, mesh=run.mesh,
                     prompt_indices=indices[q::c], progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    out = Samples(*(_gather(x)[:n] for x in out))
    return out, seconds, int(out.mask.sum())


def _round_from_samples(run: Online, positions: np.ndarray, prompts: list[Prompt], out: Samples) -> Round:
    completions, texts = [], []
    stopped = out.finish == FINISH_STOP
    for m in range(len(prompts)):
        ids = [out.tokens[m, s][out.mask[m, s] == 1].astype(np.int32) for s in range(out.tokens.shape[1])]
        completions.append(ids)
        texts.append([_decode(run.tokenizer, x, bool(stopped[m, s])) for s, x in enumerate(ids)])
    logps = (out.logps * out.mask).sum(-1, dtype=np.float64)
    return Round(positions, prompts, completions, texts, stopped, logps)


def _sample_round(run: Online, files: RoundFiles, state: Any) -> tuple[Round, dict[str, float]]:
    """The round's samples: read from ``samples.jsonl``, or sampled and written there."""
    positions = round_positions(files.index, run.config.online.prompts_per_round)
    prompts = [run.train_prompts[i] for i in at_positions(positions, len(run.train_prompts), run.config.seed)]
    if files.has("samples.jsonl"):
        lines = files.read("samples.jsonl")
        return Round(
            positions, prompts, [[np.asarray(x, np.int32) for x in line["completion_ids"]] for line in lines],
            [line["completions"] for line in lines],
            np.asarray([[r == "stop" for r in line["finish_reasons"]] for line in lines]),
            np.asarray([line["logps"] for line in lines], np.float64),
        ), {k: v for k, v in files.timings().items() if k in ("time/generate_s", "sampling/tokens_per_s")}
    first = [True]

    def kill_after_first_call() -> None:
        if first[0]:
            first[0] = False
            _kill_point(run, files.index, "sample")

    out, seconds, tokens = _generate(run, model_params(run, state.params), prompts, positions, run.sampling,
                                     f"round {files.index}: sampling", kill_after_first_call)
    samples = _round_from_samples(run, positions, prompts, out)
    if run.is_main:
        files.write("samples.jsonl", [
            {"position": int(pos), "prompt_index": p.index, "prompt": p.text, "completions": samples.texts[m],
             "completion_ids": [x.tolist() for x in samples.completions[m]],
             "finish_reasons": ["stop" if s else "length" for s in samples.stopped[m]],
             "logps": samples.logps[m].tolist()}
            for m, (pos, p) in enumerate(zip(positions, prompts))
        ])
    timings = {"time/generate_s": seconds, "sampling/tokens_per_s": tokens / max(seconds, 1e-9)}
    if run.is_main:
        files.add_timings(timings)
    parallel.barrier(f"samples-{files.index}")
    return samples, timings


def _score(scorers: list[Scorer], weights: list[float], samples: Round, missing_eos_penalty: float,
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(combined rewards [M, K], each scorer's raw values [M, K])``."""
    m, k = samples.stopped.shape
    prompts = [p.text for p in samples.prompts for _ in range(k)]
    completions = [t for texts in samples.texts for t in texts]
    columns = sorted({key for p in samples.prompts for key in p.metadata})
    metadata = {
        "completion_ids": [x.tolist() for ids in samples.completions for x in ids],
        "stopped": samples.stopped.reshape(-1).tolist(),
        "prompt_index": [p.index for p in samples.prompts for _ in range(k)],
        **{c: [p.metadata.get(c) for p in samples.prompts for _ in range(k)] for c in columns},
    }
    components = {s.name: np.asarray(s.score(prompts, completions, metadata), np.float64) for s in scorers}
    total = combine(list(components.values()), weights, samples.stopped.reshape(-1), missing_eos_penalty)
    return total.reshape(m, k), {name: v.reshape(m, k) for name, v in components.items()}


def _score_round(run: Online, files: RoundFiles, samples: Round) -> tuple[np.ndarray, dict[str, float]]:
    if files.has("rewards.jsonl"):
        return (np.asarray([line["rewards"] for line in files.read("rewards.jsonl")], np.float64),
                {k: v for k, v in files.timings().items() if k == "time/score_s"})
    start = time.perf_counter()
    try:
        rewards, components = _score(run.scorers, run.weights, samples, run.config.online.missing_eos_penalty)
    except RewardError as e:
        raise RunError(f"round {files.index}: {e}\n(the round's generations are kept in "
                       f"{files.path('samples.jsonl')}; rerunning the command scores them again)", exit_code=1) from None
    _kill_point(run, files.index, "score")
    if run.is_main:
        files.write("rewards.jsonl", [
            {"position": int(pos), "rewards": rewards[m].tolist(),
             "components": {name: v[m].tolist() for name, v in components.items()}}
            for m, pos in enumerate(samples.positions)
        ])
    timings = {"time/score_s": time.perf_counter() - start}
    if run.is_main:
        files.add_timings(timings)
    parallel.barrier(f"rewards-{files.index}")
    return rewards, timings


def _pair_round(run: Online, files: RoundFiles, samples: Round, rewards: np.ndarray) -> pairing.Pairing:
    o = run.config.online
    result = pairing.make_pairs(rewards, rule=o.pair_rule, tie_margin=o.tie_margin, seed=run.config.seed,
                                round_index=files.index, positions=samples.positions)
    if run.is_main and not files.has("pairs.jsonl"):
        files.write("pairs.jsonl", [
            {"position": int(samples.positions[m]), "prompt": samples.prompts[m].text,
             "chosen": samples.texts[m][c], "rejected": samples.texts[m][r], "chosen_reward": rewards[m, c],
             "rejected_reward": rewards[m, r], "chosen_sample": c, "rejected_sample": r}
            for m, c, r in result.pairs
        ])
    return result


# -- reference log-probs and the training examples ---------------------------------------------


def _sequence(run: Online, prompt: np.ndarray, completion: np.ndarray) -> EncodedSequence:
    return EncodedSequence(ids=np.concatenate([prompt, completion]).astype(np.int32), prompt_len=len(prompt),
                           has_bos=run.bos_id is not None and int(prompt[0]) == run.bos_id)


def sequence_logps(run: Online, params: Any, sequences: list[EncodedSequence]) -> np.ndarray:
    """Summed completion log-probs ``[N]`` of ``sequences`` under ``params`` (one forward pass
    over the mesh, in the training layout: packed rows with ``data.packing``, else batches of
    similar lengths)."""
    shard = parallel.data_shard(run.mesh)
    multiple = math.lcm(shard.count, build.batch_devices(run.mesh))
    batch = multiple * math.ceil(max(run.config.data.batch_size, 16) / multiple)
    d = run.config.data
    examples = sorted((EncodedExample(s, i) for i, s in enumerate(sequences)), key=lambda e: len(e.sequence))
    loader = Loader(EncodedDataset(examples, DataReport()), batch_size=batch, pad_id=run.pad_id, shuffle=False,
                    num_epochs=1, buckets=tuple(d.buckets), packing=d.packing,
                    pack_length=max(d.buckets) if d.packing else None,
                    row_multiple=max(1, build.batch_devices(run.mesh) // shard.count), shard_index=shard.index,
                    shard_count=shard.count)
    out = np.full(len(sequences), np.nan)
    for host in loader:
        sums = host_array(run.logps_fn(params, parallel.global_batch({k: host[k] for k in SCORE_KEYS}, run.mesh)))
        index = parallel.gathered_rows(np.asarray(host["example_index"]))
        out[index[index >= 0]] = sums[index >= 0]
    return out


def _calibration(run: Online, files: RoundFiles, prompts: list[Prompt], reference: Any) -> dict[int, np.ndarray]:
    """VPO's calibration sample of each of ``prompts`` (by prompt index): sampled from the
    reference once per prompt (seeded by the prompt's index); with a fixed reference, reused
    from earlier rounds."""
    if files.has("calibration.jsonl"):
        return {line["prompt_index"]: np.asarray(line["completion_ids"], np.int32)
                for line in files.read("calibration.jsonl")}
    known: dict[int, np.ndarray] = {}
    if run.config.online.reference == "initial":
        for r in range(1, files.index):
            earlier = RoundFiles(run.workdir, r)
            if earlier.has("calibration.jsonl"):
                known.update({line["prompt_index"]: np.asarray(line["completion_ids"], np.int32)
                              for line in earlier.read("calibration.jsonl")})
    by_index = {p.index: p for p in prompts}
    needed = sorted(set(by_index) - set(known))
    if needed:
        config = dataclasses.replace(run.sampling, num_samples=1, temperature=1.0, top_p=1.0, top_k=0,
                                     seed=run.config.seed + CALIBRATION_SEED_OFFSET)
        out, _, _ = _generate(run, reference, [by_index[i] for i in needed], np.asarray(needed), config,
                              f"round {files.index}: VPO calibration samples")
        for row, i in enumerate(needed):
            known[i] = out.tokens[row, 0][out.mask[row, 0] == 1].astype(np.int32)
    mine = {i: known[i] for i in sorted(by_index)}
    if run.is_main:
        files.write("calibration.jsonl", [{"prompt_index": i, "completion_ids": ids.tolist()} for i, ids in mine.items()])
    return mine


def _round_pairs(run: Online, files: RoundFiles, build: Callable[[], list[EncodedPair]]) -> FlatExamples:
    """The round's pairs as flat examples (index = the prompt's index), kept in the round's
    ``pairs/`` store: read from it, or ``build()`` and written there (process 0)."""
    path = files.path("pairs")
    if ArrayStore(path).exists():
        return read_store(path)[0]
    pairs = flatten(build(), 2)
    if run.is_main:
        save_examples(path, pairs)
    return pairs


def _encoded_pairs(run: Online, samples: Round, pairs: list[tuple[int, int, int]]) -> list[EncodedPair]:
    """``(prompt row, chosen, rejected)`` of ``samples`` as encoded pairs indexed by prompt."""
    return [EncodedPair(_sequence(run, samples.prompts[m].ids, samples.completions[m][c]),
                        _sequence(run, samples.prompts[m].ids, samples.completions[m][r]), samples.prompts[m].index)
            for m, c, r in pairs]


def _earlier_pairs(run: Online, r: int) -> FlatExamples | None:
    """Round ``r``'s pairs (from its store; a run directory written before the store existed:
    rebuilt from the round's files), or None when the round made none."""
    files = RoundFiles(run.workdir, r)
    if not files.has("pairs.jsonl"):
        return None

    def build() -> list[EncodedPair]:
        earlier = _sample_round(run, files, None)[0]
        row = {int(p): m for m, p in enumerate(earlier.positions)}
        return _encoded_pairs(run, earlier, [(row[line["position"]], line["chosen_sample"], line["rejected_sample"])
                                             for line in files.read("pairs.jsonl")])

    return _round_pairs(run, files, build)


def _reference_round(run: Online, files: RoundFiles, samples: Round, result: pairing.Pairing, state: Any,
                     ) -> tuple[Sequence[Any], ReferenceCache | None, np.ndarray | None]:
    """``(training examples, their reference cache, reference log-probs [M, K] of the round's
    samples)``. The training pairs are this round's, after (``all_rounds``) those of the earlier
    rounds, read memory-mapped from the rounds' ``pairs/`` stores. One forward pass of the
    reference over the round's samples, the earlier rounds' pairs and VPO's calibration
    sequences, stored in ``reference/``: computed once per round, never per epoch."""
    earlier = range(1, files.index) if run.config.online.train_on == "all_rounds" else range(0)
    parts = [p for r in earlier if (p := _earlier_pairs(run, r)) is not None]
    current = _round_pairs(run, files, lambda: _encoded_pairs(run, samples, result.pairs))
    pairs = join([*parts, current], 2)
    prompt_index = np.asarray(pairs.record_index)
    pairs = dataclasses.replace(pairs, record_index=np.arange(len(pairs), dtype=np.int64))
    reference = run.initial_reference if run.initial_reference is not None else model_params(run, state.params)
    m, k = samples.stopped.shape
    # the reference pass: the round's samples (this round's pairs are among them), the earlier pairs
    sequences = [_sequence(run, p.ids, x) for p, ids in zip(samples.prompts, samples.completions) for x in ids]
    earlier_pairs = len(pairs) - len(current)
    sequences += [seq for pair in pairs[:earlier_pairs] for seq in pair.sequences]
    columns = [[m * k + 2 * i, m * k + 2 * i + 1] for i in range(earlier_pairs)]
    columns += [[row * k + c, row * k + r] for row, c, r in result.pairs]
    vpo = run.objective.sequences_per_pair == 3
    examples: Sequence[Any] = pairs
    if vpo and len(pairs):  # one calibration sample per prompt
        by_index = {p.index: p for p in run.train_prompts}
        calibration = _calibration(run, files, [by_index[i] for i in dict.fromkeys(prompt_index.tolist())], reference)
        samples_of = [calibration[i] for i in prompt_index.tolist()]
        examples = attach_samples(pairs, samples_of)
        for i, example in enumerate(examples):
            sequences.append(example.calibration)
            columns[i].append(len(sequences) - 1)
    if not run.objective.uses_reference:
        return examples, None, None
    store = ArrayStore(files.path("reference"))
    if store.exists():
        table = np.asarray(store.read()["logps"])
    else:
        table = sequence_logps(run, reference, sequences)
        if run.is_main:
            store.write({"logps": table})
    logps = table[np.asarray(columns, np.int64).reshape(len(examples), 3 if vpo else 2)]
    cache = ReferenceCache(indices=np.arange(len(examples), dtype=np.int64), chosen=logps[:, 0], rejected=logps[:, 1],
                           calibration=logps[:, 2] if vpo else None)
    return examples, cache, table[: m * k].reshape(m, k)


# -- training ----------------------------------------------------------------------------------


def _pair_loader(run: Online, examples: list[Any], round_index: int) -> Loader:
    d = run.config.data
    shard = parallel.data_shard(run.mesh)
    try:
        return Loader(
            EncodedDataset(examples, DataReport()), batch_size=micro_batch_size(run.config), pad_id=run.pad_id,
            seed=run.config.seed + 7919 * round_index, shuffle=d.shuffle, buckets=tuple(d.buckets), packing=d.packing,
            pack_length=max(d.buckets) if d.packing else None, pack_rows=d.pack_rows or None,
            row_multiple=max(1, build.batch_devices(run.mesh) // shard.count), shard_index=shard.index,
            shard_count=shard.count,
        )
    except ValueError as e:
        raise RunError(f"round {round_index}: the pairs cannot be batched: {e} (data.buckets must cover "
                       "data.max_prompt_length + online.max_new_tokens)") from None


def _placer(run: Online, loader: Loader, cache: ReferenceCache | None) -> BatchPlacer:
    mode = "precomputed" if cache is not None else "none"
    lookups = (lambda host: cache.lookup(host["example_index"]),) if cache is not None else ()
    return build.batch_placer(run.config, run.mesh, run.objective, loader, lookups=lookups,
                              added=reference_keys(run.objective, mode))


def _train_round(run: Online, files: RoundFiles, examples: list[Any], cache: ReferenceCache | None, state: Any,
                 step: int, resume: dict[str, Any] | None, runner: StepRunner, signals: StopSignals):
    """Trains the round's steps (from ``resume``'s position inside the round when given), with
    a checkpoint at its end after every ``online.checkpoint_rounds``-th round and the last
    (written in the background while the next round samples); returns ``(outcome or None when
    there was nothing to train, seconds)``."""
    if not examples:
        return None, 0.0
    loader = _pair_loader(run, examples, files.index)
    steps = math.ceil(run.config.online.epochs * loader.batches_in_epoch(0) / run.accum)
    start = step if resume is None else resume["round_start_step"]
    end = start + steps
    if resume is not None:
        loader.set_state(resume["pair_loader"])
    if step >= end:
        return None, 0.0

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for n in range(step, end):
            if n == step + 1:
                _kill_point(run, files.index, "train")
            yield stack_micro_batches([next(loader) for _ in range(run.accum)], pad_id=loader.pad_id)

    meta = lambda s: {"round": files.index, "round_start_step": start, "round_end_step": end,  # noqa: E731
                      "pair_loader": loader.get_state(), "step": s}
    placer = _placer(run, loader, cache)
    runner = dataclasses.replace(runner, place=lambda host: placer(host, stacked=True), checkpoint_meta=meta)
    runner.progress = Progress(end, step, enabled=run.is_main and run.config.progress_bar)
    runner.progress.describe(f"round {files.index}: training")
    o = run.config.online
    t0 = time.perf_counter()
    try:
        outcome = runner.run(state, step=step, end=end, total=end, batches=batches(), signals=signals,
                             checkpoint_end=files.index % o.checkpoint_rounds == 0 or files.index == o.rounds,
                             wait=False)
    finally:
        runner.progress.close()
    return outcome, time.perf_counter() - t0


def trained_rounds(meta: dict[str, Any] | None) -> int:
    """The last round whose training a checkpoint's state holds in full (0: none)."""
    if meta is None:
        return 0
    return meta["round"] if meta["step"] >= meta["round_end_step"] else meta["round"] - 1


# -- evaluation and metrics --------------------------------------------------------------------


def _evaluate(run: Online, params: Any) -> dict[str, float]:
    """``eval/reward_mean`` (and the stop rate and length) of K completions per held-out prompt,
    sampled with the same seeds every round."""
    if not run.eval_prompts:
        return {}
    indices = np.asarray([p.index for p in run.eval_prompts], np.int64)
    config = dataclasses.replace(run.sampling, seed=run.config.seed + EVAL_SEED_OFFSET)
    out, _, _ = _generate(run, params, run.eval_prompts, indices, config, "eval: sampling")
    samples = _round_from_samples(run, indices, run.eval_prompts, out)
    try:
        rewards, _ = _score(run.eval_scorers, run.eval_weights, samples,
                            0.0 if run.config.online.eval_reward_function else run.config.online.missing_eos_penalty)
    except RewardError as e:
        raise RunError(f"eval: {e}", exit_code=1) from None
    return {"eval/reward_mean": float(rewards.mean()), "eval/stop_rate": float(samples.stopped.mean()),
            "eval/completion_length": float(np.mean([len(x) for ids in samples.completions for x in ids]))}


def _round_metrics(samples: Round, rewards: np.ndarray, result: pairing.Pairing,
                   reference: np.ndarray | None) -> dict[str, float]:
    metrics = {
        "online/reward_mean": float(rewards.mean()), "online/reward_std": float(rewards.std()),
        "online/reward_best_of_k": float(rewards.max(axis=1).mean()), "online/pairs": len(result.pairs),
        "online/ties_dropped": result.ties, "online/stop_rate": float(samples.stopped.mean()),
        "online/completion_length": float(np.mean([len(x) for ids in samples.completions for x in ids])),
    }
    if reference is not None:
        metrics["online/kl"] = float((samples.logps - reference).mean())
    return metrics


# -- the loop ----------------------------------------------------------------------------------


def _restore(checkpoints: RunCheckpoints, run: Online) -> tuple[Any, dict[str, Any] | None]:
    if not checkpoints.all_steps():
        return run.state, None
    target = abstract_like(run.state)
    run.state = None
    try:
        restored = checkpoints.restore_latest(target)
    except CheckpointError as e:
        raise RunError(f"cannot resume {run.workdir}: {e}") from None
    if restored is None:
        raise RunError(f"cannot resume {run.workdir}: its checkpoints disappeared while starting")
    return restored.state, restored.meta


def _log_rounds(log: MetricsLog, run: Online, upto: int) -> None:
    """Writes the metrics row of every complete round whose row a crash left unwritten."""
    logged = {int(e["round"]) for e in read_metrics(run.workdir) if "round" in e} if run.is_main else set()
    for r in range(upto + 1):
        summary = RoundFiles(run.workdir, r).summary()
        if summary is not None and r not in logged:
            log.write(int(summary["step"]), {k: v for k, v in summary.items() if k != "step"})


def train(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Runs (or resumes) the online run of ``config`` in ``workdir``; see the module docstring."""
    workdir = os.path.abspath(workdir)
    with run_directory(config, workdir):
        if config.online.bootstrap != "none":
            from jaxalign.online.bootstrap import bootstrap

            config = bootstrap(config, workdir)
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    c = config
    checkpoints = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep,
                                 async_save=c.checkpoint.async_save)
    if checkpoints.all_steps():
        _check_resume(workdir, config)
    run = prepare(config, workdir)
    if run.is_main:
        _write_config(workdir, config)
        print(f"prompts: {run.prompt_summary}", flush=True)
    state, meta = _restore(checkpoints, run)
    step = int(jax.device_get(state.step))
    log = MetricsLog(workdir, enabled=run.is_main, resume_step=step if meta is not None else -1)
    _log_rounds(log, run, c.online.rounds)
    trace = StepTrace(os.path.join(workdir, PROFILE_DIR), steps=c.profile.steps, skip=c.profile.skip_steps,
                      enabled=run.is_main)
    runner = StepRunner(
        train_step=run.train_step, place=None, cadence=Cadence(log_every=c.log_every, checkpoint_every=c.checkpoint_every,
                                                                max_consecutive_nonfinite=c.max_consecutive_nonfinite),
        mesh=run.mesh, checkpoints=checkpoints, log=log, progress=None, trace=trace, checkpoint_meta=None,
        reference_params=run.base,
    )
    status, message, train_metrics, last = "finished", "", {}, {}
    skipped = 0
    with StopSignals() as signals:
        agreement = StopAgreement(run.mesh)
        try:
            zero = RoundFiles(workdir, 0)
            if zero.summary() is None:
                metrics = {"round": 0, **_evaluate(run, model_params(run, state.params))}
                _finish_round(run, log, zero, step, metrics)
            last = zero.summary()
            covered = trained_rounds(meta)
            for r in range(1, c.online.rounds + 1):
                files = RoundFiles(workdir, r)
                done = files.summary()
                if done is not None and (r <= covered or done["online/pairs"] == 0):
                    last, skipped = done, int(done["online/rounds_skipped"])
                    continue
                if done is not None and run.is_main:
                    print(f"round {r}: training it again from its files (the newest checkpoint, step {step}, "
                          "predates it)", flush=True)
                if agreement.update(signals.received is not None):
                    status = "interrupted"
                    break
                resume = meta if meta is not None and meta.get("round") == r else None
                timings: dict[str, float] = {}
                samples, t = _sample_round(run, files, state)
                timings.update(t)
                rewards, t = _score_round(run, files, samples)
                timings.update(t)
                result = _pair_round(run, files, samples, rewards)
                t0 = time.perf_counter()
                examples, cache, reference = _reference_round(run, files, samples, result, state)
                timings["time/reference_s"] = time.perf_counter() - t0
                if not result.pairs:
                    skipped += 1
                    print(f"warning: round {r}: every group of {c.online.samples_per_prompt} completions tied "
                          f"(online.tie_margin = {c.online.tie_margin}): no pair, the round is skipped", file=sys.stderr,
                          flush=True)
                outcome, seconds = _train_round(run, files, examples if result.pairs else [], cache, state, step,
                                                resume, runner, signals)
                timings["time/train_s"] = seconds
                if outcome is not None:
                    state, step, train_metrics = outcome.state, outcome.step, outcome.train_metrics
                    if outcome.status != "finished":
                        status, message = outcome.status, outcome.message
                        break
                if done is None:
                    metrics = {"round": r, **_round_metrics(samples, rewards, result, reference), **timings,
                               "online/rounds_skipped": skipped, **_evaluate(run, model_params(run, state.params))}
                    _finish_round(run, log, files, step, metrics)
                last = files.summary()
            if status == "finished" and step > 0 and checkpoints.latest_step() != step:
                # the last rounds trained nothing (every pair tied) after an unsaved round: save the end
                checkpoints.save(step, state, {"round": c.online.rounds, "round_start_step": step,
                                               "round_end_step": step, "pair_loader": None, "step": step})
            checkpoints.wait()
        finally:
            trace.close()
            log.close()
    export_dir = None
    if status == "finished" and c.checkpoint.export and step > 0:
        export_dir = export(workdir, run.graphdef, state.params, run.tokenizer, lora_base=run.base,
                            lora_alpha=c.lora.alpha, base_model=c.model.path)
    checkpoints.close()
    eval_metrics = {k: v for k, v in (last or {}).items() if k.startswith("eval/")}
    return RunResult(workdir=workdir, step=step, resumed_from=None if meta is None else int(meta["step"]),
                     metrics_file=log.path, checkpoint_dir=checkpoints.directory, export_dir=export_dir,
                     train_metrics=train_metrics, eval_metrics=eval_metrics, is_main_process=run.is_main,
                     status=status, message=message)


def _finish_round(run: Online, log: MetricsLog, files: RoundFiles, step: int, metrics: dict[str, Any]) -> None:
    """The round's summary (the mark of a complete round), then its metrics row."""
    if run.is_main:
        files.write_summary({"step": step, **metrics})
        log.write(step, metrics)
    parallel.barrier(f"round-{files.index}")
