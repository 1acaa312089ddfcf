"""The online driver's pieces without a model: pairing, reward functions and their checks, the
prompt file and the prompt schedule, and the config rules of an online run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxalign.data.encoding import Encoder
from jaxalign.data.formats import KeyMap
from jaxalign.data.records import DataError, PromptRecord
from jaxalign.online.pairs import make_pairs
from jaxalign.online.prompts import at_positions, load_prompts, round_positions, split_eval
from jaxalign.online.rewards import RewardError, combine, function_scorer, load_function, parse_functions
from jaxalign.train.config import ConfigError, validate

# -- pairs -------------------------------------------------------------------------------------


def pairs_of(rewards, rule="best_worst", tie_margin=0.0, seed=0, round_index=1, positions=None):
    rewards = np.asarray(rewards, np.float64)
    positions = np.arange(len(rewards)) if positions is None else np.asarray(positions)
    return make_pairs(rewards, rule=rule, tie_margin=tie_margin, seed=seed, round_index=round_index,
                      positions=positions)


def test_best_worst_pairs_the_first_argmax_with_the_first_argmin():
    result = pairs_of([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, -1.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    assert result.pairs == [(0, 1, 0), (1, 0, 1), (2, 3, 0)]
    assert result.ties == 0


def test_best_worst_drops_and_counts_ties_within_the_margin():
    rewards = [[1.0, 1.0, 1.0, 1.0],  # all equal: a tie even at margin 0
               [0.0, 0.5, 0.25, 0.1],  # max - min = 0.5 = margin: a tie (<=)
               [0.0, 0.75, 0.5, 0.1],  # 0.75 > margin: a pair
               [2.0, 1.6, 1.7, 1.9]]  # 0.4: a tie
    result = pairs_of(rewards, tie_margin=0.5)
    assert result.pairs == [(2, 1, 0)]
    assert result.ties == 3
    assert pairs_of(rewards, tie_margin=0.0).ties == 1  # only the all-equal row


def test_random_pairs_are_seeded_deterministic_and_the_higher_is_chosen():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(32, 4))
    positions = np.arange(100, 132)
    a = pairs_of(rewards, rule="random", seed=5, round_index=2, positions=positions)
    b = pairs_of(rewards, rule="random", seed=5, round_index=2, positions=positions)
    assert a == b and len(a.pairs) == 32 and a.ties == 0
    for m, chosen, rejected in a.pairs:
        assert chosen != rejected and rewards[m, chosen] > rewards[m, rejected]
        drawn = set(np.random.default_rng([5, 2, int(positions[m])]).choice(4, size=2, replace=False).tolist())
        assert {chosen, rejected} == drawn  # the documented stream: default_rng([seed, round, position])
    # another seed, round or position draws other pairs (for some of the 32 rows)
    for other in (dict(seed=6, round_index=2, positions=positions), dict(seed=5, round_index=3, positions=positions),
                  dict(seed=5, round_index=2, positions=positions + 1)):
        assert pairs_of(rewards, rule="random", **other).pairs != a.pairs
    # random pairs tie like the others
    assert pairs_of(np.ones((3, 4)), rule="random").ties == 3


def test_all_pairs_takes_every_two_with_the_higher_chosen():
    rewards = np.asarray([[0.3, 0.1, 0.4, 0.2], [1.0, 1.0, 0.0, 2.0]])
    result = pairs_of(rewards, rule="all_pairs")
    assert len(result.pairs) + result.ties == 2 * 6
    assert result.ties == 1  # the two 1.0s of row 1
    assert len(result.pairs) == 11
    for m, chosen, rejected in result.pairs:
        assert rewards[m, chosen] > rewards[m, rejected]
    assert {(c, r) for m, c, r in result.pairs if m == 0} == {(0, 1), (2, 0), (0, 3), (2, 1), (3, 1), (2, 3)}


def test_unknown_pair_rule_is_an_error():
    with pytest.raises(ValueError, match="pair rule must be one of best_worst, random, all_pairs"):
        pairs_of([[0.0, 1.0]], rule="best")


# -- rewards -----------------------------------------------------------------------------------

PROMPTS = ["alpha prompt", "alpha prompt", "beta prompt", "beta prompt"]  # prompt-major, K = 2
COMPLETIONS = ["a1", "a2", "b1", "b2"]


def score(fn, name="my_rewards:fn"):
    return function_scorer(name, fn).score(PROMPTS, COMPLETIONS, {"answer": [1, 1, 2, 2]})


def test_reward_function_gets_the_metadata_and_returns_floats():
    seen = {}

    def fn(prompts, completions, **columns):
        seen.update(columns, prompts=prompts, completions=completions)
        return [1, 2.5, np.float32(3.0), -1]

    out = score(fn)
    assert out.dtype == np.float64 and out.tolist() == [1.0, 2.5, 3.0, -1.0]
    assert seen == {"answer": [1, 1, 2, 2], "prompts": PROMPTS, "completions": COMPLETIONS}


def test_a_reward_function_that_raises_names_itself_and_the_first_failing_prompt():
    def fn(prompts, completions, **_):
        if any(p.startswith("beta") for p in prompts):
            raise KeyError("beta")
        return [0.0] * len(prompts)

    with pytest.raises(RewardError) as error:
        score(fn)
    message = str(error.value)
    assert "reward function 'my_rewards:fn' raised KeyError" in message
    assert "(first failing prompt: 'beta prompt')" in message


@pytest.mark.parametrize("returned, expected", [
    (lambda n: [0.0] * (n - 1), "returned 3 values for 4 completions"),
    (lambda n: [0.0] * (n + 1), "returned 5 values for 4 completions"),
    (lambda n: [0.0, 0.0, math.nan, 0.0],
     "returned nan for completion 2 of prompt 'beta prompt': every reward must be a finite number"),
    (lambda n: [math.inf, 0.0, 0.0, 0.0], "returned inf for completion 0 of prompt 'alpha prompt'"),
    (lambda n: [0.0, None, 0.0, 0.0], "returned None for completion 1 of prompt 'alpha prompt'"),
    (lambda n: ["good"] * n, "returned 'good' for completion 0 of prompt 'alpha prompt'"),
    (lambda n: 3.0, "returned float, not a sequence of floats"),
])
def test_a_bad_return_value_is_a_reward_error_naming_the_function(returned, expected):
    with pytest.raises(RewardError) as error:
        score(lambda prompts, completions, **_: returned(len(completions)))
    assert "reward function 'my_rewards:fn'" in str(error.value)
    assert expected in str(error.value)


def test_load_function_by_module_and_by_file(helpers, tmp_path, monkeypatch):
    from jaxalign.data.synthetic import synthetic_reward

    assert load_function("jaxalign.data.synthetic:synthetic_reward") is synthetic_reward
    fn = load_function(f"{helpers.rewards_file}:by_ids")
    assert fn.__name__ == "by_ids" and fn([], [], completion_ids=[], stopped=[], prompt_index=[], tag=[]) == []
    # a relative path and a module of the working directory
    (tmp_path / "local_rewards.py").write_text(
        "def score(prompts, completions, **_):\n    return [2.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    assert load_function("local_rewards.py:score")(["p"], ["c"]) == [2.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_function("local_rewards:score")(["p"], ["c"]) == [2.0]
    assert parse_functions(f" a:b, {helpers.rewards_file}:nan ,") == ["a:b", f"{helpers.rewards_file}:nan"]


@pytest.mark.parametrize("name, expected", [
    ("jaxalign.data.synthetic:no_such_reward", "jaxalign.data.synthetic has no function 'no_such_reward'"),
    ("{rewards}:missing", "has no function 'missing'"),
    ("{rewards}:POISON_TOPIC", "has no function 'POISON_TOPIC'"),  # not callable
    ("no_such_dir/rewards.py:score", "no such file"),
    ("no_such_module_xyz:score", "importing no_such_module_xyz failed: ModuleNotFoundError"),
    ("just_a_name", "expected module:function or path/to/file.py:function"),
])
def test_load_function_errors_say_what_is_missing(name, expected, helpers):
    name = name.format(rewards=helpers.rewards_file)
    with pytest.raises(RewardError) as error:
        load_function(name)
    assert f"reward function {name!r}" in str(error.value) and expected in str(error.value)


def test_combine_weights_the_rewards_and_penalises_a_missing_stop_token():
    first, second = np.asarray([1.0, 2.0, 3.0]), np.asarray([0.5, 0.0, -1.0])
    stopped = np.asarray([True, False, True])
    # 2*[1,2,3] - [0.5,0,-1] = [1.5, 4, 7]; minus 0.25 where not stopped
    np.testing.assert_array_equal(combine([first, second], [2.0, -1.0], stopped, 0.25), [1.5, 3.75, 7.0])
    np.testing.assert_array_equal(combine([first], [1.0], stopped, 0.0), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(combine([first], [0.5], np.zeros(3, bool), 1.0), [-0.5, 0.0, 0.5])
    with pytest.raises(ValueError):
        combine([first, second], [1.0], stopped, 0.0)  # one weight per reward


# -- prompts -----------------------------------------------------------------------------------


def write_rows(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def test_load_prompts_reads_prompts_drops_long_ones_and_keeps_metadata(tmp_path, tokenizer):
    long_prompt = " ".join(["Tell me something about cats and rivers and bread."] * 8)
    path = write_rows(tmp_path / "p.jsonl", [
        {"prompt": "Tell me something about cats.", "answer": 7},
        {"prompt": long_prompt, "answer": 8},
        {"prompt": "What do you know about owls?", "chosen": " Sure!", "rejected": " No.", "tag": "x"},
        {"prompt": "Can you describe maps for me?", "completion": " Of course."},
        "",
        {"prompt": "I am curious about tea. Any thoughts?"},
    ])
    got = load_prompts(path, tokenizer, max_prompt_length=32)
    assert [p.text for p in got.prompts] == ["Tell me something about cats.", "What do you know about owls?",
                                             "Can you describe maps for me?", "I am curious about tea. Any thoughts?"]
    assert [p.index for p in got.prompts] == [0, 1, 2, 3]  # index among the usable rows
    assert [p.where for p in got.prompts] == [f"{path}:1", f"{path}:3", f"{path}:4", f"{path}:6"]
    assert [p.metadata for p in got.prompts] == [{"answer": 7}, {"tag": "x"}, {}, {}]
    assert got.counts == {"longer than data.max_prompt_length=32 tokens": 1}
    assert "4 prompts (dropped: 1 longer than data.max_prompt_length=32 tokens)" == got.summary()
    encoder = Encoder(tokenizer)
    for p in got.prompts:
        np.testing.assert_array_equal(p.ids, encoder.encode_prompt(PromptRecord(p.text)))
        assert len(p.ids) <= 32
    assert len(encoder.encode_prompt(PromptRecord(long_prompt))) > 32


def test_load_prompts_renames_the_prompt_column(tmp_path, tokenizer):
    path = write_rows(tmp_path / "q.jsonl", [{"question": "Tell me about bees.", "answer": "yes"}])
    got = load_prompts(path, tokenizer, max_prompt_length=32, keys=KeyMap(prompt="question"))
    assert got.prompts[0].text == "Tell me about bees." and got.prompts[0].metadata == {"answer": "yes"}


def test_load_prompts_errors(tmp_path, tokenizer):
    empty = write_rows(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=r"empty.jsonl: no usable prompt"):
        load_prompts(empty, tokenizer, max_prompt_length=32)
    too_long = write_rows(tmp_path / "long.jsonl", [{"prompt": "cats " * 100}])
    with pytest.raises(ValueError, match=r"no usable prompt \(1 longer than data.max_prompt_length=32 tokens\)"):
        load_prompts(too_long, tokenizer, max_prompt_length=32)
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "Tell me about owls."}, {"prompt": 5},
                                              "{not json", {"prompt": "What about tea?"}])
    with pytest.raises(DataError) as error:
        load_prompts(bad, tokenizer, max_prompt_length=32)
    assert str(error.value).startswith(f"{bad}:2: prompt")
    assert (error.value.bad.file, error.value.bad.line) == (bad, 2)
    skipped = load_prompts(bad, tokenizer, max_prompt_length=32, on_bad_record="skip")
    assert [p.text for p in skipped.prompts] == ["Tell me about owls.", "What about tea?"]
    assert skipped.counts == {"bad rows": 2}
    broken_pair = write_rows(tmp_path / "pair.jsonl", [{"prompt": "Hi", "chosen": " yes"}])
    with pytest.raises(DataError, match=rf"{broken_pair}:1: rejected: missing"):
        load_prompts(broken_pair, tokenizer, max_prompt_length=32)


def test_round_positions_are_contiguous_and_cover_the_stream():
    assert round_positions(1, 8).tolist() == list(range(8))
    assert round_positions(3, 8).tolist() == list(range(16, 24))
    stream = np.concatenate([round_positions(r, 5) for r in range(1, 8)])
    assert stream.tolist() == list(range(35)) and stream.dtype == np.int64


def test_each_epoch_of_the_prompt_stream_is_a_seeded_permutation():
    n, seed = 7, 3
    positions = np.arange(4 * n)
    order = at_positions(positions, n, seed)
    for epoch in range(4):
        block = order[epoch * n:(epoch + 1) * n]
        assert sorted(block.tolist()) == list(range(n))  # every prompt once per epoch
        np.testing.assert_array_equal(block, np.random.default_rng([seed, epoch]).permutation(n))
    assert len({tuple(order[e * n:(e + 1) * n]) for e in range(4)}) > 1  # reshuffled every epoch
    # a round (any slice of positions, across an epoch boundary too) sees the same prompts
    for r in range(1, 6):
        rp = round_positions(r, 5)
        np.testing.assert_array_equal(at_positions(rp, n, seed), order[rp])
    np.testing.assert_array_equal(at_positions(positions, n, seed), order)  # deterministic
    assert not np.array_equal(at_positions(positions, n, seed + 1), order)


def test_split_eval_holds_out_a_seeded_subset_in_source_order():
    class P:
        def __init__(self, i):
            self.index = i

    prompts = [P(i) for i in range(10)]
    train, held = split_eval(prompts, 3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert {p.index for p in train} | {p.index for p in held} == set(range(10))
    assert [p.index for p in held] == sorted(p.index for p in held)
    assert [p.index for p in split_eval(prompts, 3, seed=0)[1]] == [p.index for p in held]
    assert split_eval(prompts, 0, seed=0) == (prompts, [])
    with pytest.raises(ValueError, match="cannot hold out 10 eval prompts of 10"):
        split_eval(prompts, 10, seed=0)


# -- config rules ------------------------------------------------------------------------------


def test_the_test_config_is_valid(make_config):
    validate(make_config())
    validate(make_config(**{"loss.name": "vpo", "loss.vpo_mode": "online",
                            "loss.vpo_calibration": "reference_samples"}))
    validate(make_config(**{"online.reward_function": "", "online.reward_model": "/some/reward/model"}))
    validate(make_config(**{"online.rounds": 0, "loss.name": "sft", "online.samples_per_prompt": 1}))


@pytest.mark.parametrize("overrides, expected", [
    ({"loss.name": "sft"}, "config key 'loss.name' = 'sft' cannot train online rounds; online losses: dpo, ipo, "
                           "hinge, rdpo, vpo"),
    ({"loss.name": "bradley_terry"}, "cannot train online rounds"),
    ({"loss.name": "vpo"}, "online VPO samples its calibration responses from the reference policy"),
    ({"loss.name": "vpo", "loss.vpo_mode": "online"}, "--config.loss.vpo_calibration=reference_samples"),
    ({"loss.name": "vpo", "loss.vpo_calibration": "reference_samples"}, "--config.loss.vpo_mode=online"),
    ({"online.reward_function": " , "}, "an online run needs a reward"),
    ({"online.reward_weights": (1.0, 2.0)}, "config key 'online.reward_weights' has 2 weight(s) for 1 reward(s)"),
    ({"online.reward_weights": (1.0,), "online.reward_model": "/rm"}, "has 1 weight(s) for 2 reward(s)"),
    ({"online.samples_per_prompt": 1}, "config key 'online.samples_per_prompt' must be >= 2 in an online run"),
    ({"online.max_new_tokens": 33}, "online.max_new_tokens (33) + data.max_prompt_length (32) must be <= "
                                    "data.max_length (64)"),
])
def test_online_config_rules(make_config, overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(make_config(**overrides))
    assert expected in str(error.value)
