"""Typed configuration: one dataclass per section, loaded from YAML plus dotted overrides.

`load_config("configs/x.yaml", ["algo.kl_coef=0.02"])` returns a validated, frozen-by-convention
`Config`. Every error is a `ConfigError` that names the full key, the value given and what is
allowed, and it is raised before anything starts. Derived values are properties, never filled
in later, so a config is not mutated after validation.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybrid_ppo.algo.types import AdvantageEstimator, KLEstimator, LossAgg
from hybrid_ppo.errors import EXIT_CONFIG, HybridPPOError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"
BUILTIN_PREFIX = "builtin:"


class ConfigError(HybridPPOError, ValueError):
    """A bad config value: the message names the key, the value given and what is allowed."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, value: Any, allowed: str):
        value = value.value if isinstance(value, Enum) else value  # 'k1', not <KLEstimator.K1: 'k1'>
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': got {value!r}; allowed: {allowed}")


class DType(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"


class EngineKind(str, Enum):
    HF = "hf"  # transformers generate(): the CPU engine and the fallback
    VLLM = "vllm"


class SyncTransport(str, Enum):
    AUTO = "auto"  # CUDA IPC if a probe at the start opens in every engine, else host (one log line says why)
    CUDA_IPC = "cuda_ipc"  # device buffers shared by IPC handle: no host hop (needs --ipc=host or CAP_SYS_PTRACE in many containers)
    HOST = "host"  # each bucket staged in the actor rank's host memfd buffer; engines copy host -> device


class KLPlacement(str, Enum):
    REWARD = "reward"  # -kl_coef * KL folded into the per-token reward (InstructGPT)
    LOSS = "loss"  # kl_coef * KL added to the policy loss (GRPO-style)


class OverlongPrompts(str, Enum):
    ERROR = "error"  # a prompt over data.max_prompt_tokens stops the run before it starts
    SKIP = "skip"  # such prompts are dropped at load time, counted and logged


class LRSchedule(str, Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # half a cosine from the peak LR to 0 over the run's optimizer steps
    LINEAR = "linear"  # straight line from the peak LR to 0 over the run's optimizer steps


class ExecutorKind(str, Enum):
    RAY = "ray"  # every role rank is a Ray actor in the one placement group
    LOCAL = "local"  # one process, one rank per role: debugging, GPU boxes without Ray


class _Section:
    """Range checks shared by every section; `name` prefixes keys in error messages."""

    name: ClassVar[str] = ""

    def _require(self, ok: bool, attr: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{self.name}.{attr}", getattr(self, attr), allowed)

    def _positive(self, *attrs: str) -> None:
        for attr in attrs:
            self._require(getattr(self, attr) > 0, attr, "a number > 0")

    def _unit_interval(self, *attrs: str) -> None:
        for attr in attrs:
            self._require(0.0 <= getattr(self, attr) <= 1.0, attr, "a number in [0, 1]")


@dataclass
class RewardTerm:
    """One rule reward of `model.reward_fns`, summed with the others at `weight`."""

    fn: str = ""
    """`package.module:function`, the contract of `model.reward_fn`."""
    weight: float = 1.0
    """Its weight in the total reward (any finite number; a negative weight is a penalty)."""
    name: str | None = None
    """Its metric name, `reward/<name>_mean`; null: the function's name."""

    @property
    def metric_name(self) -> str:
        return self.name or self.fn.rpartition(":")[2]


REWARD_SOURCES = ("reward_fn", "reward_fns", "reward_url", "reward_model")
"""Where a run's reward comes from: exactly one of these model.* keys is set."""


@dataclass
class ModelConfig(_Section):
    name: ClassVar[str] = "model"
    actor: str = "builtin:tiny-llama"
    """Actor (policy) weights: a local HF model directory, or `builtin:tiny-llama` (built in code, warmed up)."""
    critic: str | None = None
    """Critic backbone; a fresh scalar value head goes on top. None: start from the actor's weights."""
    reference: str | None = None
    """Frozen reference policy for the KL term. None: the actor's initial weights."""
    reward_model: str | None = None
    """A local sequence-classification model (num_labels=1) used as reward. Exactly one of reward_fn, reward_fns, reward_url, reward_model is set."""
    reward_fn: str | None = "hybrid_ppo.tasks.max_digit:reward"
    """Rule reward `module:function(prompts, responses, labels=None) -> list[float]` (null when another reward source is set)."""
    dtype: DType = DType.FP32
    """Parameter and compute dtype of every role: fp32 or bf16."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward for the actor and critic (saves memory, costs ~30% time)."""
    reward_fns: list[RewardTerm] | None = None
    """Several rule rewards at once, summed with weights: `[{fn: 'pkg.mod:func', weight: 1.0, name: optional}]`; each also logged as `reward/<name>_mean`."""
    reward_url: str | None = None
    """A remote reward service: each batch is POSTed as JSON {prompts, responses, labels, metadata} and answers {"rewards": [...]}."""
    reward_timeout_s: float = 300.0
    """A rule reward call (or one request to reward_url) that takes longer than this (seconds) fails (the request is retried)."""
    reward_retries: int = 3
    """reward_url: retries of a failed or timed-out request, with exponential backoff (1 s, 2 s, 4 s, ...)."""
    reward_batch_size: int = 256
    """reward_url: at most this many samples per request (a batch is split)."""

    def __post_init__(self) -> None:
        self._positive("reward_timeout_s", "reward_batch_size")
        self._require(self.reward_retries >= 0, "reward_retries", "an integer >= 0")
        given = [key for key in REWARD_SOURCES if getattr(self, key) is not None]
        if len(given) != 1:
            key = given[-1] if given else "reward_fn"
            value = getattr(self, key)
            value = [t.fn for t in value] if key == "reward_fns" else value
            raise ConfigError(f"model.{key}", value, "exactly one reward source among model." + ", model.".join(REWARD_SOURCES)
                          + (f" (set: {', '.join(given)}; set the others to null)" if given else " (none is set)"))
        if self.reward_fn is not None:
            self._require(":" in self.reward_fn, "reward_fn", "'package.module:function'")
        if self.reward_url is not None:
            self._require(self.reward_url.startswith(("http://", "https://")), "reward_url", "an http:// or https:// URL")
        if self.reward_fns is not None:
            self._check_reward_fns(self.reward_fns)

    def _check_reward_fns(self, terms: list[RewardTerm]) -> None:
        if not terms:
            raise ConfigError("model.reward_fns", [], "a non-empty list of {fn, weight, name} (or null)")
        for i, term in enumerate(terms):
            key = f"model.reward_fns[{i}]"
            if ":" not in term.fn:
                raise ConfigError(f"{key}.fn", term.fn, "'package.module:function'")
            if not math.isfinite(term.weight):
                raise ConfigError(f"{key}.weight", term.weight, "a finite number")
        names = [t.metric_name for t in terms]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ConfigError("model.reward_fns", names, f"distinct names (two are {duplicate!r}: give one a `name`)")


@dataclass
class WarmupConfig(_Section):
    name: ClassVar[str] = "warmup"
    steps: int = 300
    """Supervised steps that warm a `builtin:` model up before PPO (0 disables). Cached by config hash."""
    lr: float = 3e-3
    """AdamW learning rate of the warm-up."""
    batch_size: int = 64
    """Examples per warm-up step."""
    teacher_accuracy: float = 0.35
    """Fraction of warm-up labels that are correct; the rest come from a weak heuristic annotator."""

    def __post_init__(self) -> None:
        self._require(self.steps >= 0, "steps", "an integer >= 0")
        self._positive("lr", "batch_size")
        self._unit_interval("teacher_accuracy")


@dataclass
class DataConfig(_Section):
    name: ClassVar[str] = "data"
    prompts: str = "builtin:max-digit"
    """Training prompts: a JSONL file, parquet file(s), a local `datasets` directory (save_to_disk), or `builtin:max-digit` | `builtin:word-math`."""
    eval_prompts: str | None = None
    """Held-out prompts in the same format. None: the builtin task's held-out split (builtin only)."""
    input_key: str = "prompt"
    """Field holding the prompt: a string, or a chat (a list of {"role", "content"} messages)."""
    label_key: str = "label"
    """Optional field holding the label (any JSON value) handed to the reward function as is."""
    apply_chat_template: bool | None = None
    """null: the tokenizer's chat template renders chats, strings stay as they are; true: strings too (as one user message); false: never (a chat is an error)."""
    max_prompt_tokens: int = 32
    """Prompts longer than this (in tokens, after the chat template) are never silently cut: see overlong_prompts."""
    overlong_prompts: OverlongPrompts = OverlongPrompts.ERROR
    """`error`: a prompt over max_prompt_tokens stops the run; `skip`: such prompts are dropped at load time and counted."""
    eval_size: int = 256
    """Held-out prompts scored for accuracy before and after PPO."""
    pretrain: str | None = None
    """PTX data: a JSONL file with a `text` string per line, or a local `datasets` directory (save_to_disk) with a `text` column."""

    def __post_init__(self) -> None:
        self._positive("max_prompt_tokens", "eval_size")
        self._require(bool(self.input_key), "input_key", "a non-empty field name")
        self._require(self.label_key != self.input_key, "label_key", f"a field other than input_key ({self.input_key!r})")


@dataclass
class RolloutConfig(_Section):
    name: ClassVar[str] = "rollout"
    engine: EngineKind = EngineKind.HF
    """Generation engine: `hf` (transformers generate; CPU default) or `vllm`."""
    tensor_parallel_size: int = 1
    """GPUs per rollout engine, all on one node; engines = placement.num_nodes x num_gpus / tensor_parallel_size."""
    max_new_tokens: int = 4
    """Response length cap; a response without EOS by then is truncated (and scored as is)."""
    temperature: float = 1.0
    """Sampling temperature for rollouts (> 0). Evaluation is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass for rollouts, in (0, 1]."""
    sleep_level: int = 2
    """vLLM sleep level between generations: 1 keeps weights in host RAM, 2 discards them (SYNC refills)."""
    gpu_memory_utilization: float = 0.5
    """vLLM: fraction of each GPU the engine may take while awake (weights + KV cache)."""
    weight_sync_bucket_mb: int = 512
    """Actor -> engine weights travel in buckets of whole layers of at most this many MiB (a bigger layer goes alone)."""
    weight_sync_slots: int = 1
    """Staging buffers per actor rank: 2 gathers bucket k+1 while the engines load bucket k (one more bucket of memory)."""
    weight_sync_transport: SyncTransport = SyncTransport.AUTO
    """How buckets reach the engines: `auto` (CUDA IPC, else host), `cuda_ipc`, or `host` (containers without CUDA IPC)."""
    enable_prefix_caching: bool = False
    """vLLM: reuse the KV blocks of shared prompt prefixes (samples_per_prompt > 1); reset after every sync."""
    enforce_eager: bool = False
    """vLLM: no CUDA graphs / torch.compile (slower decoding, faster start, less memory; set true on CPU)."""
    max_model_len: int | None = None
    """vLLM: longest prompt + response it plans KV blocks for; null: data.max_prompt_tokens + max_new_tokens."""
    seed: int | None = None
    """Sampling seed of engine 0 (engine e uses seed + e); null: train.seed."""
    full_determinism: bool = False
    """Reproducible rollouts: vLLM's batch-invariant kernels and one process (CUDA only), deterministic torch for HF."""

    def __post_init__(self) -> None:
        self._positive("tensor_parallel_size", "max_new_tokens", "temperature", "weight_sync_bucket_mb")
        self._require(self.weight_sync_slots in (1, 2), "weight_sync_slots", "1 or 2")
        if self.max_model_len is not None:
            self._positive("max_model_len")
        if self.seed is not None:
            self._require(self.seed >= 0, "seed", "an integer >= 0")
        self._require(0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]")
        self._require(self.sleep_level in (1, 2), "sleep_level", "1 or 2")
        self._require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "a number in (0, 1]")


@dataclass
class TrainConfig(_Section):
    name: ClassVar[str] = "train"
    iterations: int = 20
    """PPO iterations (generate -> score -> advantages -> train critic -> train actor -> sync)."""
    rollout_batch_size: int = 64
    """Prompts per iteration, over all engines."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt."""
    mini_batch_size: int = 32
    """Samples per optimizer step (global). rollout samples / mini_batch_size steps per epoch."""
    micro_batch_size: int = 16
    """Samples per forward/backward on one rank; the rest is gradient accumulation."""
    packing: bool = False
    """Padding-free micro-batches: every role's scoring and training passes run the real tokens of several sequences in one row (position_ids restart per sequence); refused at start for a model whose attention would cross them."""
    max_tokens_per_micro_batch: int | None = None
    """Real tokens per micro-batch on one rank (needs packing); sequences are binned under it, balanced over ranks. null: micro_batch_size sequences."""
    share_prompt_prefix: bool | None = None
    """Packed rows hold each prompt once, then its samples_per_prompt responses (each sees the prompt and itself only); micro-batches and ranks hold whole groups, the token budget counts distinct tokens. null: on when packing and samples_per_prompt > 1 and the model's attention takes the mask (else off, logged); true: refused at start where it cannot."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    actor_lr: float = 5e-4
    """Actor AdamW learning rate."""
    critic_lr: float = 1e-3
    """Critic AdamW learning rate."""
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    """After warm-up, both roles' LR stays (`constant`) or decays to 0 by the last step (`cosine`, `linear`)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear LR warm-up from 0, for the actor and the critic."""
    adam_beta1: float = 0.9
    """AdamW beta1 of both trained roles."""
    adam_beta2: float = 0.999
    """AdamW beta2 of both trained roles."""
    adam_eps: float = 1e-8
    """AdamW epsilon of both trained roles."""
    weight_decay: float = 0.0
    """AdamW weight decay of both trained roles."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm) of both trained roles."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for actor and critic: 2 or 3."""
    seed: int = 0
    """Seeds the warm-up, data order, sampling and model init."""
    save_every: int = 0
    """Write a resumable checkpoint every this many iterations (and at the end, and on SIGTERM); 0 disables."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept under RUN_DIR/checkpoints; older ones are deleted once a new one is complete."""
    max_skipped_steps: int = 10
    """Stop the run after this many optimizer steps in a row skipped for a non-finite loss."""
    eval_every: int = 0
    """Greedy held-out evaluation every this many iterations (0: only before and after the run)."""

    def __post_init__(self) -> None:
        self._require(self.save_every >= 0, "save_every", "an integer >= 0 (0 disables)")
        self._positive("keep_checkpoints", "max_skipped_steps")
        self._require(self.lr_warmup_steps >= 0, "lr_warmup_steps", "an integer >= 0")
        self._require(self.eval_every >= 0, "eval_every", "an integer >= 0")
        self._require(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "a number in [0, 1)")
        self._require(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "a number in [0, 1)")
        self._positive("adam_eps")
        self._positive("iterations", "rollout_batch_size", "samples_per_prompt", "mini_batch_size",
                       "micro_batch_size", "ppo_epochs", "actor_lr", "critic_lr", "max_grad_norm")
        self._require(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        self._require(self.zero_stage in (2, 3), "zero_stage", "2 or 3")
        if self.max_tokens_per_micro_batch is not None:
            self._positive("max_tokens_per_micro_batch")
            self._require(self.packing, "max_tokens_per_micro_batch", "null unless train.packing=true (a token budget bins packed rows)")
        if self.share_prompt_prefix:
            self._require(self.packing, "share_prompt_prefix", "false or null unless train.packing=true (it lays out packed rows)")
        self._require(self.samples_per_iteration % self.mini_batch_size == 0, "mini_batch_size",
                      f"a divisor of rollout_batch_size * samples_per_prompt = {self.samples_per_iteration}")

    @property
    def prefix_sharing(self) -> bool:
        """Whether the roles lay groups out prompt-once (`share_prompt_prefix` resolved; each role
        still checks its model at start): never with one sample per prompt, where it is plain packing."""
        wanted = self.packing if self.share_prompt_prefix is None else self.share_prompt_prefix
        return wanted and self.samples_per_prompt > 1

    @property
    def samples_per_iteration(self) -> int:
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run if no epoch stops early: the LR schedule's horizon."""
        return self.iterations * self.ppo_epochs * (self.samples_per_iteration // self.mini_batch_size)


@dataclass
class AlgoConfig(_Section):
    name: ClassVar[str] = "algo"
    advantage_estimator: AdvantageEstimator = AdvantageEstimator.GAE
    """gae (PPO with a critic) | grpo | rloo | reinforce_pp; the last three run no critic at all."""
    grpo_std_norm: bool = True
    """grpo: divide by the group's reward std; false is Dr. GRPO (mean-centring only)."""
    gamma: float = 1.0
    """Discount over response tokens (gae, reinforce_pp)."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip: the ratio may fall to 1 - clip_eps (and rise to 1 + clip_eps unless clip_eps_high is set)."""
    clip_eps_high: float | None = None
    """Upper ratio clip 1 + clip_eps_high (DAPO's clip-higher); null: clip_eps."""
    dual_clip: float | None = None
    """Dual-clip c > 1: on negative advantages the loss is at most -c * A; null disables."""
    loss_agg: LossAgg = LossAgg.TOKEN_MEAN
    """token_mean (every token of the mini-batch weighs the same) | seq_mean_token_mean | seq_mean_token_sum_norm."""
    value_clip_eps: float | None = 0.2
    """Value clip around the old values; null disables."""
    kl_coef: float = 0.01
    """Weight of KL(pi || pi_ref); the starting value when kl_target is set."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al. 2019): steer kl_coef so the per-sequence KL approaches this; null: fixed."""
    kl_horizon: int = 10000
    """Adaptive KL: samples over which the coefficient may change by about e^0.2."""
    kl_estimator: KLEstimator = KLEstimator.K1
    """k1 (log-ratio), k2 (squared/2) or k3 (exp(-r) - 1 + r)."""
    kl_in: KLPlacement = KLPlacement.REWARD
    """Where the KL goes: `reward` (per-token penalty) or `loss` (needs k2 or k3)."""
    whiten_advantages: bool = True
    """gae: normalise advantages over the batch's response tokens (mean 0, std 1). reinforce_pp always does."""
    entropy_coef: float = 0.0
    """Entropy bonus in the policy loss."""
    target_kl: float | None = None
    """Stop the actor's epochs early when approx KL(old || new) exceeds this; null: never."""
    ptx_coef: float = 0.0
    """PPO-ptx: add ptx_coef * LM loss on a data.pretrain micro-batch to every actor micro-batch (0: off)."""
    overlong_buffer: int | None = None
    """DAPO overlong shaping: the reward falls linearly over the last this many tokens before rollout.max_new_tokens; null: off."""
    overlong_penalty_factor: float = 1.0
    """Overlong shaping: the penalty at rollout.max_new_tokens tokens (0 at max_new_tokens - overlong_buffer)."""
    mask_truncated: bool = False
    """Leave responses that hit rollout.max_new_tokens without a stop token out of the loss (DAPO's overlong filtering)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling (grpo, rloo): drop groups whose rewards are all equal, sample more until rollout_batch_size groups have signal."""
    max_sampling_rounds: int = 3
    """Dynamic sampling: at most this many generate rounds per iteration; then train on the groups found (sampling/short = 1)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight the policy gradient by min(pi_old / pi_engine, tis_cap) per token; null: off."""

    def __post_init__(self) -> None:
        self._unit_interval("gamma", "lam")
        self._require(0.0 < self.clip_eps < 1.0, "clip_eps", "a number in (0, 1)")
        if self.clip_eps_high is not None:
            self._positive("clip_eps_high")
        if self.dual_clip is not None:
            self._require(self.dual_clip > 1.0, "dual_clip", "a number > 1 (or null)")
        if self.value_clip_eps is not None:
            self._positive("value_clip_eps")
        self._require(self.kl_coef >= 0, "kl_coef", "a number >= 0")
        if self.kl_target is not None:
            self._positive("kl_target")
        self._positive("kl_horizon")
        # k1's gradient, E_pi[grad log pi * 1] = grad of sum pi = 0, has zero expectation on-policy:
        # in the loss it adds noise and no pull toward the reference.
        self._require(not (self.kl_in == KLPlacement.LOSS and self.kl_estimator == KLEstimator.K1), "kl_estimator",
                      "k3 or k2 with algo.kl_in=loss (k1's gradient has zero expectation on-policy)")
        self._require(self.entropy_coef >= 0, "entropy_coef", "a number >= 0")
        if self.target_kl is not None:
            self._positive("target_kl")
        self._require(self.ptx_coef >= 0, "ptx_coef", "a number >= 0")
        if self.overlong_buffer is not None:
            self._positive("overlong_buffer")
        self._require(self.overlong_penalty_factor >= 0, "overlong_penalty_factor", "a number >= 0")
        self._positive("max_sampling_rounds")
        if self.tis_cap is not None:
            self._require(self.tis_cap >= 1, "tis_cap", "a number >= 1 (a cap below 1 would shrink on-policy tokens), or null")


@dataclass
class PlacementConfig(_Section):
    name: ClassVar[str] = "placement"
    num_nodes: int = 1
    """Nodes of the Ray cluster the run uses, each with placement.num_gpus GPUs; > 1 needs a cluster
    at RAY_ADDRESS and a run directory every node shares (README: "More than one node")."""
    num_gpus: int = 2
    """GPUs per node (one placement-group bundle each). Without CUDA Ray fakes this many."""
    gpu_per_role: float = 0.2
    """GPU fraction each role rank (and each engine worker) asks for on its bundle."""
    cpu_per_bundle: float = 0.5
    """CPUs reserved per bundle; role ranks share it."""
    cpu_per_role: float = 0.05
    """CPU fraction each role actor asks for (Ray's default of 1 would not fit in a bundle)."""
    executor: ExecutorKind = ExecutorKind.RAY
    """`ray`: roles are Ray actors in one placement group; `local`: all roles in this process."""
    gpu_memory_gib: float = 79.6
    """Memory of each GPU in GiB, for `hybrid-ppo plan` (an 80 GB H100/A100: nvidia-smi's 81559 MiB)."""
    host_memory_gib: float = 1024.0
    """Host memory of each node in GiB, for `hybrid-ppo plan` (offloaded states live there)."""

    def __post_init__(self) -> None:
        self._require(self.num_nodes >= 1, "num_nodes", "an integer >= 1")
        if self.num_nodes > 1 and self.executor == ExecutorKind.LOCAL:
            raise ConfigError("placement.num_nodes", self.num_nodes,
                              "1 with placement.executor=local (one process cannot span nodes)")
        self._positive("num_gpus", "cpu_per_bundle", "cpu_per_role", "gpu_memory_gib", "host_memory_gib")
        self._require(0.0 < self.gpu_per_role <= 1.0, "gpu_per_role", "a number in (0, 1]")

    @property
    def world_size(self) -> int:
        """Ranks of every role: one per GPU of every node (bundle i = rank i)."""
        return self.num_nodes * self.num_gpus


@dataclass
class MemoryConfig(_Section):
    name: ClassVar[str] = "memory"
    offload: bool = True
    """Apply the phase plan (offload what a phase does not need). false keeps every state resident."""
    profile: bool = True
    """Record device and host memory before and after every move (memory/... metrics)."""


@dataclass
class LoggingConfig(_Section):
    name: ClassVar[str] = "logging"
    output_dir: str = "runs"
    """Parent folder of run directories."""
    run_name: str | None = None
    """Run directory name under output_dir; null: a timestamp."""
    tensorboard: bool = True
    """Also write TensorBoard event files (metrics.jsonl is always written)."""
    cache_dir: str | None = None
    """Warm-up checkpoints and JIT-built ops; null: <output_dir>/.cache."""
    samples_per_iteration: int = 4
    """Rollouts appended to samples.jsonl each iteration (prompt after the chat template, response, reward, label); 0: none."""
    save_hf_every: int = 0
    """Also export the actor in HF format to RUN_DIR/hf/iter_NNNNNN every this many iterations; 0 disables."""
    verbose: bool = False
    """Also show on the terminal what the role processes print (library notices, warnings); always in train.log."""
    wandb_project: str | None = None
    """Also log the metrics and samples to Weights & Biases under this project; null: off (wandb never imported)."""
    wandb_run_name: str | None = None
    """The wandb run's name; null: the run directory's name."""
    wandb_tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._require(self.samples_per_iteration >= 0, "samples_per_iteration", "an integer >= 0")
        self._require(self.save_hf_every >= 0, "save_hf_every", "an integer >= 0 (0 disables)")

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / ".cache"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        per_node, tp = self.placement.num_gpus, self.rollout.tensor_parallel_size
        if per_node % tp:  # engine e's workers are bundles e*tp .. e*tp+tp-1: within one node iff tp | per_node
            raise ConfigError("rollout.tensor_parallel_size", tp,
                              f"a divisor of placement.num_gpus = {per_node} (the GPUs per node: an engine's "
                              f"TP workers never straddle two nodes)")
        gpus = self.placement.world_size
        per_rank = self.train.mini_batch_size / (self.train.micro_batch_size * gpus)
        if per_rank != int(per_rank) or per_rank < 1:
            raise ConfigError("train.micro_batch_size", self.train.micro_batch_size,
                              f"micro_batch_size * GPUs ({gpus}: placement.num_nodes x num_gpus) must divide "
                              f"train.mini_batch_size "
                              f"= {self.train.mini_batch_size}")
        if self.train.rollout_batch_size % self.num_engines:
            raise ConfigError("train.rollout_batch_size", self.train.rollout_batch_size,
                              f"a multiple of the number of rollout engines ({self.num_engines})")
        if self.model.reward_model is not None and self.data.eval_size % gpus:
            raise ConfigError("data.eval_size", self.data.eval_size,
                              f"a multiple of the GPUs ({gpus}: placement.num_nodes x num_gpus): reward-model "
                              f"ranks score equal shards")
        needed = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.rollout.max_model_len is not None and self.rollout.max_model_len < needed:
            raise ConfigError("rollout.max_model_len", self.rollout.max_model_len,
                              f">= data.max_prompt_tokens + rollout.max_new_tokens = {needed}, or null")
        if self.data.eval_prompts is None and not self.data.prompts.startswith(BUILTIN_PREFIX):
            raise ConfigError("data.eval_prompts", None, "a prompt file or dataset path (required when data.prompts is not builtin)")
        self._check_algo()
        self._check_token_budget()

    def _check_token_budget(self) -> None:
        """The longest sequence a rollout can make must fit one micro-batch: decided here, not by an OOM."""
        budget, longest = self.train.max_tokens_per_micro_batch, self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if budget is not None and budget < longest:
            raise ConfigError("train.max_tokens_per_micro_batch", budget,
                              f">= the longest sequence a rollout can make: data.max_prompt_tokens + "
                              f"rollout.max_new_tokens = {longest} tokens")

    def _check_algo(self) -> None:
        """Algorithm settings that depend on other sections."""
        estimator, n = self.algo.advantage_estimator, self.train.samples_per_prompt
        if estimator.uses_groups and n < 2:
            raise ConfigError("train.samples_per_prompt", n,
                              f"an integer >= 2 with algo.advantage_estimator={estimator.value} (it compares "
                              f"responses to the same prompt)")
        if estimator.uses_groups and self.train.rollout_batch_size % self.placement.world_size:
            raise ConfigError("train.rollout_batch_size", self.train.rollout_batch_size,
                              f"a multiple of the GPUs ({self.placement.world_size}: placement.num_nodes x "
                              f"num_gpus) with "
                              f"{estimator.value}: every rank computes advantages over whole groups")
        algo, max_new = self.algo, self.rollout.max_new_tokens
        if algo.overlong_buffer is not None and algo.overlong_buffer > max_new:
            raise ConfigError("algo.overlong_buffer", algo.overlong_buffer,
                              f"at most rollout.max_new_tokens = {max_new} tokens, or null")
        if algo.dynamic_sampling and not estimator.uses_groups:
            raise ConfigError("algo.dynamic_sampling", True,
                              f"false with algo.advantage_estimator={estimator.value} (it drops groups of responses to "
                              f"one prompt whose rewards are all equal: grpo or rloo only)")
        if algo.tis_cap is not None and self.rollout.top_p < 1:
            raise ConfigError("algo.tis_cap", algo.tis_cap,
                              f"null with rollout.top_p = {self.rollout.top_p} (the engine's log-probs are after the "
                              f"top-p cut, the actor's are not: the ratio would measure top-p, not the mismatch)")
        if self.algo.ptx_coef > 0 and self.data.pretrain is None:
            raise ConfigError("data.pretrain", None, "a JSONL file or datasets directory (required when algo.ptx_coef > 0)")

    @property
    def num_engines(self) -> int:
        return self.placement.world_size // self.rollout.tensor_parallel_size

    @property
    def max_model_len(self) -> int:
        """The rollout engines' context length: rollout.max_model_len, or prompt + response caps."""
        return self.rollout.max_model_len or self.data.max_prompt_tokens + self.rollout.max_new_tokens

    @property
    def rollout_seed(self) -> int:
        """Engine 0's sampling seed (engine e: + e)."""
        return self.train.seed if self.rollout.seed is None else self.rollout.seed

    @property
    def uses_reference(self) -> bool:
        """Whether a reference model runs at all: a KL term with weight (algo.kl_coef > 0) or an adaptive
        coefficient (algo.kl_target). Without one there is no reference process, phase or placement."""
        return self.algo.kl_coef > 0 or self.algo.kl_target is not None

    @property
    def on_policy(self) -> bool:
        """One epoch and one mini-batch per rollout: the update's policy is the one that sampled."""
        return self.train.ppo_epochs == 1 and self.train.mini_batch_size == self.train.samples_per_iteration

    @property
    def scores_old_logprobs(self) -> bool:
        """Whether SCORE_ACTOR runs. On-policy, old log-probs equal the training forward's, so they are
        taken from it (detached) unless something needs them before training: a KL in the reward
        (shaped before the advantages), the adaptive KL controller, or TIS's weights (pi_old / pi_engine)."""
        kl_before_training = self.uses_reference and (self.algo.kl_in == KLPlacement.REWARD or
                                                      self.algo.kl_target is not None)
        return not self.on_policy or kl_before_training or self.algo.tis_cap is not None

    @property
    def grad_accum_steps(self) -> int:
        return self.train.mini_batch_size // (self.train.micro_batch_size * self.placement.world_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict (enums as their values), as saved beside a run."""
        as_dict = dataclasses.asdict(self)
        return {s: {k: v.value if isinstance(v, Enum) else v for k, v in sec.items()} for s, sec in as_dict.items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("<config file>", str(path), "an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("<config file>", str(path), f"valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError("<config file>", str(path), "a YAML mapping of sections")
    return data


def _allowed_for(cls: type, key: str) -> str:
    """What a key accepts, for error messages: the field type, or the known keys of its section."""
    parts = key.split(".")
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return "one of: " + ", ".join(fields)
        cls = fields[part].default_factory  # type: ignore[assignment]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if parts[-1] not in fields:
        return "one of: " + ", ".join(fields)
    ftype = typing.get_type_hints(cls)[parts[-1]]
    if isinstance(ftype, type) and issubclass(ftype, Enum):
        return " | ".join(m.value for m in ftype)
    return getattr(ftype, "__name__", str(ftype))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (default: configs/tiny-cpu.yaml) + `section.key=value` overrides -> validated Config."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, item, "overrides of the form section.key=value")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Config), OmegaConf.create(_read_yaml(path)), OmegaConf.from_dotlist(list(overrides))
        )
        return OmegaConf.to_object(merged)  # runs every __post_init__ range check
    except OmegaConfBaseException as err:
        key = err.full_key or "<root>"
        value = getattr(err, "value", None)
        if value is None and "not in" in str(err):
            value = "<unknown key>"
        raise ConfigError(key, value, _allowed_for(Config, key)) from None
