"""``python -m jaxalign.sample``: output equal to ``jaxalign.sampling.sample``, finish reasons,
run directories (newest usable checkpoint, or the export), atomic output, and one-line errors
with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import models, parallel
from jaxalign.data.encoding import Encoder
from jaxalign.data.records import PromptRecord
from jaxalign.data.batching import bucket_ladder
from jaxalign.sample.cli import main
from jaxalign.train.checkpoint import UnusableCheckpointWarning
from jaxalign.sample.load import load_policy
from jaxalign.tokenizers import stop_ids
from jaxalign.sampling import FINISH_STOP, SamplingConfig, sample
from jaxalign.tokenizers import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["Tell me about maps.", [{"role": "user", "content": "Can you describe rivers for me?"}],
           "I am curious about maps. Any thoughts?", "Say something about bridges."]


def read_jsonl(path) -> list[dict]:
    with open(os.fspath(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_output_equals_the_library(capsys, tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run_cli(capsys, "--model", tiny_model_dir, "--prompts", prompts_file, "--output", out,
                                   "--temperature", 0, "--num-samples", 2, "--max-new-tokens", 8, "--batch-size", 2)
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no temporary file left
    lines = read_jsonl(out)
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["prompt"] for line in lines] == PROMPTS  # as given, in input order
    assert "tokens_per_s=" in stderr  # the progress bar

    tokenizer = load_tokenizer(tiny_model_dir)
    mesh = parallel.make_mesh({"data": -1})
    graphdef, params = nnx.split(models.from_pretrained(tiny_model_dir, sharding_fn=parallel.sharding_fn(mesh)),
                                 nnx.Param)
    encoder = Encoder(tokenizer)
    prompts = [encoder.encode_prompt(PromptRecord(p)) for p in PROMPTS]
    config = SamplingConfig(max_new_tokens=8, num_samples=2, temperature=0.0, stop_ids=(tokenizer.eos_token_id,),
                            pad_id=tokenizer.pad_token_id, batch_size=4, buckets=(64, 128))
    calls = []
    want = sample(graphdef, params, prompts, config, mesh=mesh, progress=lambda *a: calls.append(a))
    # The CLI's tokens/s adds up the callback's per-call token counts.
    assert calls[-1][0] == 4 and sum(tokens for _, tokens in calls) == want.mask.sum()
    assert f"4 prompts x 2 samples: {want.mask.sum()} tokens in" in stdout and "tokens/s" in stdout
    for i, line in enumerate(lines):
        counts = want.mask[i].sum(-1)
        assert line["tokens"] == counts.tolist()
        stopped = [bool(f == FINISH_STOP) for f in want.finish[i]]
        assert line["finish_reasons"] == ["stop" if f else "length" for f in stopped]
        assert line["completions"] == [tokenizer.decode(want.tokens[i, s, :counts[s] - stopped[s]]) for s in range(2)]
        np.testing.assert_allclose(line["logps"], want.logps[i].sum(-1), rtol=1e-5)
        assert line["completions"][0] == line["completions"][1]  # greedy
    assert any(line["finish_reasons"] != ["stop", "stop"] for line in lines)


def test_finish_reasons_and_seeded_samples(capsys, stopping_model_dir, prompts_file, tmp_path):
    """The stopping model ends prompt 2 (its cue) with EOS at once and fills the others to the length."""
    runs = []
    for batch in (1, 16):
        out = tmp_path / f"out-{batch}.jsonl"
        code, _, stderr = run_cli(capsys, "--model", stopping_model_dir, "--prompts", prompts_file, "--output", out,
                                  "--num-samples", 3, "--max-new-tokens", 5, "--batch-size", batch, "--seed", 3)
        assert code == 0, stderr
        runs.append(read_jsonl(out))
    assert runs[0] == runs[1]  # the same samples whatever the batch
    for i, line in enumerate(runs[0]):
        if i == 2:
            assert line["finish_reasons"] == ["stop"] * 3
            assert line["tokens"] == [1] * 3  # the stop token counts ...
            assert line["completions"] == [""] * 3  # ... but is not in the text
        else:
            assert line["finish_reasons"] == ["length"] * 3
            assert line["tokens"] == [5] * 3
            assert line["completions"] == ["aaaaa"] * 3
        assert all(-1e-3 < lp <= 0 for lp in line["logps"])


def _params(policy) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(policy.params)]


def test_run_directory(capsys, run_dir, tiny_model_dir, prompts_file, tmp_path):
    before = sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(run_dir) for f in fs)
    mesh = parallel.make_mesh({"data": -1})
    policy = load_policy(run_dir, mesh=mesh)
    assert policy.source.startswith("checkpoint at step 2 of")
    initial = _params(load_policy(tiny_model_dir, mesh=mesh))
    trained = _params(policy)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, trained))  # the run learned something
    exported = load_policy(os.path.join(run_dir, "export"), mesh=mesh)
    assert all(np.array_equal(a, b) for a, b in zip(trained, _params(exported)))
    assert policy.graphdef == exported.graphdef

    outputs, logs = {}, {}
    for name, model in (("run", run_dir), ("export", os.path.join(run_dir, "export"))):
        out = tmp_path / f"{name}.jsonl"
        code, stdout, stderr = run_cli(capsys, "--model", model, "--prompts", prompts_file, "--output", out,
                                       "--temperature", 0, "--max-new-tokens", 6)
        assert code == 0, stderr
        outputs[name], logs[name] = read_jsonl(out), stdout
    assert "policy: checkpoint at step 2 of" in logs["run"]
    assert outputs["run"] == outputs["export"]
    after = sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(run_dir) for f in fs)
    assert before == after  # sampling changed nothing in the run directory


def test_run_directory_fallbacks(capsys, run_dir, tmp_path):
    """A damaged newest checkpoint is skipped (step 1 is used); without checkpoints, the export."""
    mesh = parallel.make_mesh({"data": -1})
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("compilation_cache"))
    os.remove(damaged / "checkpoints" / "2" / "commit_success.txt")
    with pytest.warns(UnusableCheckpointWarning, match=r"checkpoint at step 2 .* is unusable: commit marker "
                                                       r"commit_success.txt is missing"):
        policy = load_policy(str(damaged), mesh=mesh)
    assert policy.source.startswith("checkpoint at step 1 of")
    assert (damaged / "checkpoints" / "2").is_dir()  # a reader renames nothing
    assert any(not np.array_equal(a, b) for a, b in zip(_params(policy), _params(load_policy(run_dir, mesh=mesh))))

    exported = tmp_path / "exported"
    exported.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), exported)
    shutil.copytree(os.path.join(run_dir, "export"), exported / "export")
    policy = load_policy(str(exported), mesh=mesh)
    assert policy.source.startswith("export of")
    assert all(np.array_equal(a, b) for a, b in zip(_params(policy), _params(load_policy(run_dir, mesh=mesh))))


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case", [
    "missing model", "no config.json", "missing prompts", "not json", "no prompt key", "empty prompts",
    "too long", "output dir", "unknown option", "temperature", "top_p", "top_p zero", "num_samples",
    "max_new_tokens", "batch_size", "top_k", "seed", "not a number",
])
def test_bad_input_exits_2_with_one_line(capsys, case, tiny_model_dir, prompts_file, tmp_path):
    model, prompts, extra = tiny_model_dir, prompts_file, []
    expect = {
        "missing model": "no such directory", "no config.json": "holds no config.json",
        "missing prompts": "nope.jsonl: no such file", "not json": "bad.jsonl:2: <line>: not JSON",
        "no prompt key": "bad.jsonl:1: ", "empty prompts": "no prompts",
        "too long": "long.jsonl:2: the prompt has ", "output dir": "does not exist",
        "unknown option": "unrecognized arguments: --frobnicate", "temperature": "temperature must be >= 0",
        "top_p": "top_p must be in (0, 1]", "top_p zero": "top_p must be in (0, 1]",
        "num_samples": "num_samples must be >= 1", "max_new_tokens": "max_new_tokens must be positive",
        "batch_size": "batch_size must be >= 1", "top_k": "top_k must be positive", "seed": "--seed must be >= 0",
        "not a number": "invalid float value",
    }[case]
    output = tmp_path / "out.jsonl"
    if case == "missing model":
        model = str(tmp_path / "nowhere")
    elif case == "no config.json":
        model = str(tmp_path)
    elif case == "missing prompts":
        prompts = str(tmp_path / "nope.jsonl")
    elif case == "not json":
        prompts = _write(tmp_path / "bad.jsonl", '{"prompt": "fine"}\n{"prompt": \n')
    elif case == "no prompt key":
        prompts = _write(tmp_path / "bad.jsonl", '{"text": "hello"}\n')
    elif case == "empty prompts":
        prompts = _write(tmp_path / "empty.jsonl", "\n")
    elif case == "too long":
        prompts = _write(tmp_path / "long.jsonl", '{"prompt": "short"}\n' + json.dumps({"prompt": "maps " * 40}) + "\n")
        extra = ["--max-new-tokens", 100]
    elif case == "output dir":
        output = tmp_path / "missing" / "out.jsonl"
    else:
        extra = {"unknown option": ["--frobnicate"], "temperature": ["--temperature", -1],
                 "top_p": ["--top-p", 1.5], "top_p zero": ["--top-p", 0], "num_samples": ["--num-samples", 0],
                 "max_new_tokens": ["--max-new-tokens", 0], "batch_size": ["--batch-size", 0],
                 "top_k": ["--top-k", -2], "seed": ["--seed", -1], "not a number": ["--temperature", "warm"]}[case]
    code, _, stderr = run_cli(capsys, "--model", model, "--prompts", prompts, "--output", output, *extra)
    assert code == 2
    assert expect in stderr and "Traceback" not in stderr
    if case != "unknown option" and case != "not a number":  # argparse prints its usage line first
        assert len(stderr.strip().splitlines()) == 1, stderr
    if case == "too long":
        assert "with --max-new-tokens 100 that is" in stderr and "context of 128 positions" in stderr
    assert not os.path.exists(output)


def test_help_and_module_entry_point():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "jaxalign.sample", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--prompts", "--output", "--num-samples", "--top-p", "--mesh-tensor", "--prompt-key"):
        assert option in result.stdout


def test_buckets_reach_the_context():
    assert bucket_ladder(128) == (64, 128)
    assert bucket_ladder(100) == (64, 100)
    assert bucket_ladder(32) == (32,)
    assert bucket_ladder(4096)[-3:] == (1024, 2048, 4096)


def test_stop_ids_take_the_end_of_turn_token(tmp_path):
    class Tokenizer:  # a base model's tokenizer with an instruct chat template
        eos_token_id, unk_token_id = 7, None
        chat_template = "{{ '<|im_start|>' + m['content'] + '<|im_end|>' }}"

        def convert_tokens_to_ids(self, token):
            return {"<|im_end|>": 9}.get(token)

    _write(tmp_path / "config.json", json.dumps({"eos_token_id": [7, 11]}))
    assert stop_ids(Tokenizer(), str(tmp_path)) == (7, 9, 11)
    assert stop_ids(Tokenizer()) == (7, 9)
