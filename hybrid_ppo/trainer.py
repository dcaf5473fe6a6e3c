"""The PPO loop. One iteration reads like the algorithm:

    sample (generate, rewards; more rounds under dynamic sampling) -> score (old log-probs,
    ref log-probs, values) -> advantages -> train critic -> train actor -> sync weights to the engines

Every phase runs inside `self.phase(...)`, which lets the memory scheduler make the plan's moves
and times the phase. Ray, offloading and timing stay behind that one call. The scoring and
training phases are those of the run's plan (`memory/plan.py`): a critic-free estimator's plan
has no SCORE_CRITIC or TRAIN_CRITIC, so the loop never asks for a critic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from hybrid_ppo.algo import dapo
from hybrid_ppo.algo.advantages import token_rewards
from hybrid_ppo.algo.estimators import AdvantageBatch, sequence_scores
from hybrid_ppo.algo.experience import Experience, Sequences, equal_slices
from hybrid_ppo.algo.kl_controller import KLController
from hybrid_ppo.algo.packing import balanced_shards, real_lengths
from hybrid_ppo.algo.prefix_sharing import group_shards
from hybrid_ppo.algo.ppo import kl_penalty, masked_mean, masked_sum
from hybrid_ppo.algo.tis import TISWeights, tis_metrics, tis_weights
from hybrid_ppo.checkpoint import check_written_files
from hybrid_ppo.config import Config, ConfigError, KLPlacement
from hybrid_ppo.executor import RoleError
from hybrid_ppo.memory.plan import CHECKPOINT_PHASES, Phase
from hybrid_ppo.memory.scheduler import MemoryScheduler
from hybrid_ppo.metrics import MetricsWriter, mean_over_ranks, peak_memory
from hybrid_ppo.rewards.combine import CombinedReward, RewardScores, term_metrics
from hybrid_ppo.rollout.engine import SamplingParams, is_stop, left_pad, logprob_diff_max, sampling_seed
from hybrid_ppo.rollout.sync_driver import choose_transport, sync_weights
from hybrid_ppo.samples import SampleLog
from hybrid_ppo.seeding import derived_seed
from hybrid_ppo.special_tokens import SpecialTokens, special_tokens_from
from hybrid_ppo.stopping import check_abandoned
from hybrid_ppo.tasks.base import Example

log = logging.getLogger(__name__)

EVAL_METRIC = "eval/reward_mean"
"""Mean reward of greedy responses to held-out prompts: the accuracy, for a 0/1 rule reward."""

SCORE_CALLS: dict[Phase, tuple[str, str, str]] = {
    Phase.SCORE_ACTOR: ("actor", "logprobs", "old_logprobs"),
    Phase.SCORE_REFERENCE: ("reference", "logprobs", "ref_logprobs"),
    Phase.SCORE_CRITIC: ("critic", "values", "values"),
}
"""Model-scoring phase -> (role, method on its ranks, what the result is called)."""

TRAIN_ROLES: dict[Phase, str] = {Phase.TRAIN_CRITIC: "critic", Phase.TRAIN_ACTOR: "actor"}
CHECKPOINT_ROLES: dict[Phase, str] = {Phase.CHECKPOINT_ACTOR: "actor", Phase.CHECKPOINT_CRITIC: "critic"}


@dataclass
class RoleGroups:
    """The executor's handles on every role (reward is None with a rule reward, critic None for a
    critic-free estimator)."""

    actor: object
    critic: object | None
    reference: object | None
    rollout: object
    reward: object | None

    @property
    def advantage(self) -> object:
        """Whose ranks run ADVANTAGE: the critic's, or the actor's without a critic."""
        return self.critic if self.critic is not None else self.actor


@dataclass(frozen=True)
class Rollout:
    sequences: Sequences
    examples: list[Example]
    responses: list[str]  # decoded text before the first stop token, without special tokens
    engine_logprobs: torch.Tensor | None = None  # [B, R] the engines' log-probs of the sampled tokens, if they give them
    generate_s: float = float("nan")  # wall time of the engines' generate calls

    def select(self, rows: torch.Tensor) -> "Rollout":
        logprobs = None if self.engine_logprobs is None else self.engine_logprobs[rows]
        return Rollout(self.sequences.select(rows), [self.examples[i] for i in rows.tolist()],
                       [self.responses[i] for i in rows.tolist()], logprobs, self.generate_s)

    @staticmethod
    def cat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Several rounds' rollouts as one batch (generate_s: all the rounds' generation time)."""
        logprobs = None if any(p.engine_logprobs is None for p in parts) else torch.cat([p.engine_logprobs for p in parts])
        return Rollout(dapo.cat_sequences([p.sequences for p in parts], pad_id), [e for p in parts for e in p.examples],
                       [r for p in parts for r in p.responses], logprobs, sum(p.generate_s for p in parts))


@dataclass(frozen=True)
class Scores:
    """What the scoring phases produce for a rollout (values only with a critic)."""

    reward: torch.Tensor  # [B] the reward model's or the rule rewards' (weighted) score of each response
    old_logprobs: torch.Tensor | None = None  # [B, R] the actor's, at the rollout temperature; None on-policy (no SCORE_ACTOR)
    ref_logprobs: torch.Tensor | None = None  # [B, R] the reference model's; None without a reference (KL off)
    values: torch.Tensor | None = None  # [B, R] the critic's
    reward_terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> [B] each logged reward term


def has_kl(experience: Experience) -> bool:
    """Whether the experience carries both log-probs the KL compares (not on-policy-skipped, not KL off)."""
    return experience.old_logprobs is not None and experience.ref_logprobs is not None


def sequence_kl(experience: Experience, estimator) -> float:
    """Mean over responses of their summed per-token KL to the reference: the adaptive KL
    controller's input (and the `kl/sequence_mean` metric)."""
    kl = kl_penalty(experience.old_logprobs, experience.ref_logprobs, estimator)
    return float(masked_sum(kl, experience.sequences.action_mask.float(), dim=-1).mean())


class PPOTrainer:
    def __init__(self, cfg: Config, roles: RoleGroups, scheduler: MemoryScheduler, tokenizer,
                 encode: Callable[[list[Example]], list[list[int]]], metrics: MetricsWriter,
                 rule_reward: CombinedReward | None, samples: SampleLog | None = None, special: SpecialTokens | None = None):
        self.cfg, self.roles, self.scheduler, self.tokenizer = cfg, roles, scheduler, tokenizer
        self.encode, self.metrics, self.rule_reward, self.samples = encode, metrics, rule_reward, samples
        # The run passes the ids resolved from the actor's checkpoint (what the engines use too).
        self.special = special or special_tokens_from(None, None, tokenizer, where="tokenizer")
        self.iteration = 0
        self._phase_times: dict[str, float] = {}  # what `phase()` measured since the last step or save
        self._sync_transport: str | None = None  # rollout.weight_sync_transport, resolved at the first sync
        self.kl = KLController(cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.eval_is_accuracy = rule_reward is not None
        if not cfg.uses_reference:
            log.info("algo.kl_coef = 0 and no algo.kl_target: no reference model (no process, phase or placement)")
        if not cfg.scores_old_logprobs:
            log.info("on-policy (1 epoch, 1 mini-batch per rollout): SCORE_ACTOR skipped, the old log-probs are "
                     "the training forward's, detached")
        """Whether eval/reward_mean is an accuracy: a rule reward that has only ever given 0 or 1."""

    # -- one PPO iteration ------------------------------------------------------------------
    def step(self, examples: list[Example], more: Callable[[], list[Example]] | None = None) -> dict[str, float]:
        """One iteration on `examples`; `more()` draws the next prompts when dynamic sampling needs them."""
        self._phase_times = {}
        start = time.perf_counter()
        rollout, rewards, sampling_stats = self.sample(examples, more)
        scores = self.score(rollout, rewards)
        self.log_samples(rollout, scores)
        with self.phase(Phase.ADVANTAGE):
            experience, experience_stats = self.make_experience(rollout, scores)
        train_stats: dict[str, float] = {}
        for phase in self.plan_phases(TRAIN_ROLES):
            with self.phase(phase):
                train_stats.update(self.train(phase, experience))
        with self.phase(Phase.SYNC):
            sync_stats = self.sync_weights()
        if has_kl(experience):
            self.kl.update(sequence_kl(experience, self.cfg.algo.kl_estimator), len(experience))
        self.iteration += 1
        return {**self.rollout_metrics(rollout, scores), **sampling_stats, **experience_stats, **train_stats,
                **sync_stats, **self._phase_times, **self.throughput(rollout, time.perf_counter() - start)}

    def plan_phases(self, phases) -> list[Phase]:
        """Those of `phases` that this run's plan has, in iteration order."""
        return [p for p in self.scheduler.plan if p in phases]

    def sample(self, examples: list[Example], more: Callable[[], list[Example]] | None
               ) -> tuple[Rollout, RewardScores, dict[str, float]]:
        """GENERATE and the rewards. With algo.dynamic_sampling, groups whose rewards are all equal
        are dropped and more prompts sampled, at most algo.max_sampling_rounds rounds, until the
        batch has train.rollout_batch_size groups with signal (algo/dapo.py); else one round."""
        algo, n = self.cfg.algo, self.cfg.train.samples_per_prompt
        if not algo.dynamic_sampling:
            return (*self.sample_round(examples, 0), {})
        pool = dapo.SignalGroups(self.cfg.train.rollout_batch_size, n,
                                 dapo.group_unit(self.cfg.train.mini_batch_size, n, self.cfg.placement.world_size))
        rounds: list[tuple[Rollout, RewardScores]] = []
        for sampling_round in range(algo.max_sampling_rounds):
            if sampling_round:
                self.resync_engines()  # scoring the rewards put the engines to sleep
                examples = more() if more is not None else examples  # without `more`: the same prompts, resampled
            rounds.append(self.sample_round(examples, sampling_round))
            pool.add(rounds[-1][1].total)
            if pool.full:
                break
        picks = pool.picks()
        rollout = Rollout.cat([r.select(rows) for (r, _), rows in zip(rounds, picks)], self.special.pad_id)
        rewards = _cat_rewards([w for _, w in rounds], picks)
        return rollout, rewards, pool.metrics()

    def sample_round(self, examples: list[Example], sampling_round: int) -> tuple[Rollout, RewardScores]:
        """One GENERATE and the rewards of what it generated (with the overlong penalty, if on)."""
        with self.phase(Phase.GENERATE):
            rollout = self.generate(examples, self.sampling(), sampling_round)
        with self.phase(Phase.SCORE_REWARD):
            rewards = self.sequence_rewards(rollout)
        algo = self.cfg.algo
        if algo.overlong_buffer is None:
            return rollout, rewards
        penalty = dapo.overlong_penalty(rollout.sequences.action_mask.sum(-1), self.cfg.rollout.max_new_tokens,
                                        algo.overlong_buffer, algo.overlong_penalty_factor)
        return rollout, RewardScores(rewards.total + penalty, {**rewards.terms, "overlong_penalty": penalty})

    def generate(self, examples: list[Example], sampling: SamplingParams, sampling_round: int = 0) -> Rollout:
        prompts = self.encode(examples)
        shards = _split_list(prompts, self.roles.rollout.world_size)
        start = time.perf_counter()
        outputs = self.roles.rollout.call_each("generate", [(shard, self._seeded(sampling, rank, sampling_round))
                                                            for rank, shard in enumerate(shards)])
        seconds = time.perf_counter() - start
        response_ids = torch.cat([o.response_ids for o in outputs])
        response_mask = torch.cat([o.response_mask for o in outputs])
        sequences = _assemble(prompts, response_ids, response_mask, self.special.pad_id)
        engine_logprobs = None if any(o.logprobs is None for o in outputs) else torch.cat([o.logprobs for o in outputs])
        return Rollout(sequences, examples, self.decode_responses(response_ids, response_mask), engine_logprobs,
                       seconds)

    def _seeded(self, sampling: SamplingParams, rank: int, sampling_round: int = 0) -> SamplingParams:
        if sampling.greedy:
            return sampling
        seed = sampling_seed(self.cfg.rollout_seed, self.iteration, rank)
        return dataclasses.replace(sampling, seed=derived_seed(seed, sampling_round) if sampling_round else seed)

    def decode_responses(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        return decode_responses(self.tokenizer, self.special, response_ids, response_mask)

    def score(self, rollout: Rollout, rewards: RewardScores) -> Scores:
        """One model at a time, each on its own shards: old log-probs, ref log-probs, values (with a
        critic); the rewards were scored with the sampling (SCORE_REWARD)."""
        out: dict[str, torch.Tensor] = {}
        for phase in self.plan_phases(SCORE_CALLS):
            with self.phase(phase):
                role, method, name = SCORE_CALLS[phase]
                out[name] = self._sharded(getattr(self.roles, role), method, rollout.sequences)
        return Scores(reward=rewards.total, reward_terms=rewards.terms, **out)

    def make_experience(self, rollout: Rollout, scores: Scores) -> tuple[Experience, dict[str, float]]:
        """KL-shaped token rewards here; the estimator (GAE through ops.gae, whitening) on the
        advantage role's ranks, each on its shard of whole groups. Returns the experience and its
        reward, KL (and critic) metrics."""
        algo, mask = self.cfg.algo, rollout.sequences.action_mask
        kl = (None if scores.old_logprobs is None or scores.ref_logprobs is None
              else kl_penalty(scores.old_logprobs, scores.ref_logprobs, algo.kl_estimator))
        in_reward = kl is not None and algo.kl_in == KLPlacement.REWARD
        rewards = token_rewards(scores.reward, kl if in_reward else None, mask, self.kl.value)
        group = self.roles.advantage
        batch = AdvantageBatch(rewards, mask.float(), scores.values)
        outs = group.call_each("advantages", [(shard,) for shard in batch.shard(group.world_size)])
        advantages = torch.cat([o.advantages for o in outs])
        returns = torch.cat([o.returns for o in outs]) if scores.values is not None else None
        tis = self.tis(rollout, scores)
        truncated = self.truncated(rollout)
        # After the advantages: a truncated response still counts in its group's statistics.
        trained = dapo.without_rows(rollout.sequences, truncated) if algo.mask_truncated else rollout.sequences
        experience = Experience.build(trained, old_logprobs=scores.old_logprobs,
                                      ref_logprobs=scores.ref_logprobs, rewards=rewards, advantages=advantages,
                                      values=scores.values, returns=returns,
                                      tis_weights=None if tis is None else tis.weights)
        stats = {**self.reward_stats(scores.reward, experience, kl), **term_metrics(scores.reward_terms)}
        if tis is not None:
            stats.update(tis_metrics(tis, mask))
        if algo.mask_truncated:
            stats["rollout/masked_truncated"] = float(truncated.sum())
        if returns is not None:
            stats.update(critic_stats(scores.values, returns, mask))
        return experience, stats

    def tis(self, rollout: Rollout, scores: Scores) -> TISWeights | None:
        """algo.tis_cap's weights min(pi_old / pi_engine, C) per token, or None when off."""
        cap = self.cfg.algo.tis_cap
        if cap is None:
            return None
        if rollout.engine_logprobs is None:
            raise ConfigError("algo.tis_cap", cap, f"null with rollout.engine={self.cfg.rollout.engine.value}: "
                              "this engine returns no sampled-token log-probs")
        return tis_weights(scores.old_logprobs, rollout.engine_logprobs, rollout.sequences.action_mask, cap)

    def truncated(self, rollout: Rollout) -> torch.Tensor:
        """[B] True for responses that reached rollout.max_new_tokens without a stop token."""
        mask = rollout.sequences.action_mask
        return ~(is_stop(rollout.sequences.responses, self.special.eos_ids) & (mask == 1)).any(-1)

    def reward_stats(self, scores: torch.Tensor, experience: Experience, kl: torch.Tensor | None) -> dict[str, float]:
        """Rewards before (`reward/mean`) and after KL shaping (`reward/shaped_mean`), and the KL (when
        both log-probs were scored before training)."""
        maskf = experience.sequences.action_mask.float()
        stats = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std(correction=0)),
                 "reward/shaped_mean": float(sequence_scores(experience.rewards, maskf).mean()), "kl/coef": self.kl.value}
        if kl is not None:
            stats["kl/mean"] = float(masked_mean(kl, maskf))
            stats["kl/sequence_mean"] = sequence_kl(experience, self.cfg.algo.kl_estimator)
        return stats

    def train(self, phase: Phase, experience: Experience) -> dict[str, float]:
        role = TRAIN_ROLES[phase]
        group = getattr(self.roles, role)
        shards = [experience.select(rows) for rows in self.shard_rows(experience.sequences, group.world_size)]
        extra = {"kl_coef": self.kl.value} if role == "actor" else {}
        return mean_over_ranks(group.call_each("train", [(shard, self.iteration) for shard in shards], **extra))

    def sync_weights(self) -> dict[str, float]:
        """Actor -> engines, bucket by bucket: actor rank i hands each bucket to the engine worker on
        GPU i; the driver passes handles only (rollout/sync_driver.py). Returns the sync's metrics."""
        r = self.cfg.rollout
        if self._sync_transport is None:  # decided once, before the first sync
            self._sync_transport = choose_transport(self.roles.actor, self.roles.rollout, r.weight_sync_transport.value,
                                                    r.tensor_parallel_size)
        stats = sync_weights(self.roles.actor, self.roles.rollout, r.tensor_parallel_size, slots=r.weight_sync_slots,
                             transport=self._sync_transport)
        return stats.metrics()

    # -- scoring helpers ----------------------------------------------------------------------
    def sequence_rewards(self, rollout: Rollout) -> RewardScores:
        if self.roles.reward is not None:
            return RewardScores(self._sharded(self.roles.reward, "score", rollout.sequences), {})
        labels = [e.label for e in rollout.examples]
        metadata = [e.metadata or {} for e in rollout.examples]
        return self.rule_reward([e.prompt for e in rollout.examples], rollout.responses, labels, metadata)

    def _sharded(self, group, method: str, seq: Sequences) -> torch.Tensor:
        rows = self.shard_rows(seq, group.world_size)
        outs = group.call_each(method, [(seq.select(r),) for r in rows])
        result = outs[0].new_empty((len(seq), *outs[0].shape[1:]))
        result[torch.cat(rows)] = torch.cat(outs)
        return result

    def shard_rows(self, seq: Sequences, num_shards: int) -> list[torch.Tensor]:
        """Each rank's rows: contiguous equal shards, or under a token budget equal-size shards with
        balanced real-token sums (algo/packing.py), so no rank waits on another's longer micro-batches."""
        if self.cfg.train.max_tokens_per_micro_batch is None:
            return [torch.arange(rows.start, rows.stop) for rows in equal_slices(len(seq), num_shards)]
        if self.cfg.train.prefix_sharing:  # whole groups per rank, so each prompt is packed once (algo/prefix_sharing.py)
            return [torch.tensor(rows) for rows in group_shards(seq, num_shards)]
        return [torch.tensor(rows) for rows in balanced_shards(real_lengths(seq), num_shards)]

    # -- outside the iteration ----------------------------------------------------------------
    def evaluate(self, examples: list[Example]) -> dict[str, float]:
        """Greedy responses to held-out prompts, scored like rollouts (accuracy for 0/1 rewards)."""
        with self.phase(Phase.GENERATE, record=False):
            rollout = self.generate(examples, SamplingParams(self.cfg.rollout.max_new_tokens, temperature=0.0))
        lengths = {"eval/response_tokens": float(rollout.sequences.action_mask.sum(-1).float().mean())}
        if self.roles.reward is None:  # a rule reward runs here in the driver: no phase change
            scores = self.sequence_rewards(rollout).total
            self.eval_is_accuracy &= bool(((scores == 0) | (scores == 1)).all())
            return {EVAL_METRIC: float(scores.mean()), **lengths}
        with self.phase(Phase.SCORE_REWARD, record=False):
            scores = self.sequence_rewards(rollout).total
        # Scoring put the engine to sleep (level 2 discards its weights), but the next GENERATE
        # expects the actor's weights in the engine: sync them again.
        self.resync_engines()
        return {EVAL_METRIC: float(scores.mean()), **lengths}

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the driver-side loop must carry over a resume (the iteration, the KL coefficient);
        the trained roles' state goes through DeepSpeed instead."""
        return {"iteration": self.iteration, "kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])

    def save_roles(self, directory: str) -> dict[str, float]:
        """Every trained role's DeepSpeed checkpoint, one role resident at a time; returns the timings."""
        self._phase_times = {}
        for phase in self.plan_phases(CHECKPOINT_PHASES):  # no CHECKPOINT_CRITIC without a critic
            with self.phase(phase):
                role, path = CHECKPOINT_ROLES[phase], f"{directory}/{CHECKPOINT_ROLES[phase]}"
                check_written_files(Path(path), role, self.roles_of(phase).call("save_checkpoint", path))
        return {k: v for k, v in self._phase_times.items() if k.startswith("time/")}

    def load_roles(self, directory: str) -> None:
        """Restore what `save_roles` wrote (resume); the engines need a SYNC afterwards."""
        for phase in self.plan_phases(CHECKPOINT_PHASES):
            with self.phase(phase, record=False):
                self.roles_of(phase).call("load_checkpoint", f"{directory}/{CHECKPOINT_ROLES[phase]}")

    def roles_of(self, phase: Phase):
        """The role group a training or saving phase is for."""
        return getattr(self.roles, {**TRAIN_ROLES, **CHECKPOINT_ROLES}[phase])

    def resync_engines(self) -> None:
        """A SYNC outside the iteration: engines start without weights, and GENERATE expects them."""
        with self.phase(Phase.SYNC, record=False):
            self.sync_weights()

    def sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)

    def log_samples(self, rollout: Rollout, scores: Scores) -> None:
        if self.samples is not None:
            self.samples.write(self.iteration + 1, [e.prompt for e in rollout.examples], rollout.responses,
                               scores.reward.tolist(), [e.label for e in rollout.examples])

    def rollout_metrics(self, rollout: Rollout, scores: Scores) -> dict[str, float]:
        """The samples' lengths and endings, the engines' speed, and how far the engines' log-probs
        are from the actor's (when the engines return them)."""
        mask = rollout.sequences.action_mask
        lengths = mask.sum(-1).float()
        stats = {"rollout/truncated_frac": float(self.truncated(rollout).float().mean()),
                 "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
                 "response/clip_ratio": float((lengths >= self.cfg.rollout.max_new_tokens).float().mean()),
                 "rollout/tokens_per_s": float(mask.sum()) / rollout.generate_s}
        if rollout.engine_logprobs is not None and scores.old_logprobs is not None:
            stats["rollout/logprob_diff_max"] = logprob_diff_max(rollout.engine_logprobs, scores.old_logprobs, mask)
        return stats

    def throughput(self, rollout: Rollout, seconds: float) -> dict[str, float]:
        """Whole-iteration time, and real (non-pad) tokens per second per GPU over it."""
        tokens = float(rollout.sequences.attention_mask.sum())
        return {"time/step": seconds, "time/tokens_per_s_per_gpu": tokens / seconds / self.cfg.placement.world_size}

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
        if record:  # summed: dynamic sampling enters GENERATE and SCORE_REWARD once per round
            times = self._phase_times
            times[f"time/{phase.value}"] = times.get(f"time/{phase.value}", 0.0) + time.perf_counter() - start
            times[f"time/{phase.value}_moves"] = times.get(f"time/{phase.value}_moves", 0.0) + sum(m.seconds for m in moves)
            for field, gib in peak_memory(moves).items():
                self._phase_times[f"memory/{phase.value}/{field}"] = gib


def decode_responses(tokenizer, special: SpecialTokens, response_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> list[str]:
    """Text before the first stop token (any EOS id), without special tokens, as the reward
    contract says. An id past the tokenizer (padded vocab rows) has no text and decodes to ''."""
    lengths = response_mask.sum(-1).tolist()
    rows = [ids[:n].tolist() for ids, n in zip(response_ids, lengths)]
    rows = [r[:-1] if r and r[-1] in special.eos_ids else r for r in rows]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _cat_rewards(rounds: list[RewardScores], picks: list[torch.Tensor]) -> RewardScores:
    """The rewards of the rows `picks` of each round, as one batch."""
    total = torch.cat([r.total[rows] for r, rows in zip(rounds, picks)])
    return RewardScores(total, {k: torch.cat([r.terms[k][rows] for r, rows in zip(rounds, picks)]) for k in rounds[0].terms})


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


def critic_stats(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The rollout's values against their GAE returns: explained variance 1 − Var(R − V) / Var(R)
    over response tokens (1: perfect, 0: no better than a constant, < 0: worse), and the mean return."""
    maskf = mask.float()
    var_returns = masked_mean((returns - masked_mean(returns, maskf)).square(), maskf)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, maskf)).square(), maskf)
    explained = 1.0 - var_residual / var_returns if var_returns > 0 else torch.tensor(0.0)
    return {"critic/value_mean": float(masked_mean(values, maskf)), "critic/explained_variance": float(explained),
            "critic/return_mean": float(masked_mean(returns, maskf))}
