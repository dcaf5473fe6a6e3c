"""Will this config fit? Per-phase, per-GPU memory estimated from the models' config.json alone.

`estimate(cfg)` walks the phase plan (`memory/plan.py`, whatever phases it holds) and the roles
the placement runs, and adds up, for every phase and every role on one GPU:

* the states the plan keeps resident, per rank (the same components the residency adapters
  count, so the profiler can compare them one to one);
* the transient working set of the phase that uses the role (activations, logits, gradients,
  ZeRO-3 gathers, weight-sync buckets);
* the fixed costs of colocation: a CUDA context per role process, a NCCL communicator per
  multi-rank role group. They stay whatever is offloaded.

Host memory: every offloaded state sits in pinned host memory, once per rank, on the one node.

The formulas are below, one term per line, each with its arithmetic and source. Ψ is a model's
parameter count, w its parameter bytes (2 for bf16, 4 for fp32), N the ranks of a role, T = P + R
the prompt + response tokens of a sequence, b the micro-batch. A GPU estimate is an upper bound
of the tensors and a best guess of the allocator's overheads; `hybrid-ppo profile` measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from hybrid_ppo.config import Config, DType, EngineKind, ExecutorKind
from hybrid_ppo.memory.plan import Phase, ResidentStates, Role, State, phase_plan, resident, resident_everything
from hybrid_ppo.memory.shapes import ModelKind, ModelShape, model_shape

GIB = 1 << 30

# -- constants with their sources ----------------------------------------------------------------
ADAM_BYTES_PER_PARAM = 8  # exp_avg + exp_avg_sq in fp32 (ZeRO paper, Rajbhandari et al. 2020, §3.1: K = 12 = 4 + 8)
MASTER_BYTES_PER_PARAM = 4  # fp32 master copy; DeepSpeed keeps it in fp32 runs too (a clone of the partition)
ZERO_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements (zero/config.py)
ZERO3_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size, in elements
CUDA_CONTEXT_BYTES = 512 << 20  # one CUDA context + cuBLAS workspace per process: ~0.5 GiB on H100 (typical; gpu_check measures)
NCCL_COMMUNICATOR_BYTES = 256 << 20  # NCCL_BUFFSIZE 4 MiB x 2 directions x up to 32 channels per communicator
# (without NVLS, which role_process.py turns off: it would add ~288 MiB per rank on H100/H200, vllm#9699)
PROCESS_HOST_BYTES = 1 << 30  # pageable host memory of one role process (torch + libraries; ~0.5 GiB measured on CPU)
UTILIZATION_STEP = 0.01  # resolution of the largest gpu_memory_utilization reported


def dtype_bytes(dtype: DType) -> int:
    return 2 if dtype == DType.BF16 else 4


ROLE_MODEL_KIND = {Role.ACTOR: ModelKind.CAUSAL_LM, Role.CRITIC: ModelKind.VALUE, Role.REFERENCE: ModelKind.CAUSAL_LM,
                   Role.REWARD: ModelKind.CLASSIFIER, Role.ROLLOUT: ModelKind.CAUSAL_LM}
TRAINED = (Role.ACTOR, Role.CRITIC)
HAS_LOGITS = (Role.ACTOR, Role.REFERENCE)  # log-probs over the vocabulary; the critic and RM have 1-wide heads


def role_model_specs(cfg: Config) -> dict[Role, str]:
    m = cfg.model
    specs = {Role.ACTOR: m.actor, Role.ROLLOUT: m.actor, Role.CRITIC: m.critic or m.actor,
             Role.REFERENCE: m.reference or m.actor}
    if m.reward_model is not None:
        specs[Role.REWARD] = m.reward_model
    return specs


@dataclass(frozen=True)
class Setting:
    """Everything the formulas read, so a what-if (another micro-batch) is one `replace`."""

    ranks: int  # ranks per role, all nodes (1 under the local executor): what ZeRO shards over
    ranks_per_node: int  # ranks per role on one node: what shares that node's host memory
    processes_per_gpu: int  # role processes sharing one GPU (each has a CUDA context)
    zero_stage: int
    w: int  # parameter bytes
    micro: int
    token_budget: int | None  # train.max_tokens_per_micro_batch: a micro-batch's real tokens (packed), or None
    prompt: int  # P
    response: int  # R
    checkpointing: bool
    engine: EngineKind
    tp: int
    gpu_bytes: int
    utilization: float
    sleep_level: int
    sync_bucket: int
    sync_slots: int
    engine_batch: int  # sequences one rollout engine generates at once

    @classmethod
    def of(cls, cfg: Config, roles: Iterable[Role]) -> Setting:
        local = cfg.placement.executor == ExecutorKind.LOCAL
        ranks = 1 if local else cfg.placement.world_size
        return cls(ranks=ranks, ranks_per_node=1 if local else cfg.placement.num_gpus,
                   processes_per_gpu=1 if local else len(list(roles)), zero_stage=cfg.train.zero_stage,
                   w=dtype_bytes(cfg.model.dtype), micro=cfg.train.micro_batch_size,
                   token_budget=cfg.train.max_tokens_per_micro_batch, prompt=cfg.data.max_prompt_tokens,
                   response=cfg.rollout.max_new_tokens, checkpointing=cfg.model.gradient_checkpointing,
                   engine=cfg.rollout.engine, tp=cfg.rollout.tensor_parallel_size,
                   gpu_bytes=int(cfg.placement.gpu_memory_gib * GIB), utilization=cfg.rollout.gpu_memory_utilization,
                   sleep_level=cfg.rollout.sleep_level, sync_bucket=cfg.rollout.weight_sync_bucket_mb << 20,
                   sync_slots=cfg.rollout.weight_sync_slots,
                   engine_batch=math.ceil(cfg.train.samples_per_iteration / (ranks // min(cfg.rollout.tensor_parallel_size, ranks))))

    @property
    def tokens(self) -> int:
        return self.prompt + self.response

    @property
    def micro_tokens(self) -> int:
        """Token positions of one micro-batch: the token budget (packed rows hold real tokens only), or
        micro rows of the padded P + R."""
        return self.token_budget if self.token_budget is not None else self.micro * self.tokens

    @property
    def micro_response_tokens(self) -> int:
        """Response positions of one micro-batch (the LM head's rows): under a budget at most the budget
        less one prompt token per sequence, bounded here by the budget itself."""
        return self.token_budget if self.token_budget is not None else self.micro * self.response


# -- resident states, per rank -----------------------------------------------------------------------
def state_bytes(role: Role, m: ModelShape, s: Setting) -> dict[State, dict[str, int]]:
    """Bytes of each state of `role` on one rank, by component (the residency adapters' names)."""
    psi, n = m.params, s.ranks
    if role in TRAINED:
        shard = math.ceil(psi / n)
        weights = {"lp_params": psi * s.w if s.zero_stage < 3 else shard * s.w}  # ZeRO-2 replicates Ψw; ZeRO-3 keeps Ψw/N (ZeRO paper, P_os+g vs P_os+g+p)
        train = {"hp_params": shard * MASTER_BYTES_PER_PARAM,  # 4Ψ/N fp32 master (ZeRO paper §3.1)
                 "optim_states": shard * ADAM_BYTES_PER_PARAM}  # 8Ψ/N Adam moments (ZeRO paper §3.1)
        if s.zero_stage == 3:
            train["lp_grads"] = shard * s.w  # Ψw/N persistent grad partitions (stage3.py grad_partitions_flat_buffer)
            train["contiguous_grad_buffer"] = ZERO_REDUCE_BUCKET * s.w  # one reduce bucket, allocated at init (stage3.py IPG)
        return {State.WEIGHTS: weights, State.TRAIN_STATE: train}
    if role == Role.ROLLOUT:
        weights = psi * s.w // s.tp  # Ψw/TP: tensor parallelism splits the engine's weights
        if s.engine == EngineKind.VLLM:
            # vLLM docs: gpu_memory_utilization bounds the engine's whole footprint (weights, activations,
            # KV cache); the KV cache gets what the weights and the profiled activation peak leave.
            kv = max(int(s.utilization * s.gpu_bytes) - weights - generate_activation_bytes(m, s), 0)
        else:
            kv = 0  # transformers allocates its cache inside generate(): a working-set term, not a state
        return {State.WEIGHTS: {"weights": weights}, State.KV_CACHE: {"kv_cache": kv}}
    return {State.WEIGHTS: {"params": (psi + m.buffer_elems) * s.w}}  # a frozen module: all its tensors


# -- transient working sets, per rank ----------------------------------------------------------------
def layer_activation_elems(m: ModelShape) -> int:
    """Elements one decoder layer keeps for backward, per token. Megatron's count (Korthikanti et al.
    2022, eq. 2: sbh(34 + 5as/h) bytes) redone for RMSNorm, GQA and SwiGLU, with flash attention
    (no s^2 scores) and no dropout masks: attention 3h + (q + 2kv) (norm in, qkv in, q/k/v, out),
    MLP 2h + 4I (norm in, gate/up in, gate, up, silu(gate), product)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return 3 * m.hidden + q + 2 * kv + 2 * m.hidden + 4 * m.intermediate


def train_activation_bytes(m: ModelShape, s: Setting) -> int:
    tokens = s.micro_tokens
    if s.checkpointing:
        # full recomputation: each layer's input (b T h) is kept, plus one layer's activations while it recomputes
        return (m.layers * m.hidden + layer_activation_elems(m)) * tokens * s.w
    return m.layers * layer_activation_elems(m) * tokens * s.w  # L x per-layer x b T


def forward_activation_bytes(m: ModelShape, s: Setting) -> int:
    """No grad: only a layer's input, output and its MLP intermediates are alive at once: b T (2h + 3I)."""
    return s.micro_tokens * (2 * m.hidden + 3 * m.intermediate) * s.w


def logits_bytes(m: ModelShape, s: Setting) -> int:
    """Response-only logits [b, R, V] in w bytes (roles/forward.py computes no prompt logits); the log-prob
    kernel reads them once and writes the gradient in place, plus [b, R] fp32 log-probs and entropy.
    The materialized LM-head path only: heads with a logit transform (`ModelShape.fused_head`)."""
    return s.micro_response_tokens * (m.vocab * s.w + 2 * 4)


def fused_head_bytes(m: ModelShape, s: Setting, train: bool) -> int:
    """The fused LM-head op over the b R response rows: its tiles never leave the kernel, so the terms
    are the kernel's chunk buffer and fp32 grad_W (hybrid_ppo_kernels.linear_logprobs.fused_working_bytes)."""
    from hybrid_ppo_kernels.linear_logprobs import fused_working_bytes

    return fused_working_bytes(s.micro_response_tokens, m.vocab, m.hidden, s.w, train)


def head_terms(m: ModelShape, s: Setting, train: bool) -> dict[str, int]:
    """The LM head's working set, under the key of the path the roles take for this model."""
    if m.fused_head:
        return {"fused_lm_head": fused_head_bytes(m, s, train)}
    return {"logits": logits_bytes(m, s)}


def lm_head_description(m: ModelShape, s: Setting) -> str:
    """One line for `hybrid-ppo plan`: which LM-head path a model takes, and its size."""
    from hybrid_ppo_kernels.linear_logprobs import CUDA_CHUNK_BYTES, default_chunk_size

    rows = s.micro_response_tokens
    if m.fused_head:
        return (f"fused (no [b, R, V] logits): {rows} response rows, backward in chunks of "
                f"{min(rows, default_chunk_size(m.vocab, CUDA_CHUNK_BYTES))} x V={m.vocab}")
    return f"materialized [b, R, V] = [{s.micro}, {s.response}, {m.vocab}] logits: {', '.join(m.logit_transforms)}"


def zero3_gather_bytes(m: ModelShape, s: Setting) -> int:
    """ZeRO-3 gathers whole modules: the biggest one (a layer or the embedding) + the prefetch bucket."""
    return (m.largest_block + ZERO3_PREFETCH_BUCKET) * s.w if s.zero_stage == 3 and s.ranks > 1 else 0


def generate_activation_bytes(m: ModelShape, s: Setting) -> int:
    """One decode step's working set for an engine's batch: hidden + MLP intermediates + fp32 logits."""
    return s.engine_batch * (2 * m.hidden + 3 * m.intermediate) * s.w + s.engine_batch * m.vocab * 4


def hf_kv_cache_bytes(m: ModelShape, s: Setting) -> int:
    """transformers' cache for the engine's batch: 2 (K, V) x L x kv_heads x head_dim x T x batch x w."""
    return 2 * m.layers * m.kv_heads * m.head_dim * s.tokens * s.engine_batch * s.w


def working_bytes(phase: Phase, role: Role, m: ModelShape, s: Setting,
                  plan_phase: Mapping[Role, frozenset[State]]) -> dict[str, int]:
    """The transient terms of `role` in `phase`. Phases are recognised by the plan's naming
    (`train_<role>`, `score_<role>`) and by what they hold (engine weights without its KV cache: a
    weight sync: actor and engine weights only), so any other phase (SAVE_*) is estimated by what it
    keeps resident."""
    terms: dict[str, int] = {}
    if phase.value == f"train_{role.value}":
        terms["activations"] = train_activation_bytes(m, s)
        if role in HAS_LOGITS:
            terms.update(head_terms(m, s, train=True))
        if s.zero_stage < 3:
            terms["lp_grads"] = math.ceil(m.params / s.ranks) * s.w  # Ψw/N reduced grad partition (ZeRO-2)
            terms["reduce_bucket"] = min(ZERO_REDUCE_BUCKET, m.params) * s.w  # contiguous-gradients bucket (ZeRO-2)
        terms["zero3_gather"] = zero3_gather_bytes(m, s)
    elif phase.value == f"score_{role.value}":
        terms["activations"] = forward_activation_bytes(m, s)
        if role in HAS_LOGITS:
            terms.update(head_terms(m, s, train=False))
        if role in TRAINED:
            terms["zero3_gather"] = zero3_gather_bytes(m, s)
    elif role == Role.ROLLOUT and State.KV_CACHE in plan_phase.get(role, frozenset()):
        if s.engine == EngineKind.HF:
            terms["kv_cache"] = hf_kv_cache_bytes(m, s)
        # vLLM: weights + KV cache + these activations = gpu_memory_utilization x the GPU (state_bytes)
        terms["activations"] = generate_activation_bytes(m, s)
    elif role == Role.ACTOR and plan_phase.get(role) == plan_phase.get(Role.ROLLOUT) == frozenset({State.WEIGHTS}):
        # The largest bucket: whole layers up to the bucket size, or one unit bigger than it (often
        # the embedding). `slots` staging buffers of it (rollout/weight_sync.py), and under ZeRO-3
        # the gathered bucket they are copied from.
        bucket = max(min(s.sync_bucket, m.params * s.w), m.largest_block * s.w)
        terms["sync_buckets"] = bucket * (s.sync_slots + (1 if s.zero_stage == 3 and s.ranks > 1 else 0))
    return {k: v for k, v in terms.items() if v}


def fixed_bytes(role: Role, s: Setting, first_on_gpu: bool) -> dict[str, int]:
    """What a role process costs on its GPU whatever is offloaded."""
    terms = {}
    if s.processes_per_gpu > 1 or first_on_gpu:
        terms["cuda_context"] = CUDA_CONTEXT_BYTES  # one per process (under the local executor: one in all)
    if s.ranks > 1 and role != Role.ROLLOUT:
        terms["nccl"] = NCCL_COMMUNICATOR_BYTES  # each role forms its own process group (role_process.py)
    return terms


# -- the estimate ------------------------------------------------------------------------------------
@dataclass
class PhaseEstimate:
    roles: dict[str, dict[str, int]]  # role -> term -> bytes on one GPU
    host: dict[str, int]  # role -> pinned bytes of its offloaded states on the node (all ranks)
    host_pageable: int = 0  # the role processes themselves (libraries, Python heaps), on the node

    @property
    def gpu_total(self) -> int:
        return sum(sum(t.values()) for t in self.roles.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values()) + self.host_pageable


@dataclass
class MemoryPlan:
    gpu_bytes: int
    host_bytes: int
    setting: Setting
    states: dict[str, dict[str, dict[str, int]]]  # role -> state -> component -> bytes per rank
    phases: dict[str, PhaseEstimate] = field(default_factory=dict)
    max_gpu_memory_utilization: float | None = None
    max_micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None  # with a token budget set: the largest that fits
    lm_head: dict[str, str] = field(default_factory=dict)  # role -> its LM-head path (lm_head_description)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p].gpu_total)

    @property
    def peak_bytes(self) -> int:
        return self.phases[self.peak_phase].gpu_total

    @property
    def host_peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p].host_total)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_bytes and self.phases[self.host_peak_phase].host_total <= self.host_bytes

    def verdict(self) -> str:
        gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
        host = self.phases[self.host_peak_phase].host_total
        if self.peak_bytes > self.gpu_bytes:
            return (f"does not fit: phase {self.peak_phase} needs {gib(self.peak_bytes - self.gpu_bytes)} more "
                    f"({gib(self.peak_bytes)} of {gib(self.gpu_bytes)} per GPU)")
        if host > self.host_bytes:
            return (f"does not fit: host memory at phase {self.host_peak_phase} needs {gib(host - self.host_bytes)} "
                    f"more ({gib(host)} of {gib(self.host_bytes)} pinned on the node)")
        return f"fits: peak {gib(self.peak_bytes)} of {gib(self.gpu_bytes)} at phase {self.peak_phase}"

    def as_dict(self) -> dict[str, Any]:
        to_gib = lambda terms: {k: v / GIB for k, v in terms.items()}  # noqa: E731
        return {
            "gpu_memory_gib": round(self.gpu_bytes / GIB, 3), "host_memory_gib": round(self.host_bytes / GIB, 3),
            "fits": self.fits, "verdict": self.verdict(),
            "peak_phase": self.peak_phase, "peak_gib": self.peak_bytes / GIB,
            "host_peak_phase": self.host_peak_phase, "host_peak_gib": self.phases[self.host_peak_phase].host_total / GIB,
            "max_gpu_memory_utilization": self.max_gpu_memory_utilization,
            "max_micro_batch_size": self.max_micro_batch_size,
            "max_tokens_per_micro_batch": self.max_tokens_per_micro_batch,
            "ranks_per_role": self.setting.ranks, "ranks_per_node": self.setting.ranks_per_node,
            "lm_head": self.lm_head,
            "states_bytes_per_rank": self.states,
            "phases": {p: {"gpu_total_gib": e.gpu_total / GIB, "host_total_gib": e.host_total / GIB,
                           "roles_gib": {r: to_gib(t) for r, t in e.roles.items()}, "host_pinned_gib": to_gib(e.host),
                           "host_pageable_gib": e.host_pageable / GIB}
                       for p, e in self.phases.items()},
        }

    def table(self) -> str:
        roles = list(self.states)
        header = f"{'phase':<16}" + "".join(f"{r:>11}" for r in roles) + f"{'per GPU':>11}{'host':>10}"
        lines = ["estimated memory per GPU by phase (GiB; host: one node's pinned + pageable, all its ranks)", header]
        for phase, e in self.phases.items():
            cells = "".join(f"{sum(e.roles[r].values()) / GIB:>11.2f}" for r in roles)
            mark = " <- peak" if phase == self.peak_phase else ""
            lines.append(f"{phase:<16}{cells}{e.gpu_total / GIB:>11.2f}{e.host_total / GIB:>10.1f}{mark}")
        peak = self.phases[self.peak_phase]
        lines.append(f"\nat the peak ({self.peak_phase}), per GPU:")
        for role, terms in peak.roles.items():
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in terms.items() if v)
            lines.append(f"  {role:<10} {parts or '-'}")
        host = self.phases[self.host_peak_phase]
        lines.append(f"host at its peak ({self.host_peak_phase}), per node, its {self.setting.ranks_per_node} rank(s): "
                     "pinned "
                     + ", ".join(f"{r} {b / GIB:.1f}" for r, b in host.host.items() if b)
                     + f"; pageable (role processes) {host.host_pageable / GIB:.1f}")
        lines.extend(f"LM head ({role}): {path}" for role, path in self.lm_head.items())
        lines.append(self.verdict())
        util = self.max_gpu_memory_utilization
        lines.append(f"largest rollout.gpu_memory_utilization that fits: "
                     f"{'n/a (HF engine)' if util is None and self.setting.engine == EngineKind.HF else util}")
        if self.setting.token_budget is not None:
            lines.append(f"largest train.max_tokens_per_micro_batch that fits: {self.max_tokens_per_micro_batch}")
        else:
            lines.append(f"largest train.micro_batch_size that fits: {self.max_micro_batch_size}")
        return "\n".join(lines)


def estimate(cfg: Config, roles: Iterable[str] | None = None) -> MemoryPlan:
    """The plan's phases x the placement's roles, from the models' config.json (meta device only)."""
    from hybrid_ppo.placement import make_plan

    present = [Role(r) for r in (roles if roles is not None else make_plan(cfg).roles)]
    specs = role_model_specs(cfg)
    shapes = {role: model_shape(specs[role], ROLE_MODEL_KIND[role]) for role in present}
    score_actor = cfg.scores_old_logprobs
    plan = phase_plan(present, score_actor) if cfg.memory.offload else resident_everything(present, score_actor)
    setting = Setting.of(cfg, present)
    result = _estimate(plan, shapes, setting, int(cfg.placement.host_memory_gib * GIB))
    result.lm_head = {role.value: lm_head_description(shapes[role], setting) for role in present if role in HAS_LOGITS}
    if setting.token_budget is not None:
        result.max_tokens_per_micro_batch = _largest_token_budget(cfg, plan, shapes, setting, result.host_bytes)
    else:
        result.max_micro_batch_size = _largest_micro_batch(cfg, plan, shapes, setting, result.host_bytes)
    if setting.engine == EngineKind.VLLM:
        result.max_gpu_memory_utilization = _largest_utilization(plan, shapes, setting, result.host_bytes)
    return result


def _estimate(plan: Mapping[Phase, ResidentStates], shapes: dict[Role, ModelShape], s: Setting,
              host_bytes: int) -> MemoryPlan:
    states = {role: state_bytes(role, m, s) for role, m in shapes.items()}
    result = MemoryPlan(s.gpu_bytes, host_bytes, s,
                        {r.value: {st.value: dict(c) for st, c in by_state.items()} for r, by_state in states.items()})
    for phase in plan:
        roles, host = {}, {}
        for i, (role, m) in enumerate(shapes.items()):
            keep = resident(plan, phase, role)
            terms = fixed_bytes(role, s, first_on_gpu=i == 0)
            for state, components in states[role].items():
                if state in keep:
                    terms.update({f"{state.value}.{k}": v for k, v in components.items()})
            terms.update(working_bytes(phase, role, m, s, plan[phase]))
            roles[role.value] = terms
            host[role.value] = s.ranks_per_node * sum(_host_copy(role, state, components, s)
                                             for state, components in states[role].items() if state not in keep)
        processes = s.ranks_per_node * s.processes_per_gpu  # a process per role rank on the node (one: local executor)
        result.phases[phase.value] = PhaseEstimate(roles, host, processes * PROCESS_HOST_BYTES)
    return result


def pinned_block_bytes(nbytes: int) -> int:
    """What a pinned host block of `nbytes` really takes: torch's caching host allocator rounds every
    block up to a power of two (aten/src/ATen/core/CachingHostAllocator.h, `PowerOf2Ceil` in
    `allocate`), so Qwen2.5-7B's 1.09 GB embedding pins 2 GiB. Each component below is one flat block: a
    DeepSpeed flat buffer (its offload_states pins each with `pin_memory()`), a frozen role's one
    host buffer (memory/residency.py `ModuleResidency`), and Adam's two moments (two blocks of half
    the size round to the same total)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def _host_copy(role: Role, state: State, components: dict[str, int], s: Setting) -> int:
    """Bytes an offloaded state occupies in pinned host memory, per rank, as pinned blocks."""
    if role == Role.ROLLOUT:
        # vLLM sleep level 1 copies the weights to pinned host memory and discards the KV cache;
        # level 2 discards both (the next SYNC refills the weights). One engine per TP ranks.
        return pinned_block_bytes(components.get("weights", 0)) if s.sleep_level == 1 and state == State.WEIGHTS else 0
    if state == State.TRAIN_STATE:  # the grad bucket is freed, not copied
        return sum(pinned_block_bytes(v) for k, v in components.items() if k != "contiguous_grad_buffer")
    return sum(pinned_block_bytes(v) for v in components.values())  # pinned full copies per rank


def _largest_micro_batch(cfg: Config, plan, shapes, s: Setting, host_bytes: int) -> int | None:
    """The largest micro-batch the config accepts (micro x GPUs divides mini_batch_size) that fits."""
    valid = [m for m in range(1, cfg.train.mini_batch_size + 1)
             if cfg.train.mini_batch_size % (m * cfg.placement.world_size) == 0]
    for micro in sorted(valid, reverse=True):
        if _estimate(plan, shapes, replace(s, micro=micro), host_bytes).fits:
            return micro
    return None


def _largest_token_budget(cfg: Config, plan, shapes, s: Setting, host_bytes: int) -> int | None:
    """The largest token budget that fits, from the longest sequence a rollout makes (the least the
    config accepts) up to a whole rank's share of a mini-batch at full length; memory grows with the
    budget, so a bisection finds it. None: not even the longest sequence fits."""
    fits = lambda budget: _estimate(plan, shapes, replace(s, token_budget=budget), host_bytes).fits  # noqa: E731
    low, high = s.tokens, max(s.tokens, cfg.train.mini_batch_size // cfg.placement.world_size * s.tokens)
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _largest_utilization(plan, shapes, s: Setting, host_bytes: int) -> float | None:
    """Largest gpu_memory_utilization (to 0.01) at which every phase fits; the KV cache grows with it."""
    best = None
    for step in range(1, int(round(1 / UTILIZATION_STEP)) + 1):
        util = round(step * UTILIZATION_STEP, 2)
        trial = _estimate(plan, shapes, replace(s, utilization=util), host_bytes)
        kv = trial.states[Role.ROLLOUT.value][State.KV_CACHE.value]["kv_cache"]
        if kv > 0 and trial.fits:
            best = util
    return best
