"""The actor: the policy as a DeepSpeed engine. Old log-probs in SCORE, the clipped PPO update in
TRAIN_ACTOR, and the weights that SYNC sends to the rollout engines."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hybrid_ppo.algo.experience import Experience, Sequences
from hybrid_ppo.algo.ppo import KLEstimator, LossNorm, aggregate, kl_loss, masked_mean, policy_loss
from hybrid_ppo.config import Config, KLPlacement
from hybrid_ppo.ptx import PTXBatches, lm_loss, read_pretrain_texts
from hybrid_ppo.role_process import torch_dtype
from hybrid_ppo.roles.forward import response_logprobs, to_device
from hybrid_ppo.roles.deepspeed_engine import full_numel, gathered_parameters
from hybrid_ppo.roles.lm_head import FUSED, lm_head_path
from hybrid_ppo.roles.models import load_causal_lm
from hybrid_ppo.roles.trained import TrainedRole
from hybrid_ppo.rollout.weight_sync import PROBE_NAME, BucketHandle, BucketStager, bucket_plan, device_key, probe_tensor
from hybrid_ppo.seeding import derived_seed


class Actor(TrainedRole):
    name = "actor"

    def __init__(self, cfg: Config, dist, model_path: str):
        self.model_path = model_path
        self._buckets: list[list[tuple[str, Tensor]]] | None = None  # the sync in progress, bucket by bucket
        self._stager: BucketStager | None = None  # its staging buffers
        self._bundle = dist.bundles[0] if dist.bundles else None  # names its GPU on CPU (weight_sync.device_key)
        super().__init__(cfg, dist, cfg.train.actor_lr, lambda: load_causal_lm(model_path, torch_dtype(cfg.model.dtype)))
        self.ptx = self._ptx_batches() if cfg.algo.ptx_coef > 0 else None
        self.lm_head_path = lm_head_path(self.engine.module, self.name)

    def _ptx_batches(self) -> PTXBatches:
        from transformers import AutoTokenizer

        max_tokens = self.cfg.data.max_prompt_tokens + self.cfg.rollout.max_new_tokens
        return PTXBatches(read_pretrain_texts(self.cfg.data.pretrain), AutoTokenizer.from_pretrained(self.model_path),
                          self.cfg.train.micro_batch_size, max_tokens, derived_seed(self.cfg.train.seed, self.rank))

    def ptx_loss(self) -> Tensor:
        """LM loss on the next pretraining micro-batch (differentiable)."""
        ids, mask = next(self.ptx)
        return lm_loss(self.engine, ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def logprobs(self, seq: Sequences) -> Tensor:
        """[B, R] log pi_old of the sampled responses (SCORE_ACTOR)."""
        self.engine.eval()
        return self.in_micro_batches(lambda c: response_logprobs(
            self.engine, to_device(c, self.device), self.cfg.rollout.temperature, fused=self.lm_head_path == FUSED,
            packed=self.cfg.train.packing, shared=self.shared).cpu(), seq)

    def loss(self, micro: Experience, norm: LossNorm, kl_coef: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss − entropy bonus (+ KL in the loss) (+ PTX), as this micro-batch's
        share of the mini-batch (`norm`). `kl_coef`: the KL controller's current value."""
        algo = self.cfg.algo
        seq = to_device(micro.sequences, self.device)
        mask = seq.action_mask.float()
        # In-place backward (materialized path) is safe: the logits are a fresh output of lm_head, whose
        # backward needs only its input and weight, and nothing reads them after this op. It saves a
        # [B, R, V] buffer. The fused path has no such buffer at all.
        logprobs, entropy = response_logprobs(self.engine, seq, self.cfg.rollout.temperature, with_entropy=True,
                                              inplace_backward=True, fused=self.lm_head_path == FUSED,
                                              packed=self.cfg.train.packing, shared=self.shared)
        # On-policy without SCORE_ACTOR (Config.scores_old_logprobs): pi_old is this forward's, detached.
        old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs.to(self.device)
        tis = None if micro.tis_weights is None else micro.tis_weights.to(self.device)
        ppo = policy_loss(logprobs, old, micro.advantages.to(self.device),
                          mask, algo.clip_eps, algo.clip_eps_high, algo.dual_clip, algo.loss_agg, norm, tis)
        loss = ppo.loss - algo.entropy_coef * aggregate(entropy, mask, algo.loss_agg, norm)
        parts = {"loss/policy": ppo.loss.detach(), "actor/clip_frac": ppo.clip_frac,
                 "actor/approx_kl": ppo.approx_kl, "actor/entropy": masked_mean(entropy.detach(), mask),
                 "actor/ratio_max": ppo.ratio_max, "actor/ratio_min": ppo.ratio_min}
        if algo.dual_clip is not None:
            parts["actor/pg_clipfrac_lower"] = ppo.clip_frac_lower
        if algo.kl_in == KLPlacement.LOSS and micro.ref_logprobs is not None:  # None: no reference (KL off)
            kl = kl_loss(logprobs, micro.ref_logprobs.to(self.device), mask, KLEstimator(algo.kl_estimator),
                         algo.loss_agg, norm)
            loss = loss + (algo.kl_coef if kl_coef is None else kl_coef) * kl
            parts["loss/kl"] = kl.detach()
        if algo.ptx_coef > 0:
            ptx = self.ptx_loss()
            loss = loss + algo.ptx_coef * ptx
            parts["loss/ptx"] = ptx.detach()
        return loss, parts

    def early_stop(self, epoch_stats: dict[str, list[float]]) -> bool:
        target = self.cfg.algo.target_kl
        if target is None:
            return False
        kls = epoch_stats["actor/approx_kl"]
        return self.mean_across_ranks(sum(kls) / max(len(kls), 1)) > target  # every step skipped: 0

    # -- SYNC: the actor side of rollout/weight_sync.py's protocol ----------------------------
    def begin_weight_sync(self, bucket_bytes: int | None = None, slots: int = 1, transport: str = "cuda_ipc") -> int:
        """Plan this sync's buckets (whole layers, in the rollout dtype) and make sure there are
        `slots` staging buffers of the largest bucket (on CPU the last sync's are reused: see
        `BucketStager`). Every rank plans the same buckets; returns their count. `transport`: as
        `sync_driver.choose_transport` resolved it ("cuda_ipc" or "host"; on CPU always host)."""
        named = list(self.engine.module.named_parameters())
        dtype = torch_dtype(self.cfg.model.dtype)  # the engines are built in this dtype
        bucket_bytes = bucket_bytes or self.cfg.rollout.weight_sync_bucket_mb << 20
        plan = bucket_plan([n for n, _ in named], [full_numel(p) * dtype.itemsize for _, p in named], bucket_bytes)
        capacity = max(sum(full_numel(named[i][1]) for i in bucket) for bucket in plan)
        self.end_weight_sync()  # a previous sync that failed half-way leaves nothing behind
        on_host = transport == "host"
        if self._stager is None or not self._stager.fits(self.device, dtype, capacity, slots, on_host):
            self._close_stager()
            self._stager = BucketStager(self.device, dtype, capacity, slots, device_key(self.device, self._bundle), on_host)
        self._buckets = [[named[i] for i in bucket] for bucket in plan]
        return len(plan)

    def stage_bucket(self, index: int) -> BucketHandle:
        """Bucket `index` in full in this rank's staging buffer; its handle for the engine worker on
        this GPU. Collective under ZeRO-3: every rank gathers the bucket's parameters, copies them
        and releases the gather, so the gather never holds more than one bucket beyond the shard."""
        if self._buckets is None or self._stager is None:
            raise RuntimeError("stage_bucket() before begin_weight_sync()")
        chunk = self._buckets[index]
        with gathered_parameters(self.engine, [p for _, p in chunk]):
            return self._stager.stage(index, chunk)

    def stage_probe(self) -> BucketHandle | None:
        """A tiny CUDA IPC bucket for `sync_driver.choose_transport` (None on CPU: nothing to probe).
        Ended, like a sync, by `end_weight_sync`."""
        if self.device.type != "cuda":
            return None
        self.end_weight_sync()
        self._close_stager()
        self._stager = BucketStager(self.device, torch.float32, probe_tensor().numel(), 1,
                                    device_key(self.device, self._bundle))
        return self._stager.stage(0, [(PROBE_NAME, probe_tensor().to(self.device))])

    def end_weight_sync(self) -> None:
        """The sync is over: device staging buffers are freed (host ones are kept). Idempotent."""
        self._buckets = None
        if self._stager is not None and not self._stager.kept_between_syncs:
            self._close_stager()

    def _close_stager(self) -> None:
        stager, self._stager = self._stager, None
        if stager is not None:
            stager.close()

    def save(self, path: str) -> None:
        """Final HF-format checkpoint (weights + config); collective under ZeRO-3, rank 0 writes."""
        with gathered_parameters(self.engine):
            if self.rank == 0:
                state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
                self.engine.module.save_pretrained(Path(path), state_dict=state)
