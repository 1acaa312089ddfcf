"""``RewardModel``: scores equal ``sequence_rewards`` on the reward model's own tokenization (chat
template, BOS, EOS as in Bradley-Terry training), whatever the order, batch size or mesh; one
program per bucket; transformers-written checkpoints; clear errors for over-long items."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.data.encoding import Encoder
from jaxalign.models import make_model, save_pretrained
from jaxalign.models.hf_reward import load_reward_model
from jaxalign.models.tiny import build_tokenizer, round_up, tiny_config
from jaxalign.parallel import make_mesh
from jaxalign.scoring.forward import sequence_rewards
from jaxalign.scoring.reward_model import RewardModel

D = 32
BUCKETS = (16, 32, 64)
POLICY_CORPUS = ["the cat sat on the mat. hello world, how are you today?",
                 "a dog ran in the park; the sun was warm."] * 10
RM_CORPUS = ["Human: what is the capital of France? Assistant: Paris is the capital.",
             "I like green tea and long walks by the sea, thank you very much."] * 10
CHAT = [{"role": "user", "content": "what is the capital of France?"}]
PROMPTS = ["hello", "the cat", CHAT, "Human: what is the capital of France? Assistant:", "a dog ran",
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tea?"}], "hi", "I like"]
COMPLETIONS = [" world, how are you?", " sat on the mat. " * 3, "Paris.", " Paris is the capital.", " in the park",
               "green tea and long walks by the sea", " there", " long walks by the sea, thank you very much. " * 2]


def _write_reward_model(path, tokenizer, *, seed: int = 0) -> np.ndarray:
    """A tiny Llama reward model with O(0.3) random parameters and head; returns the head."""
    config = tiny_config("llama", vocab_size=round_up(len(tokenizer)), hidden_size=D, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = make_model(config, seed=seed)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed + 1)
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
                                                   for x in leaves]))
    head = rng.standard_normal(D).astype(np.float32)
    save_pretrained(model, path, tokenizer=tokenizer, reward_head=head)
    return head


@pytest.fixture(scope="module")
def policy_tokenizer():
    return build_tokenizer("bpe", bpe_vocab_size=300, corpus=POLICY_CORPUS)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "rm"
    _write_reward_model(path, build_tokenizer("bpe", bpe_vocab_size=400, corpus=RM_CORPUS))
    return path


@pytest.fixture(scope="module")
def rm(rm_dir):
    return RewardModel.load(str(rm_dir), batch_size=4, buckets=BUCKETS)


@pytest.fixture(scope="module")
def direct(rm_dir):
    """``direct(ids_list)``: ``sequence_rewards`` of each id sequence, all in one right-padded batch
    of the loader's own parameters and head (independent of the scorer's batching)."""
    model, head = load_reward_model(rm_dir)
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, b: sequence_rewards(graphdef, p, {"kernel": jnp.asarray(head)}, b,
                                               num_sequences=b["input_ids"].shape[0]))

    def rewards(ids_list) -> np.ndarray:
        n, length = len(ids_list), max(len(x) for x in ids_list)
        batch = {key: np.zeros((n, length), np.int32) for key in ("input_ids", "positions", "segment_ids")}
        batch["sequence_ids"] = np.full((n, length), -1, np.int32)
        for i, ids in enumerate(ids_list):
            k = len(ids)
            batch["input_ids"][i, :k], batch["positions"][i, :k] = ids, np.arange(k)
            batch["segment_ids"][i, :k], batch["sequence_ids"][i, :k] = 1, i
        return np.asarray(fn(params, batch))

    return rewards


def _encoder_ids(tokenizer) -> list[np.ndarray]:
    """Each item as a Bradley-Terry training sequence: a message-list prompt gets the completion
    as an assistant message."""
    encoder = Encoder(tokenizer)
    return [encoder.encode_sequence(p, c if isinstance(p, str) else [{"role": "assistant", "content": c}]).ids
            for p, c in zip(PROMPTS, COMPLETIONS)]


def test_scores_equal_sequence_rewards_on_the_encoders_ids(rm, direct):
    ids = _encoder_ids(rm.tokenizer)
    assert [list(s.ids) for s in rm.encode(PROMPTS, COMPLETIONS)] == [list(x) for x in ids]
    assert all(x[-1] == rm.tokenizer.eos_token_id for x in ids) and len({len(x) for x in ids}) > 4
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == np.float32 and scores.shape == (len(PROMPTS),)
    np.testing.assert_allclose(scores, direct(ids), rtol=0, atol=1e-5)
    assert np.std(scores) > 0.1  # not vacuous


def test_order_and_batch_size_do_not_change_scores(rm):
    scores = rm.score(PROMPTS, COMPLETIONS)
    perm = np.random.default_rng(0).permutation(len(PROMPTS))
    shuffled = rm.score([PROMPTS[i] for i in perm], [COMPLETIONS[i] for i in perm])
    np.testing.assert_allclose(shuffled, scores[perm], rtol=0, atol=1e-5)
    for batch_size in (1, 16):
        other = RewardModel(rm.graphdef, rm.params, rm.head["kernel"], rm.tokenizer, rm.config,
                            batch_size=batch_size, buckets=BUCKETS)
        np.testing.assert_allclose(other.score(PROMPTS, COMPLETIONS), scores, rtol=0, atol=1e-5)


def test_one_program_per_bucket(rm):
    scorer = RewardModel(rm.graphdef, rm.params, rm.head["kernel"], rm.tokenizer, rm.config, batch_size=3,
                         buckets=BUCKETS)
    lengths = sorted(len(s) for s in scorer.encode(PROMPTS, COMPLETIONS))
    used = {min(b for b in BUCKETS if b >= max(lengths[i: i + 3])) for i in range(0, len(lengths), 3)}
    assert len(used) > 1
    scores = scorer.score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(scorer.score(PROMPTS[::-1], COMPLETIONS[::-1]), scores[::-1], rtol=0, atol=1e-5)
    assert scorer._forward._cache_size() == len(used)


def test_conversational_prompt_goes_through_the_chat_template(rm, direct):
    tok = rm.tokenizer
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(CHAT + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    assert prompt.startswith(tok.bos_token + "user: ") and full == prompt + "Paris." + tok.eos_token + "\n"
    [seq] = rm.encode([CHAT], ["Paris."])
    # The rendered prompt, then the completion up to its EOS (the whitespace after it dropped).
    assert list(seq.ids[: seq.prompt_len]) == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(seq.ids[seq.prompt_len:]) == "Paris." + tok.eos_token
    conversational, plain = rm.score([CHAT, CHAT[0]["content"]], ["Paris.", "Paris."])
    np.testing.assert_allclose(conversational, direct([seq.ids])[0], rtol=0, atol=1e-5)
    assert abs(conversational - plain) > 1e-3


def test_texts_are_retokenized_with_the_reward_models_tokenizer(rm, direct, policy_tokenizer):
    assert len(policy_tokenizer) != len(rm.tokenizer)
    policy_ids, rm_ids = _encoder_ids(policy_tokenizer), _encoder_ids(rm.tokenizer)
    differ = [i for i, (a, b) in enumerate(zip(policy_ids, rm_ids)) if len(a) != len(b) or (a != b).any()]
    assert len(differ) >= len(PROMPTS) - 2
    scores = rm.score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(scores, direct(rm_ids), rtol=0, atol=1e-5)
    # Feeding the policy's ids would give other scores.
    assert np.abs(scores - direct(policy_ids))[differ].min() > 1e-3


def test_too_long_items_raise_naming_the_item(rm):
    long = "green tea and long walks by the sea " * 10
    n = len(Encoder(rm.tokenizer).encode_sequence("hi", long))
    assert BUCKETS[-1] < n
    with pytest.raises(ValueError, match=rf"item 1 is {n} tokens long, more than the 64 this reward model scores"):
        rm.score(["hi", "hi"], [" there", long])
    wide = RewardModel(rm.graphdef, rm.params, rm.head["kernel"], rm.tokenizer, rm.config, buckets=(256,))
    with pytest.raises(ValueError, match=rf"item 0 is {n} tokens long.*64 positions"):
        wide.score(["hi"], [long])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        rm.score(["a", "b"], ["c"])


def test_mesh_splits_rows_and_gives_the_same_scores(rm, rm_dir):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = RewardModel.load(str(rm_dir), mesh=mesh, batch_size=6, buckets=BUCKETS)
    assert sharded.batch_size == 8  # rounded up to a multiple of data x fsdp = 4
    embedding = sharded.params["embed_tokens"]["embedding"][...]
    assert len(embedding.sharding.device_set) == 8 and not embedding.sharding.is_fully_replicated
    np.testing.assert_allclose(sharded.score(PROMPTS, COMPLETIONS), rm.score(PROMPTS, COMPLETIONS), rtol=0,
                               atol=1e-5)


def test_checkpoint_written_by_transformers(rm, tmp_path):
    import torch
    transformers = pytest.importorskip("transformers")
    tok = rm.tokenizer
    config = transformers.LlamaConfig(vocab_size=round_up(len(tok)), hidden_size=D, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, num_labels=1, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = RewardModel.load(str(tmp_path), batch_size=4, buckets=BUCKETS)
    ids = [s.ids for s in scorer.encode(PROMPTS, COMPLETIONS)]
    length = max(len(x) for x in ids)
    padded = np.full((len(ids), length), tok.pad_token_id)
    mask = np.zeros_like(padded)
    for i, x in enumerate(ids):
        padded[i, : len(x)], mask[i, : len(x)] = x, 1
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(padded), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(scorer.score(PROMPTS, COMPLETIONS), expected, rtol=0, atol=1e-4)
