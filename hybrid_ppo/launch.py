"""`hybrid-ppo train`: everything around the PPO loop.

Make the run directory, resolve models (warming up the builtin one), start the executor, build
the roles one at a time (each is offloaded by the scheduler as soon as it exists, so a big box
never holds every role at once), then run: initial sync, held-out eval, PPO iterations, eval,
final checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from hybrid_ppo.config import BUILTIN_PREFIX, Config
from hybrid_ppo.memory.plan import PHASE_PLAN, Phase, Role, resident_everything
from hybrid_ppo.memory.scheduler import MemoryScheduler
from hybrid_ppo.metrics import MetricsWriter
from hybrid_ppo.progress import iteration_progress
from hybrid_ppo.roles.reward import RuleReward
from hybrid_ppo.trainer import PPOTrainer, RoleGroups

log = logging.getLogger("hybrid_ppo")


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


def setup_logging(run_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def resolve_model(spec: str, cfg: Config) -> str:
    if spec.startswith(BUILTIN_PREFIX):
        from hybrid_ppo.tasks import resolve_builtin_model

        return str(resolve_builtin_model(spec, cfg))
    return spec


def build_roles(executor, cfg: Config, scheduler: MemoryScheduler, paths: dict[str, str]) -> RoleGroups:
    from hybrid_ppo.roles.actor import Actor
    from hybrid_ppo.roles.critic import Critic
    from hybrid_ppo.roles.reference import Reference
    from hybrid_ppo.roles.reward import RewardModel
    from hybrid_ppo.rollout.worker import RolloutWorker

    specs = [(Role.ROLLOUT, RolloutWorker, paths["actor"]), (Role.ACTOR, Actor, paths["actor"]),
             (Role.CRITIC, Critic, paths["critic"]), (Role.REFERENCE, Reference, paths["reference"])]
    if cfg.model.reward_model is not None:
        specs.append((Role.REWARD, RewardModel, paths["reward"]))
    groups = {}
    for role, cls, path in specs:
        start = time.perf_counter()
        groups[role] = executor.spawn(role.value, cls, path)
        scheduler.register(role, groups[role])
        log.info("built %s (%d rank(s)) in %.1fs", role.value, groups[role].world_size, time.perf_counter() - start)
    return RoleGroups(actor=groups[Role.ACTOR], critic=groups[Role.CRITIC], reference=groups[Role.REFERENCE],
                      rollout=groups[Role.ROLLOUT], reward=groups.get(Role.REWARD))


def train(cfg: Config) -> RunResult:
    from transformers import AutoTokenizer

    from hybrid_ppo.data import PromptBatches, encode_prompts, load_prompts
    from hybrid_ppo.executor import make_executor

    start = time.perf_counter()
    run_dir = make_run_dir(cfg)
    setup_logging(run_dir)
    setup_environment(cfg)
    m = cfg.model
    actor_path = resolve_model(m.actor, cfg)
    paths = {"actor": actor_path, "critic": resolve_model(m.critic or actor_path, cfg),
             "reference": resolve_model(m.reference or actor_path, cfg),
             "reward": m.reward_model and resolve_model(m.reward_model, cfg)}
    tokenizer = AutoTokenizer.from_pretrained(actor_path)
    train_examples = load_prompts(cfg.data.prompts, "train", cfg)
    eval_examples = load_prompts(cfg.data.eval_prompts or cfg.data.prompts, "eval", cfg)[:cfg.data.eval_size]
    rule_reward = RuleReward(m.reward_fn) if m.reward_fn else None

    scheduler = MemoryScheduler(PHASE_PLAN if cfg.memory.offload else resident_everything())
    metrics = MetricsWriter(run_dir, cfg.logging.tensorboard)
    executor = make_executor(cfg).start()
    try:
        roles = build_roles(executor, cfg, scheduler, paths)
        trainer = PPOTrainer(cfg, roles, scheduler, tokenizer,
                             lambda prompts: encode_prompts(tokenizer, prompts, cfg.data.max_prompt_tokens),
                             metrics, rule_reward)
        result = run(cfg, trainer, PromptBatches(train_examples, cfg.train.rollout_batch_size, cfg.train.seed),
                     eval_examples, metrics)
        save_checkpoint(trainer, tokenizer, run_dir)
    finally:
        metrics.close()
        executor.shutdown()
    seconds = time.perf_counter() - start
    log.info("held-out accuracy (greedy, mean 0/1 reward): before PPO %.3f -> after PPO %.3f", *result)
    log.info("run finished in %.1fs; outputs in %s", seconds, run_dir)
    return RunResult(run_dir, result[0], result[1], seconds)


def run(cfg: Config, trainer: PPOTrainer, batches, eval_examples, metrics: MetricsWriter) -> tuple[float, float]:
    trainer.initial_sync()
    before = trainer.evaluate(eval_examples)["eval/reward_mean"]
    log.info("held-out accuracy before PPO: %.3f", before)
    metrics.log(0, {"eval/reward_mean": before})
    with iteration_progress(cfg.train.iterations) as advance:
        for it in range(cfg.train.iterations):
            examples = [e for e in next(batches) for _ in range(cfg.train.samples_per_prompt)]
            stats = trainer.step(examples)
            metrics.log(it + 1, stats)
            advance(stats)
    after = trainer.evaluate(eval_examples)["eval/reward_mean"]
    metrics.log(cfg.train.iterations, {"eval/reward_mean": after})
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
