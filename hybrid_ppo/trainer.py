"""The PPO loop. One iteration reads like the algorithm:

    generate -> score (old log-probs, ref log-probs, values, rewards) -> advantages
             -> train critic -> train actor -> sync weights to the engines

Every phase runs inside `self.phase(...)`, which lets the memory scheduler make the plan's moves
and times the phase. Ray, offloading and timing stay behind that one call.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from hybrid_ppo.algo.advantages import compute_advantages, token_rewards
from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.algo.ppo import kl_penalty, masked_mean
from hybrid_ppo.config import Config, KLPlacement
from hybrid_ppo.executor import RoleError
from hybrid_ppo.memory.plan import Phase
from hybrid_ppo.memory.scheduler import MemoryScheduler
from hybrid_ppo.metrics import MetricsWriter, mean_over_ranks, peak_memory
from hybrid_ppo.roles.reward import RuleReward
from hybrid_ppo.rollout.engine import SamplingParams, is_stop, left_pad, logprob_diff_max, sampling_seed
from hybrid_ppo.rollout.sync_driver import sync_weights
from hybrid_ppo.samples import SampleLog
from hybrid_ppo.special_tokens import SpecialTokens, special_tokens_from
from hybrid_ppo.stopping import check_abandoned
from hybrid_ppo.tasks.base import Example

log = logging.getLogger(__name__)

EVAL_METRIC = "eval/reward_mean"
"""Mean reward of greedy responses to held-out prompts: the accuracy, for a 0/1 rule reward."""


@dataclass
class RoleGroups:
    """The executor's handles on every role (reward is None with a rule reward)."""

    actor: object
    critic: object
    reference: object
    rollout: object
    reward: object | None


@dataclass(frozen=True)
class Rollout:
    sequences: Sequences
    examples: list[Example]
    responses: list[str]  # decoded text before the first stop token, without special tokens
    engine_logprobs: torch.Tensor | None = None  # [B, R] the engines' log-probs of the sampled tokens, if they give them


class PPOTrainer:
    def __init__(self, cfg: Config, roles: RoleGroups, scheduler: MemoryScheduler, tokenizer,
                 encode: Callable[[list[Example]], list[list[int]]], metrics: MetricsWriter,
                 rule_reward: RuleReward | None, samples: SampleLog | None = None, special: SpecialTokens | None = None):
        self.cfg, self.roles, self.scheduler, self.tokenizer = cfg, roles, scheduler, tokenizer
        self.encode, self.metrics, self.rule_reward, self.samples = encode, metrics, rule_reward, samples
        # The run passes the ids resolved from the actor's checkpoint (what the engines use too).
        self.special = special or special_tokens_from(None, None, tokenizer, where="tokenizer")
        self.iteration = 0
        self._metrics: dict[str, float] = {}

    # -- one PPO iteration ------------------------------------------------------------------
    def step(self, examples: list[Example]) -> dict[str, float]:
        self._metrics = {}
        with self.phase(Phase.GENERATE):
            rollout = self.generate(examples, self.sampling())
        scores = self.score(rollout)
        if self.samples is not None:
            self.samples.write(self.iteration + 1, [e.prompt for e in examples], rollout.responses,
                               scores["scores"].tolist(), [e.label for e in examples])
        if rollout.engine_logprobs is not None:
            self._metrics["rollout/logprob_diff_max"] = logprob_diff_max(
                rollout.engine_logprobs, scores["old_logprobs"], rollout.sequences.action_mask)
        with self.phase(Phase.ADVANTAGE):
            experience = self.make_experience(rollout, **scores)
        with self.phase(Phase.TRAIN_CRITIC):
            critic_stats = self.train(self.roles.critic, experience)
        with self.phase(Phase.TRAIN_ACTOR):
            actor_stats = self.train(self.roles.actor, experience)
        with self.phase(Phase.SYNC):
            self.sync_weights()
        self.iteration += 1
        return {**self.rollout_stats(rollout, experience), **critic_stats, **actor_stats, **self._metrics}

    def generate(self, examples: list[Example], sampling: SamplingParams) -> Rollout:
        prompts = self.encode(examples)
        shards = _split_list(prompts, self.roles.rollout.world_size)
        start = time.perf_counter()
        outputs = self.roles.rollout.call_each("generate", [(shard, self._seeded(sampling, rank))
                                                            for rank, shard in enumerate(shards)])
        response_ids = torch.cat([o.response_ids for o in outputs])
        response_mask = torch.cat([o.response_mask for o in outputs])
        self._metrics["rollout/tokens_per_s"] = float(response_mask.sum()) / (time.perf_counter() - start)
        sequences = _assemble(prompts, response_ids, response_mask, self.special.pad_id)
        engine_logprobs = None if any(o.logprobs is None for o in outputs) else torch.cat([o.logprobs for o in outputs])
        return Rollout(sequences, examples, self.decode_responses(response_ids, response_mask), engine_logprobs)

    def _seeded(self, sampling: SamplingParams, rank: int) -> SamplingParams:
        if sampling.greedy:
            return sampling
        return dataclasses.replace(sampling, seed=sampling_seed(self.cfg.rollout_seed, self.iteration, rank))

    def decode_responses(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        return decode_responses(self.tokenizer, self.special, response_ids, response_mask)

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """One model at a time, each on its own shards: old log-probs, ref log-probs, values, rewards."""
        seq = rollout.sequences
        with self.phase(Phase.SCORE_ACTOR):
            old_logprobs = self._sharded(self.roles.actor, "logprobs", seq)
        with self.phase(Phase.SCORE_REFERENCE):
            ref_logprobs = self._sharded(self.roles.reference, "logprobs", seq)
        with self.phase(Phase.SCORE_CRITIC):
            values = self._sharded(self.roles.critic, "values", seq)
        with self.phase(Phase.SCORE_REWARD):
            rewards = self.sequence_rewards(rollout)
        return {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": rewards}

    def make_experience(self, rollout: Rollout, old_logprobs, ref_logprobs, values, scores) -> Experience:
        algo, mask = self.cfg.algo, rollout.sequences.action_mask
        kl = kl_penalty(old_logprobs, ref_logprobs, algo.kl_estimator)
        rewards = token_rewards(scores, kl if algo.kl_in == KLPlacement.REWARD else None, mask, algo.kl_coef)
        adv = compute_advantages(rewards, values, mask, algo.gamma, algo.lam, algo.whiten_advantages)
        self._metrics.update({"reward/mean": float(scores.mean()), "reward/std": float(scores.std(correction=0)),
                              "kl/mean": float(masked_mean(kl, mask.float())),
                              "critic/value_mean": float(masked_mean(values, mask.float()))})
        return Experience.build(rollout.sequences, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                values=values, rewards=rewards, advantages=adv.advantages, returns=adv.returns)

    def train(self, group, experience: Experience) -> dict[str, float]:
        shards = experience.shard(group.world_size)
        return mean_over_ranks(group.call_each("train", [(shard, self.iteration) for shard in shards]))

    def sync_weights(self) -> None:
        """Actor -> engines, bucket by bucket: actor rank i hands each bucket to the engine worker on
        GPU i; the driver passes handles only (rollout/sync_driver.py)."""
        r = self.cfg.rollout
        stats = sync_weights(self.roles.actor, self.roles.rollout, r.tensor_parallel_size, slots=r.weight_sync_slots)
        self._metrics.update(stats.metrics())

    # -- scoring helpers ----------------------------------------------------------------------
    def sequence_rewards(self, rollout: Rollout) -> torch.Tensor:
        if self.roles.reward is not None:
            return self._sharded(self.roles.reward, "score", rollout.sequences)
        labels = [e.label for e in rollout.examples]
        metadata = [e.metadata or {} for e in rollout.examples]
        return self.rule_reward([e.prompt for e in rollout.examples], rollout.responses, labels, metadata)

    def _sharded(self, group, method: str, seq: Sequences) -> torch.Tensor:
        return torch.cat(group.call_each(method, [(shard,) for shard in seq.shard(group.world_size)]))

    # -- outside the iteration ----------------------------------------------------------------
    def evaluate(self, examples: list[Example]) -> dict[str, float]:
        """Greedy responses to held-out prompts, scored like rollouts (accuracy for 0/1 rewards)."""
        with self.phase(Phase.GENERATE, record=False):
            rollout = self.generate(examples, SamplingParams(self.cfg.rollout.max_new_tokens, temperature=0.0))
        if self.roles.reward is None:  # a rule reward runs here in the driver: no phase change
            return {EVAL_METRIC: float(self.sequence_rewards(rollout).mean())}
        with self.phase(Phase.SCORE_REWARD, record=False):
            scores = self.sequence_rewards(rollout)
        # Scoring put the engine to sleep (level 2 discards its weights), but the next GENERATE
        # expects the actor's weights in the engine: sync them again.
        self.initial_sync()
        return {EVAL_METRIC: float(scores.mean())}

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the driver-side loop must carry over a resume. Add driver state here (e.g. an
        adaptive KL controller); the trained roles' state goes through DeepSpeed instead."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    def save_roles(self, directory: str) -> dict[str, float]:
        """Every trained role's DeepSpeed checkpoint, one role resident at a time; returns the timings."""
        self._metrics = {}
        with self.phase(Phase.SAVE_ACTOR):
            self.roles.actor.call("save_checkpoint", f"{directory}/actor")
        with self.phase(Phase.SAVE_CRITIC):
            self.roles.critic.call("save_checkpoint", f"{directory}/critic")
        return {k: v for k, v in self._metrics.items() if k.startswith("time/")}

    def load_roles(self, directory: str) -> None:
        """Restore what `save_roles` wrote (resume); the engines need a SYNC afterwards."""
        with self.phase(Phase.SAVE_ACTOR, record=False):
            self.roles.actor.call("load_checkpoint", f"{directory}/actor")
        with self.phase(Phase.SAVE_CRITIC, record=False):
            self.roles.critic.call("load_checkpoint", f"{directory}/critic")

    def initial_sync(self) -> None:
        """A SYNC outside the iteration: engines start without weights, and GENERATE expects them."""
        with self.phase(Phase.SYNC, record=False):
            self.sync_weights()

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)

    def rollout_stats(self, rollout: Rollout, experience: Experience) -> dict[str, float]:
        mask = rollout.sequences.action_mask
        ends_in_eos = (is_stop(rollout.sequences.responses, self.special.eos_ids) & (mask == 1)).any(-1)
        return {"rollout/response_tokens": float(mask.sum(-1).float().mean()),
                "rollout/truncated_frac": float((~ends_in_eos).float().mean()),
                "critic/return_mean": float(masked_mean(experience.returns, mask.float()))}

    @contextmanager
    def phase(self, phase: Phase, record: bool = True) -> Iterator[None]:
        check_abandoned()  # a second SIGINT/SIGTERM: no new phase
        start = time.perf_counter()
        try:
            moves = self.scheduler.enter(phase)
            self.metrics.log_moves(self.iteration, moves)
            yield
        except RoleError as err:
            err.phase = err.phase or phase.value  # the one place that knows which phase failed
            raise
        if record:
            self._metrics[f"time/{phase.value}"] = time.perf_counter() - start
            self._metrics[f"time/{phase.value}_moves"] = sum(m.seconds for m in moves)
            for field, gib in peak_memory(moves).items():
                self._metrics[f"memory/{phase.value}/{field}"] = gib


def decode_responses(tokenizer, special: SpecialTokens, response_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> list[str]:
    """Text before the first stop token (any EOS id), without special tokens, as the reward
    contract says. An id past the tokenizer (padded vocab rows) has no text and decodes to ''."""
    lengths = response_mask.sum(-1).tolist()
    rows = [ids[:n].tolist() for ids, n in zip(response_ids, lengths)]
    rows = [r[:-1] if r and r[-1] in special.eos_ids else r for r in rows]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _split_list(items: list, parts: int) -> list[list]:
    """`parts` consecutive pieces whose sizes differ by at most one; nothing is dropped."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def _assemble(prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
              pad_id: int) -> Sequences:
    """Left-pad prompts to a common P and append the responses: [B, P+R]."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    tokens = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    return Sequences(tokens, attention, response_mask)
