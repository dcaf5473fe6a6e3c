"""The real DeepSpeed actor, in-process: exact gradient accumulation, the LR schedule, PTX.

Adam's first step is about lr · sign(g), which would hide a wrong loss weighting. With
`train.adam_eps` far above |g| the step is lr · g / eps instead, linear in the gradient, so
comparing parameter updates compares gradients.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ragged_sequences

from hybrid_ppo.algo.experience import Experience
from hybrid_ppo.config import LRSchedule, load_config
from hybrid_ppo.executor import LOCALHOST, DistInfo, free_port
from hybrid_ppo.roles.deepspeed_engine import lr_factor

pytestmark = pytest.mark.slow


def _actor(tiny_model_dir: str, overrides: list[str]):
    from hybrid_ppo.roles.actor import Actor

    cfg = load_config(None, ["placement.executor=local", "placement.num_gpus=1", "rollout.max_new_tokens=4",
                             "train.rollout_batch_size=8", "train.mini_batch_size=8", "train.ppo_epochs=1",
                             "train.weight_decay=0", "train.max_grad_norm=1e9", *overrides])
    return Actor(cfg, DistInfo(0, 1, LOCALHOST, free_port()), tiny_model_dir)


def _experience(seed: int = 0) -> Experience:
    """8 responses of 1 to 4 tokens (so micro-batches of 2 hold unequal token counts)."""
    gen = torch.Generator().manual_seed(seed)
    seq = ragged_sequences(gen)
    action = seq.action_mask
    old = -torch.rand(8, 4, generator=gen) * action
    adv = torch.randn(8, 4, generator=gen) * action
    return Experience.build(seq, old_logprobs=old, ref_logprobs=old, rewards=torch.zeros(8, 4), advantages=adv)


def _update(tiny_model_dir: str, micro: int, agg: str) -> torch.Tensor:
    actor = _actor(tiny_model_dir, [f"train.micro_batch_size={micro}", f"algo.loss_agg={agg}", "train.actor_lr=100",
                               "train.adam_eps=1000", "algo.kl_coef=0"])
    before = torch.cat([p.detach().flatten().clone() for p in actor.engine.module.parameters()])
    actor.train(_experience(), iteration=0)
    return torch.cat([p.detach().flatten() for p in actor.engine.module.parameters()]) - before


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm"])
def test_one_micro_batch_equals_four(tiny_model_dir, agg):
    one, four = _update(tiny_model_dir, 8, agg), _update(tiny_model_dir, 2, agg)
    scale = float(one.abs().max())
    assert scale > 1e-6  # the step did something
    torch.testing.assert_close(four, one, rtol=1e-4, atol=1e-4 * scale)


def test_lr_schedule_factors_and_the_engine_follows_it(tiny_model_dir):
    assert [lr_factor(LRSchedule.CONSTANT, 2, 10, s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [round(lr_factor(LRSchedule.LINEAR, 2, 10, s), 6) for s in (2, 6, 10)] == [1.0, 0.5, 0.0]
    assert [round(lr_factor(LRSchedule.COSINE, 0, 4, s), 6) for s in (0, 2, 4)] == [1.0, 0.5, 0.0]
    # 8 samples / mini 4 = 2 optimizer steps per train() call; 3 iterations = 6 steps in all.
    actor = _actor(tiny_model_dir, ["train.micro_batch_size=4", "train.mini_batch_size=4", "train.iterations=3",
                               "train.lr_schedule=linear", "train.lr_warmup_steps=2", "train.actor_lr=0.01",
                               "train.adam_beta1=0.8", "train.adam_beta2=0.95", "train.adam_eps=1e-6"])
    group = actor.engine.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    lrs = [actor.train(_experience(i), iteration=i)["actor/lr"] for i in range(3)]
    # after steps 2, 4, 6: the next step's factor is lr_factor(step) -> 1.0, 0.5, 0.0 of the peak
    assert lrs == pytest.approx([0.01 * lr_factor(LRSchedule.LINEAR, 2, 6, s) for s in (2, 4, 6)])
    assert lrs[0] > lrs[1] > lrs[2] == 0.0


def test_ptx_lowers_the_lm_loss_on_pretraining_text(tiny_model_dir, tmp_path):
    from hybrid_ppo.ptx import lm_loss

    texts = ["max 1 2 3 = 3", "7 7 7 7 7 7 7 7", "max 9 0 0 = 9", "1 2 3 4 5 6 7 8 9"]
    data = tmp_path / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))

    def lm_after(ptx_coef: float) -> tuple[float, float]:
        actor = _actor(tiny_model_dir, ["train.micro_batch_size=4", "train.mini_batch_size=4", "train.actor_lr=0.01",
                                   f"algo.ptx_coef={ptx_coef}", f"data.pretrain={data}"])
        from transformers import AutoTokenizer
        from hybrid_ppo.ptx import PTXBatches

        probe = next(PTXBatches(texts, AutoTokenizer.from_pretrained(tiny_model_dir), 4, 16, seed=0))
        with torch.no_grad():
            start = float(lm_loss(actor.engine, *probe))
        stats = [actor.train(_experience(i), iteration=i) for i in range(4)]
        with torch.no_grad():
            end = float(lm_loss(actor.engine, *probe))
        assert ("loss/ptx" in stats[-1]) == (ptx_coef > 0)
        return start, end

    start, with_ptx = lm_after(1.0)
    _, without_ptx = lm_after(0.0)
    assert with_ptx < start - 0.3, (start, with_ptx)
    assert with_ptx < without_ptx - 0.3, (with_ptx, without_ptx)
