"""The reward-model role: a sequence classifier scored at each row's last real token."""

from __future__ import annotations

import pytest
import torch

from hybrid_ppo.algo.experience import Sequences
from hybrid_ppo.config import load_config
from hybrid_ppo.executor import LocalExecutor
from hybrid_ppo.memory.plan import State


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    from hybrid_ppo.tasks.tiny_model import tiny_llama_config
    from hybrid_ppo.tasks.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = tiny_llama_config(tokenizer)
    config.num_labels = 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(path)
    return str(path), config.pad_token_id


def test_reward_model_scores_the_last_real_token(reward_model_dir):
    from hybrid_ppo.roles.reward import RewardModel

    path, pad = reward_model_dir
    cfg = load_config(None, ["placement.executor=local", "placement.num_gpus=1", "model.reward_fn=null",
                             f"model.reward_model={path}"])
    executor = LocalExecutor(cfg).start()
    try:
        group = executor.spawn("reward", RewardModel, path)
        model = group.members[0].model
        # row 0: left-padded prompt, response ends early (right padding); row 1: no padding
        tokens = torch.tensor([[pad, 4, 5, 6, 7, pad], [4, 5, 6, 7, 8, 9]])
        attention = (tokens != pad).long()
        seq = Sequences(tokens, attention, attention[:, 3:])
        scores = group.call("score", seq)[0]
        assert scores.shape == (2,) and torch.isfinite(scores).all()
        with torch.no_grad():  # the same rows scored one at a time, without any padding
            alone = [model(input_ids=torch.tensor([[4, 5, 6, 7]])).logits[0, 0],
                     model(input_ids=tokens[1:]).logits[0, 0]]
        torch.testing.assert_close(scores, torch.stack(alone), atol=1e-5, rtol=1e-5)

        group.call("offload_states", [State.WEIGHTS.value])
        assert all(p.numel() == 0 for p in model.parameters())
        group.call("reload_states", [State.WEIGHTS.value])
        torch.testing.assert_close(group.call("score", seq)[0], scores)
    finally:
        executor.shutdown()


def test_a_missing_model_directory_is_named(tmp_path):
    from hybrid_ppo.roles.models import load_causal_lm

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"), torch.float32)


@pytest.fixture(scope="module")
def qwen_reward_model(chat_checkpoint, tmp_path_factory):
    """A reward model shaped like one trained from Qwen2.5-Instruct: its tokenizer, no
    pad_token_id in the config, a `score` head with num_labels = 1."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    base = chat_checkpoint("qwen2.5")
    config = AutoConfig.from_pretrained(base, num_labels=1)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    path = tmp_path_factory.mktemp("qwen_rm")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return str(path), model


def test_reward_model_picks_the_last_real_token_when_pad_is_eos(qwen_reward_model):
    from hybrid_ppo.algo.advantages import last_token_index
    from hybrid_ppo.roles.reward import score_last_token

    path, model = qwen_reward_model
    eos = 151643  # Qwen's <|endoftext|>: a stop token in generation_config and the tokenizer's pad
    prompt_a, prompt_b = [11, 12, 13], [14, 15]
    response_a, response_b = [21, eos], [22, 23, 24, eos]  # both end in the EOS that is also the pad
    tokens = torch.tensor([[*prompt_a, *response_a, eos, eos], [eos, *prompt_b, *response_b]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    assert last_token_index(attention).tolist() == [4, 6]
    seq = Sequences(tokens, attention, attention[:, 3:])
    with torch.no_grad():
        scores = score_last_token(model, seq)
        alone = [model(input_ids=torch.tensor([prompt_a + response_a])).logits[0, 0],
                 model(input_ids=torch.tensor([prompt_b + response_b])).logits[0, 0]]
    torch.testing.assert_close(scores, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_reward_model_must_share_the_actors_tokenizer(qwen_reward_model, chat_checkpoint):
    from transformers import AutoTokenizer

    from hybrid_ppo.roles.reward import check_reward_tokenizer

    path, _ = qwen_reward_model
    check_reward_tokenizer(AutoTokenizer.from_pretrained(chat_checkpoint("qwen2.5")), path, ["Hello!"])
    with pytest.raises(ValueError, match=r"reward model .* tokenizer has 151665 tokens, the actor's 128256.*"
                                         r"re-tokenization is not supported"):
        check_reward_tokenizer(AutoTokenizer.from_pretrained(chat_checkpoint("llama3")), path)


def test_critic_from_a_reward_model_keeps_its_score_head(qwen_reward_model, chat_checkpoint, caplog):
    from hybrid_ppo.roles.models import ValueModel

    path, model = qwen_reward_model
    with caplog.at_level("INFO", logger="hybrid_ppo.roles.models"):
        critic = ValueModel(path, torch.float32)
    assert "value head = the reward model's trained `score` head" in caplog.text
    torch.testing.assert_close(critic.value_head.weight, model.score.weight)
    assert float(critic.value_head.bias.detach()) == 0.0
    # the critic's value at a sequence's last token is the reward model's score of that sequence
    tokens = torch.tensor([[11, 12, 13, 21, 22]])
    seq = Sequences(tokens, torch.ones_like(tokens), torch.ones(1, 2, dtype=torch.long))
    with torch.no_grad():
        hidden = critic.backbone(input_ids=tokens).last_hidden_state
        torch.testing.assert_close(critic.value_head(hidden[:, -1])[:, 0], model(input_ids=tokens).logits[:, 0],
                                   atol=1e-5, rtol=1e-5)
        assert critic(seq).shape == (1, 2)

    caplog.clear()
    with caplog.at_level("INFO", logger="hybrid_ppo.roles.models"):
        fresh = ValueModel(str(chat_checkpoint("qwen2.5")), torch.float32)
    assert "fresh value head" in caplog.text
    assert float(fresh.value_head.weight.abs().max()) < 0.2 and fresh.value_head.weight.shape == (1, 64)
