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
