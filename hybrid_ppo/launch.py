"""`hybrid-ppo train`: everything around the PPO loop.

Load and check every input first (models, warming up the builtin one; prompts; the reward
function), so bad input fails before anything is written. Then make the run directory, start the
executor, build the roles one at a time (each is offloaded by the scheduler as soon as it exists,
so a big box never holds every role at once), and run: initial sync, held-out eval, PPO
iterations, eval, final checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from hybrid_ppo.config import BUILTIN_PREFIX, Config
from hybrid_ppo.memory.plan import PHASE_PLAN, Phase, Role, resident_everything
from hybrid_ppo.memory.scheduler import MemoryScheduler
from hybrid_ppo.metrics import MetricsWriter
from hybrid_ppo.progress import iteration_progress
from hybrid_ppo.roles.reward import RuleReward
from hybrid_ppo.special_tokens import SpecialTokens, resolve_special_tokens
from hybrid_ppo.trainer import EVAL_METRIC, PPOTrainer, RoleGroups

log = logging.getLogger("hybrid_ppo")
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    eval_before: float
    eval_after: float
    seconds: float


def make_run_dir(cfg: Config) -> Path:
    name = cfg.logging.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.logging.output_dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; pick another logging.run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def setup_environment(cfg: Config) -> None:
    """Keep JIT-built ops and Ray's files inside the cache dir, so a run is self-contained."""
    cache = cfg.logging.resolved_cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def log_handler(handler: logging.Handler) -> Iterator[None]:
    """While inside, our log lines (package logger `hybrid_ppo`) also go to `handler`."""
    handler.setFormatter(LOG_FORMAT)
    package = logging.getLogger("hybrid_ppo")
    package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        handler.close()


def resolve_model(key: str, spec: str, cfg: Config) -> str:
    """A builtin name -> its (warmed-up, cached) directory; a path must be an existing directory."""
    if spec.startswith(BUILTIN_PREFIX):
        from hybrid_ppo.tasks import resolve_builtin_model

        return str(resolve_builtin_model(spec, cfg))
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"{key} = {spec!r} is not a directory (models load from local HF directories)")
    return spec


def resolve_models(cfg: Config) -> dict[str, str | None]:
    m = cfg.model
    actor = resolve_model("model.actor", m.actor, cfg)
    return {"actor": actor,
            "critic": resolve_model("model.critic", m.critic, cfg) if m.critic else actor,
            "reference": resolve_model("model.reference", m.reference, cfg) if m.reference else actor,
            "reward": resolve_model("model.reward_model", m.reward_model, cfg) if m.reward_model else None}


def build_roles(executor, cfg: Config, scheduler: MemoryScheduler, paths: dict[str, str | None],
                metrics: MetricsWriter | None = None) -> RoleGroups:
    """Spawn each role in turn and hand it to the scheduler, which offloads it before the next one."""
    from hybrid_ppo.roles.actor import Actor
    from hybrid_ppo.roles.critic import Critic
    from hybrid_ppo.roles.reference import Reference
    from hybrid_ppo.roles.reward import RewardModel
    from hybrid_ppo.rollout.worker import RolloutWorker

    specs = [(Role.ROLLOUT, RolloutWorker, paths["actor"]), (Role.ACTOR, Actor, paths["actor"]),
             (Role.CRITIC, Critic, paths["critic"]), (Role.REFERENCE, Reference, paths["reference"])]
    if paths["reward"] is not None:
        specs.append((Role.REWARD, RewardModel, paths["reward"]))
    groups = {}
    for role, cls, path in specs:
        start = time.perf_counter()
        groups[role] = executor.spawn(role.value, cls, path)
        moves = scheduler.register(role, groups[role])
        if metrics is not None:
            metrics.log_moves(0, moves)
        log.info("built %s (%d rank(s)) in %.1fs", role.value, groups[role].world_size, time.perf_counter() - start)
    return RoleGroups(actor=groups[Role.ACTOR], critic=groups[Role.CRITIC], reference=groups[Role.REFERENCE],
                      rollout=groups[Role.ROLLOUT], reward=groups.get(Role.REWARD))


@dataclass(frozen=True)
class Inputs:
    """Everything a run reads, loaded and checked before its run directory exists."""

    paths: dict[str, str | None]
    tokenizer: object
    token_ids: dict[tuple[str, bool], list[int]]  # every prompt, encoded once (data.prompt_key)
    train_examples: list
    eval_examples: list
    rule_reward: RuleReward | None
    special: SpecialTokens  # the actor's pad and EOS ids; the engines resolve the same from the same path


def load_inputs(cfg: Config) -> Inputs:
    """Models, tokenizer, prompts (chats rendered, every prompt encoded once, so a too-long prompt
    fails now, not mid-run) and the reward. Bad input raises here and leaves nothing behind."""
    from transformers import AutoTokenizer

    from hybrid_ppo.data import prepare_prompts
    from hybrid_ppo.roles.reward import check_reward_tokenizer

    paths = resolve_models(cfg)
    tokenizer = AutoTokenizer.from_pretrained(paths["actor"])
    prompts = prepare_prompts(cfg, tokenizer)
    if paths["reward"] is not None:
        check_reward_tokenizer(tokenizer, paths["reward"], [e.prompt for e in prompts.train[:64]])
    rule_reward = RuleReward(cfg.model.reward_fn) if cfg.model.reward_fn else None
    return Inputs(paths, tokenizer, prompts.token_ids, prompts.train, prompts.eval, rule_reward,
                  resolve_special_tokens(paths["actor"]))


def train(cfg: Config) -> RunResult:
    """The whole run. Inputs are loaded and checked before the run directory is made."""
    start = time.perf_counter()
    with log_handler(logging.StreamHandler(sys.stdout)):
        setup_environment(cfg)
        inputs = load_inputs(cfg)
        run_dir = make_run_dir(cfg)
        with log_handler(logging.FileHandler(run_dir / "train.log")):
            before, after = train_in(run_dir, cfg, inputs)
    return RunResult(run_dir, before, after, time.perf_counter() - start)


def train_in(run_dir: Path, cfg: Config, inputs: Inputs) -> tuple[float, float]:
    """Start the executor, build the roles, run PPO and save the checkpoint into `run_dir`."""
    from hybrid_ppo.data import PromptBatches, prompt_key
    from hybrid_ppo.executor import make_executor
    from hybrid_ppo.samples import SampleLog

    start = time.perf_counter()
    tokenizer = inputs.tokenizer

    scheduler = MemoryScheduler(PHASE_PLAN if cfg.memory.offload else resident_everything())
    metrics = MetricsWriter(run_dir, cfg.logging.tensorboard)
    executor = make_executor(cfg)
    try:
        executor.start()
        roles = build_roles(executor, cfg, scheduler, inputs.paths, metrics)
        trainer = PPOTrainer(cfg, roles, scheduler, tokenizer,
                             lambda examples: [inputs.token_ids[prompt_key(e)] for e in examples],
                             metrics, inputs.rule_reward, SampleLog(run_dir, cfg.logging.samples_per_iteration),
                             inputs.special)
        batches = PromptBatches(inputs.train_examples, cfg.train.rollout_batch_size, cfg.train.seed)
        result = run(cfg, trainer, batches, inputs.eval_examples, metrics)
        save_checkpoint(trainer, tokenizer, run_dir)
    finally:
        metrics.close()
        executor.shutdown()
    log.info("held-out %s (greedy): before PPO %.3f -> after PPO %.3f", EVAL_METRIC, *result)
    log.info("run finished in %.1fs; outputs in %s", time.perf_counter() - start, run_dir)
    return result


def run(cfg: Config, trainer: PPOTrainer, batches, eval_examples, metrics: MetricsWriter) -> tuple[float, float]:
    trainer.initial_sync()
    before = trainer.evaluate(eval_examples)[EVAL_METRIC]
    log.info("held-out %s (greedy) before PPO: %.3f", EVAL_METRIC, before)
    metrics.log(0, {EVAL_METRIC: before})
    with iteration_progress(cfg.train.iterations) as advance:
        for it in range(cfg.train.iterations):
            examples = [e for e in next(batches) for _ in range(cfg.train.samples_per_prompt)]
            stats = trainer.step(examples)
            metrics.log(it + 1, stats)
            advance(stats)
    after = trainer.evaluate(eval_examples)[EVAL_METRIC]
    metrics.log(cfg.train.iterations, {EVAL_METRIC: after})
    return before, after


def save_checkpoint(trainer: PPOTrainer, tokenizer, run_dir: Path) -> Path:
    """HF-format actor + tokenizer; written beside, then renamed, so no half checkpoint is left."""
    final, partial = run_dir / "checkpoint", run_dir / "checkpoint.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with trainer.phase(Phase.SCORE_ACTOR, record=False):  # the actor's weights, and nothing else
        trainer.roles.actor.call("save", str(partial))
    tokenizer.save_pretrained(partial)
    partial.rename(final)
    return final
