"""What the actor and critic share: a DeepSpeed engine trained for epochs x micro-batches, and the
ADVANTAGE phase, which runs on the critic's ranks (the actor's without a critic) on their devices."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from hybrid_ppo.algo.advantages import Advantages
from hybrid_ppo.algo.estimators import AdvantageBatch, estimate
from hybrid_ppo.algo.experience import Experience
from hybrid_ppo.algo.loss_norm import mini_batch_norms
from hybrid_ppo.algo.packing import equal_bins, real_lengths
from hybrid_ppo.algo.prefix_sharing import equal_unit_bins, group_units, prompt_groups
from hybrid_ppo.algo.ppo import LossNorm
from hybrid_ppo.checkpoint import files_under
from hybrid_ppo.config import Config
from hybrid_ppo.errors import Diverged
from hybrid_ppo.memory.residency import DeepSpeedResidency
from hybrid_ppo.metrics import combine
from hybrid_ppo.role_process import ResidentRole, init_distributed, role_device
from hybrid_ppo.roles.deepspeed_engine import build_engine
from hybrid_ppo.roles.forward import check_packing, in_micro_batches
from hybrid_ppo.roles.shared_mask import resolve_prefix_sharing
from hybrid_ppo.seeding import derived_seed

CHECKPOINT_TAG = "state"
"""DeepSpeed's tag (sub-directory) inside a role's checkpoint directory."""


class TrainingDiverged(Diverged):
    """Too many optimizer steps in a row skipped for a non-finite loss."""


class TrainedRole(ResidentRole):
    """A DeepSpeed-wrapped model with a PPO update loop; subclasses supply the loss."""

    name = "trained"

    def __init__(self, cfg: Config, dist, lr: float, load: Callable[[], nn.Module]):
        init_distributed(dist)
        self.cfg, self.rank, self.world_size = cfg, dist.rank, dist.world_size
        self.device = role_device()
        torch.manual_seed(cfg.train.seed + dist.rank)
        self.engine = build_engine(cfg, dist.world_size, lr, load)
        self.residency = DeepSpeedResidency(self.engine)
        if cfg.train.packing:
            check_packing(self.engine.module, self.name)
        self.shared = resolve_prefix_sharing(cfg.train, self.engine.module, self.name, dist.rank)  # algo/prefix_sharing.py
        self.skipped_in_a_row = 0  # optimizer steps skipped for a non-finite loss since the last real one
        self.poisoned = False  # a micro-batch of the optimizer step being accumulated had a non-finite loss

    def loss(self, micro: Experience, norm: LossNorm, **loss_args: float) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of its mini-batch's loss (`norm`), and detached diagnostics."""
        raise NotImplementedError

    def early_stop(self, epoch_stats: dict[str, list[float]]) -> bool:
        """Whether to skip the remaining epochs (the actor's target_kl)."""
        return False

    def train(self, experience: Experience, iteration: int, **loss_args: float) -> dict[str, float]:
        """PPO epochs over this rank's shard; DeepSpeed accumulates micro-batches into optimizer steps.
        `loss_args` go to `loss` (the actor's current KL coefficient)."""
        self.engine.train()
        # Seeded from (seed, iteration, rank): dropout and the order repeat exactly after a resume.
        torch.manual_seed(derived_seed(self.cfg.train.seed, iteration, self.rank))
        order = torch.Generator().manual_seed(derived_seed(self.cfg.train.seed, iteration))
        stats: dict[str, list[float]] = defaultdict(list)
        epochs_run, skipped = 0, 0
        for _ in range(self.cfg.train.ppo_epochs):
            epoch_stats: dict[str, list[float]] = defaultdict(list)
            micros, sizes = self.epoch_micro_batches(experience, order)
            last = None if sizes is None else {sum(sizes[:j + 1]) - 1 for j in range(len(sizes))}
            for k, (micro, norm) in enumerate(zip(micros, self.loss_norms(micros, sizes))):
                if last is not None:  # a token budget: micro-batches per optimizer step vary, so we say which is last
                    self.engine.set_gradient_accumulation_boundary(k in last)
                loss, parts = self.loss(micro, norm, **loss_args)
                finite, applied = self.step_unless_any_rank_nonfinite(loss, iteration)
                skipped += applied is False
                if finite:
                    for key, value in parts.items():
                        epoch_stats[key].append(float(value))
            epochs_run += 1
            for key, values in epoch_stats.items():
                stats[key].extend(values)
            if self.early_stop(epoch_stats):
                break
        summary = {key: combine(key, v) for key, v in stats.items()}
        summary[f"{self.name}/epochs"] = float(epochs_run)
        summary[f"{self.name}/skipped_steps"] = float(skipped)
        summary[f"{self.name}/lr"] = float(self.engine.get_lr()[0])
        return summary

    def epoch_micro_batches(self, experience: Experience, order: torch.Generator) -> tuple[list[Experience], list[int] | None]:
        """One shuffled pass over this rank's shard in micro-batches, and how many micro-batches each
        mini-batch has (None: the engine's fixed accumulation). Under a token budget a mini-batch (the
        same rows as with fixed micro-batches: this rank's mini_batch_size / world_size of the
        shuffled order) is binned into micro-batches of at most that many real tokens, the same count
        on every rank (algo/packing.py)."""
        train = self.cfg.train
        if self.shared:
            return self.group_micro_batches(experience, order)
        if train.max_tokens_per_micro_batch is None:
            return list(experience.micro_batches(train.micro_batch_size, order)), None
        perm = torch.randperm(len(experience), generator=order)  # the draw micro_batches makes
        share = train.mini_batch_size // self.world_size
        minis = [perm[start:start + share] for start in range(0, len(experience), share)]
        lengths = real_lengths(experience.sequences)
        bins = equal_bins([[lengths[i] for i in m.tolist()] for m in minis], train.max_tokens_per_micro_batch,
                          self.max_over_ranks)
        micros = [experience.select(m[torch.tensor(b)]) for m, mini_bins in zip(minis, bins) for b in mini_bins]
        return micros, [len(b) for b in bins]

    def group_micro_batches(self, experience: Experience, order: torch.Generator
                            ) -> tuple[list[Experience], list[int] | None]:
        """`epoch_micro_batches` with a shared prompt prefix: the shuffle draws groups (rows of one
        prompt, algo/prefix_sharing.py), so mini- and micro-batches hold whole groups; cut into
        micro-batches of micro_batch_size rows, or binned by distinct tokens under a token budget,
        the same count on every rank."""
        train = self.cfg.train
        groups = prompt_groups(experience.sequences)
        perm = torch.cat([torch.tensor(groups[g]) for g in torch.randperm(len(groups), generator=order).tolist()])
        share = train.mini_batch_size // self.world_size
        minis = [perm[start:start + share] for start in range(0, len(experience), share)]
        budget = train.max_tokens_per_micro_batch
        if budget is None:
            size = train.micro_batch_size
            return [experience.select(m[start:start + size]) for m in minis for start in range(0, len(m), size)], None
        seq = experience.sequences
        units = [[m[u].tolist() for u in group_units(seq.select(m), budget)] for m in minis]  # rows of `experience`
        binned = equal_unit_bins(seq, units, budget, self.max_over_ranks)
        micros = [experience.select(torch.tensor(sorted(row for u in b for row in mini_units[u])))
                  for mini_units, bins in binned for b in bins]
        return micros, [len(bins) for _, bins in binned]

    def loss_norms(self, micros: list[Experience], sizes: list[int] | None = None) -> list[LossNorm]:
        """Each micro-batch's mini-batch divisors, summed over ranks (see algo/loss_norm.py)."""
        return mini_batch_norms([m.sequences.action_mask for m in micros], self.engine.gradient_accumulation_steps(),
                                self.world_size, float(self.cfg.rollout.max_new_tokens), self.all_reduce_sum, sizes)

    def in_micro_batches(self, fn, seq) -> Tensor:
        """A scoring forward over `seq` in micro-batches (roles/forward.py), the same count on every rank."""
        train = self.cfg.train
        return in_micro_batches(fn, seq, train.micro_batch_size, train.max_tokens_per_micro_batch, self.max_over_ranks,
                                self.shared)

    def max_over_ranks(self, counts: list[int]) -> list[int]:
        """Element-wise maximum over this role's ranks (a sync point)."""
        tensor = torch.tensor(counts, dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor.tolist()

    @torch.no_grad()
    def advantages(self, batch: AdvantageBatch) -> Advantages:
        """ADVANTAGE on this rank's rows (whole groups), on its device; whitening is batch-global
        through an all-reduce of sums over this role's ranks. Needs no weights resident."""
        out = estimate(batch.to(self.device), self.cfg.algo, self.cfg.train.samples_per_prompt, self.all_reduce_sum)
        return Advantages(out.advantages.cpu(), None if out.returns is None else out.returns.cpu())

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over this role's ranks (a sync point); a copy on the role's device."""
        tensor = tensor.to(self.device, copy=True)
        if self.world_size > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def step_unless_any_rank_nonfinite(self, loss: Tensor, iteration: int) -> tuple[bool, bool | None]:
        """Backward + DeepSpeed step of one micro-batch; a non-finite loss on ANY rank discards the
        whole optimizer step it belongs to, on every rank. Returns (this loss was finite on every
        rank, whether the optimizer step was applied, or None before the accumulation boundary).

        One all-reduce of a flag (a sync point). Every rank still runs backward and step for every
        micro-batch, so the collectives and DeepSpeed's accumulation boundaries stay aligned; a bad
        micro-batch's backward carries NaN gradients on every rank, and DeepSpeed's own check at
        the boundary (a non-finite gradient norm: ZeRO-2 and 3, fp32 and bf16) then drops the
        accumulated step: no weight, optimizer or LR-schedule change (`engine.was_step_applied`).
        """
        flag = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0], device=self.device)
        torch_dist.all_reduce(flag)
        finite = float(flag) == 0.0
        if not finite:
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * float("nan")  # NaN gradients, whatever this rank's loss was
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        if not boundary:
            self.poisoned = self.poisoned or not finite
            return finite, None
        poisoned, self.poisoned = self.poisoned or not finite, False
        applied = self.engine.was_step_applied()
        if poisoned and applied:  # never train on NaN silently: the check we rely on is DeepSpeed's
            raise RuntimeError(f"{self.name}: DeepSpeed applied an optimizer step with non-finite gradients")
        if applied:
            self.skipped_in_a_row = 0
            return finite, True
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            raise TrainingDiverged(f"{self.name}: {self.skipped_in_a_row} optimizer steps in a row skipped for a "
                                   f"non-finite loss (iteration {iteration}; train.max_skipped_steps = {limit})")
        return finite, False

    def save_checkpoint(self, directory: str) -> list[str]:
        """This rank's part of DeepSpeed's checkpoint: weights, optimizer and LR-scheduler state
        (ZeRO shards per rank). Collective: every rank must call it (SAVE_* phase). Returns the
        files this rank sees under `directory` once written (paths relative to it), which the driver
        checks it sees too (`checkpoint.check_written_files`): on a second node they are there only
        if the run directory is shared."""
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False,
                                    client_state={"skipped_in_a_row": self.skipped_in_a_row})
        return files_under(Path(directory))

    def load_checkpoint(self, directory: str) -> None:
        """Restore what `save_checkpoint` wrote (on resume). Collective."""
        path, client = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{self.name} rank {self.rank}: no DeepSpeed checkpoint in {directory}")
        self.skipped_in_a_row = int(client.get("skipped_in_a_row", 0))

    def mean_across_ranks(self, value: float) -> float:
        """All ranks must agree on control flow (a ZeRO step is a collective). A sync point."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return float(tensor) / self.world_size
