"""`hybrid-ppo train` and `hybrid-ppo resume`: everything around the PPO loop.

Load and check every input first (models, warming up the builtin one; prompts; the reward
function; the placement plan), so bad input fails before anything is written. Then make the run
directory, start the executor, build the roles one at a time (each is offloaded by the scheduler
as soon as it exists, so a big box never holds every role at once), and run: initial sync,
held-out eval, PPO iterations with periodic checkpoints (`hybrid_ppo.checkpoint`), eval, final
HF export. A resume restores the latest checkpoint into freshly built roles and goes on.

Any failure after the run directory exists leaves its traceback in train.log and is raised as
`RunFailed`, which the CLI prints as one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import yaml

from hybrid_ppo.atomic_file import write_text_atomic
from hybrid_ppo.build_locks import remove_stale_locks
from hybrid_ppo.checkpoint import (HF_EXPORTS, HF_FINAL, CheckpointError, checkpoint_name, latest_checkpoint,
                                   read_state, replace_dir, write_checkpoint)
from hybrid_ppo.config import BUILTIN_PREFIX, Config, ConfigError, LRSchedule, load_config
from hybrid_ppo.errors import InputError, RunFailed
from hybrid_ppo.executor.ray import WORKER_OUTPUT_LOGGER
from hybrid_ppo.memory.plan import Phase, ResidentStates, Role, phase_plan, resident_everything
from hybrid_ppo.memory.scheduler import MemoryScheduler
from hybrid_ppo.metrics import MetricsWriter, read_metrics
from hybrid_ppo.placement import roles_for
from hybrid_ppo.progress import iteration_progress
from hybrid_ppo.rewards.combine import CombinedReward
from hybrid_ppo.roles.reward import build_reward
from hybrid_ppo.special_tokens import SpecialTokens, resolve_special_tokens
from hybrid_ppo.stopping import Interrupted, StopRequest
from hybrid_ppo.trainer import EVAL_METRIC, PPOTrainer, RoleGroups

log = logging.getLogger("hybrid_ppo")
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


RESUMABLE_KEYS = frozenset({
    "train.iterations", "train.save_every", "train.keep_checkpoints", "train.max_skipped_steps",
    "model.reward_timeout_s", "model.reward_retries", "model.reward_batch_size", "memory.offload", "memory.profile", "logging.tensorboard", "logging.save_hf_every",
    "logging.samples_per_iteration", "logging.verbose", "logging.wandb_project", "logging.wandb_run_name",
    "logging.wandb_tags",
    "train.eval_every",
})
"""What `hybrid-ppo resume RUN_DIR k=v` may change: how long and how a run is kept, never the math
of an iteration (offloading moves states bit for bit)."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    eval_before: float
    eval_after: float
    seconds: float
    eval_is_accuracy: bool = True
    """The reward is a 0/1 rule, so the eval figures are accuracies (else mean rewards)."""


def make_run_dir(cfg: Config) -> Path:
    name = cfg.logging.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.logging.output_dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; pick another logging.run_name, "
                              f"or continue it with `hybrid-ppo resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def setup_environment(cfg: Config) -> None:
    """Keep JIT-built ops and Ray's files inside the cache dir, so a run is self-contained (and no
    dead build's lock there hangs it); keep library notices off the terminal."""
    cache = cfg.logging.resolved_cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    remove_stale_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():  # what DeepSpeed would find, minus its warning in every role process
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not cfg.logging.verbose:  # weight-loading bars from every rank of every role, read by no one
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()


def terminal_handler(cfg: Config) -> logging.Handler:
    """The run's own lines on stdout; what the role processes print goes to train.log only,
    unless `logging.verbose`."""
    handler = logging.StreamHandler(sys.stdout)
    if not cfg.logging.verbose:
        handler.addFilter(lambda record: not record.name.startswith(WORKER_OUTPUT_LOGGER))
    return handler


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
    if not (Path(spec) / "config.json").is_file():  # else the tokenizer's loader fails first, and says less
        raise InputError(f"{key} = {spec!r} has no config.json: not a Hugging Face model directory "
                         "(expected config.json, the weights and the tokenizer files)")
    return spec


def resolve_models(cfg: Config) -> dict[str, str | None]:
    m = cfg.model
    actor = resolve_model("model.actor", m.actor, cfg)
    return {"actor": actor,
            "critic": resolve_model("model.critic", m.critic, cfg) if m.critic else actor,
            "reference": resolve_model("model.reference", m.reference, cfg) if m.reference else actor,
            "reward": resolve_model("model.reward_model", m.reward_model, cfg) if m.reward_model else None}


def memory_plan(cfg: Config) -> dict[Phase, ResidentStates]:
    """The phase plan for the roles this config runs (`memory.offload=false`: keep everything)."""
    roles = [Role(r) for r in roles_for(cfg)]
    score_actor = cfg.scores_old_logprobs
    return phase_plan(roles, score_actor) if cfg.memory.offload else resident_everything(roles, score_actor)


def build_roles(executor, cfg: Config, scheduler: MemoryScheduler, paths: dict[str, str | None],
                metrics: MetricsWriter | None = None) -> RoleGroups:
    """Spawn each role the config runs in turn and hand it to the scheduler, which offloads it
    before the next one."""
    from hybrid_ppo.roles.actor import Actor
    from hybrid_ppo.roles.critic import Critic
    from hybrid_ppo.roles.reference import Reference
    from hybrid_ppo.roles.reward import RewardModel
    from hybrid_ppo.rollout.worker import RolloutWorker

    specs = [(Role.ROLLOUT, RolloutWorker, paths["actor"]), (Role.ACTOR, Actor, paths["actor"]),
             (Role.CRITIC, Critic, paths["critic"]), (Role.REFERENCE, Reference, paths["reference"]),
             (Role.REWARD, RewardModel, paths["reward"])]
    groups = {}
    for role, cls, path in [spec for spec in specs if spec[0].value in roles_for(cfg)]:
        start = time.perf_counter()
        groups[role] = executor.spawn(role.value, cls, path)
        moves = scheduler.register(role, groups[role])
        if metrics is not None:
            metrics.log_moves(0, moves)
        log.info("built %s (%d rank(s)) in %.1fs", role.value, groups[role].world_size, time.perf_counter() - start)
    return RoleGroups(actor=groups[Role.ACTOR], critic=groups.get(Role.CRITIC), reference=groups.get(Role.REFERENCE),
                      rollout=groups[Role.ROLLOUT], reward=groups.get(Role.REWARD))


@dataclass(frozen=True)
class Inputs:
    """Everything a run reads, loaded and checked before its run directory exists."""

    paths: dict[str, str | None]
    tokenizer: object
    token_ids: dict[tuple[str, bool], list[int]]  # every prompt, encoded once (data.prompt_key)
    train_examples: list
    eval_examples: list
    rule_reward: CombinedReward | None  # every driver-side reward source; None with a reward model
    special: SpecialTokens  # the actor's pad and EOS ids; the engines resolve the same from the same path


def load_inputs(cfg: Config) -> Inputs:
    """Reward function, placement and prompts first (cheap), then models and tokenizer (the slow
    part: warming the builtin model up), then chats rendered and every prompt encoded once (a
    too-long prompt fails now, not mid-run). Bad input raises here and leaves nothing behind."""
    from transformers import AutoTokenizer

    from hybrid_ppo.data import eval_prompts, prepare_prompts, train_prompts
    from hybrid_ppo.placement import make_plan
    from hybrid_ppo.roles.reward import check_reward_tokenizer
    from hybrid_ppo.wandb_run import check_wandb_installed

    rule_reward = build_reward(cfg)
    make_plan(cfg)  # an infeasible placement fails here, not after the run directory exists
    check_wandb_installed(cfg)
    train_examples, eval_examples = train_prompts(cfg), eval_prompts(cfg)
    paths = resolve_models(cfg)
    tokenizer = AutoTokenizer.from_pretrained(paths["actor"])
    prompts = prepare_prompts(cfg, tokenizer, train_examples, eval_examples)
    if paths["reward"] is not None:
        check_reward_tokenizer(tokenizer, paths["reward"], [e.prompt for e in prompts.train[:64]])
    if cfg.algo.ptx_coef > 0:  # the actor ranks read it again; a bad file fails here, before anything starts
        from hybrid_ppo.ptx import read_pretrain_texts

        read_pretrain_texts(cfg.data.pretrain)
    return Inputs(paths, tokenizer, prompts.token_ids, prompts.train, prompts.eval, rule_reward,
                  resolve_special_tokens(paths["actor"]))


def train(cfg: Config) -> RunResult:
    """The whole run. Inputs are loaded and checked before the run directory is made."""
    start = time.perf_counter()
    with log_handler(terminal_handler(cfg)):
        setup_environment(cfg)
        inputs = load_inputs(cfg)
        run_dir = make_run_dir(cfg)
        before, after, is_accuracy = run_with_train_log(run_dir, cfg, inputs, checkpoint=None)
    return RunResult(run_dir, before, after, time.perf_counter() - start, is_accuracy)


def resume(run_dir: str | Path, overrides: list[str]) -> RunResult:
    """Continue the run in `run_dir` from its latest checkpoint, with `overrides` of RESUMABLE_KEYS."""
    start, run_dir = time.perf_counter(), Path(run_dir)
    cfg = resume_config(run_dir, overrides)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (train.save_every was 0, or it "
                              f"stopped before its first save)")
    done = read_state(checkpoint)["iteration"]
    if done >= cfg.train.iterations:
        raise ConfigError("train.iterations", cfg.train.iterations,
                          f"more than the {done} iterations {checkpoint} has done (raise it to train on)")
    with log_handler(terminal_handler(cfg)):
        setup_environment(cfg)
        inputs = load_inputs(cfg)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        before, after, is_accuracy = run_with_train_log(run_dir, cfg, inputs, checkpoint)
    return RunResult(run_dir, before, after, time.perf_counter() - start, is_accuracy)


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's saved config with `overrides`; refuses any change outside RESUMABLE_KEYS."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    saved, cfg = load_config(saved_path), load_config(saved_path, overrides)
    old, new = saved.to_dict(), cfg.to_dict()
    for section, values in new.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if value != old[section][key] and name not in RESUMABLE_KEYS:
                raise ConfigError(name, value, f"no change on resume (it would change the run's math; the run "
                                               f"has {old[section][key]!r}); resume may change: "
                                               + ", ".join(sorted(RESUMABLE_KEYS)))
    if cfg.train.iterations != saved.train.iterations and cfg.train.lr_schedule != LRSchedule.CONSTANT:
        # The decay is laid out over train.iterations; a new horizon would stretch it from the
        # restored step, and the LR would jump back up at the resume point.
        raise ConfigError("train.iterations", cfg.train.iterations,
                          f"no change on resume with train.lr_schedule = {cfg.train.lr_schedule.value} (its decay "
                          f"ends at the run's {saved.train.iterations} iterations; only a constant schedule can "
                          f"be extended)")
    return cfg


def run_with_train_log(run_dir: Path, cfg: Config, inputs: Inputs, checkpoint: Path | None) -> tuple[float, float, bool]:
    """`train_in_run_dir` with train.log attached; a failure's traceback goes there, and out as RunFailed."""
    try:
        with log_handler(logging.FileHandler(run_dir / "train.log")):
            if checkpoint is not None:
                log.info("resuming %s from %s (iteration %d)", run_dir, checkpoint, read_state(checkpoint)["iteration"])
            return train_in_run_dir(run_dir, cfg, inputs, checkpoint)
    except BaseException as err:
        with open(run_dir / "train.log", "a") as log_file:
            log_file.write(f"run failed: {type(err).__name__}: {err}\n")
            traceback.print_exception(err, file=log_file)
        raise RunFailed(run_dir, _latest_or_none(run_dir)) from err


def train_in_run_dir(run_dir: Path, cfg: Config, inputs: Inputs, checkpoint: Path | None = None) -> tuple[float, float, bool]:
    """Start the executor, build the roles (restored from `checkpoint` if given), run PPO, export."""
    from hybrid_ppo.data import PromptBatches, prompt_key
    from hybrid_ppo.executor import make_executor
    from hybrid_ppo.samples import SampleLog
    from hybrid_ppo.wandb_run import WandbRun

    start = time.perf_counter()
    tokenizer = inputs.tokenizer
    stop = StopRequest()
    scheduler = MemoryScheduler(memory_plan(cfg))
    resume_after = read_state(checkpoint)["iteration"] if checkpoint else None
    tracker = WandbRun(cfg, run_dir, resume_after) if cfg.logging.wandb_project else None
    metrics = MetricsWriter(run_dir, cfg.logging.tensorboard, resume_after=resume_after,
                            tags={"estimator": cfg.algo.advantage_estimator.value}, tracker=tracker)
    executor = make_executor(cfg)
    try:
        executor.start()
        with stop.installed():  # after ray.init, which puts its own SIGTERM handler (sys.exit) in place
            roles = build_roles(executor, cfg, scheduler, inputs.paths, metrics)
            trainer = PPOTrainer(cfg, roles, scheduler, tokenizer,
                                 lambda examples: [inputs.token_ids[prompt_key(e)] for e in examples],
                                 metrics, inputs.rule_reward, SampleLog(run_dir, cfg.logging.samples_per_iteration, tracker),
                                 inputs.special)
            batches = PromptBatches(inputs.train_examples, cfg.train.rollout_batch_size, cfg.train.seed)
            if checkpoint is not None:
                restore(trainer, batches, checkpoint)
            result = ppo_loop(cfg, trainer, batches, inputs.eval_examples, metrics, run_dir, stop)
            export_hf_model(trainer, tokenizer, run_dir / HF_FINAL)
    finally:
        metrics.close()
        executor.shutdown()
    log.info("held-out %s (greedy): before PPO %.3f -> after PPO %.3f", EVAL_METRIC, *result)
    log.info("run finished in %.1fs; outputs in %s", time.perf_counter() - start, run_dir)
    return (*result, trainer.eval_is_accuracy)


def ppo_loop(cfg: Config, trainer: PPOTrainer, batches, eval_examples, metrics: MetricsWriter, run_dir: Path,
        stop: StopRequest) -> tuple[float, float]:
    """Initial sync (re-syncs a restored actor too), eval, iterations with checkpoints, eval."""
    trainer.resync_engines()
    first = trainer.iteration
    if first == 0:
        evaluation = trainer.evaluate(eval_examples)
        before = evaluation[EVAL_METRIC]
        log.info("held-out %s (greedy) before PPO: %.3f", EVAL_METRIC, before)
        metrics.log(0, evaluation)
    else:
        before = next((r[EVAL_METRIC] for r in read_metrics(metrics.path) if EVAL_METRIC in r), float("nan"))
    saved = first if first else None

    def draw() -> list:  # the samples of one prompt are contiguous rows: the group estimators rely on it
        return [e for e in next(batches) for _ in range(cfg.train.samples_per_prompt)]

    with iteration_progress(cfg.train.iterations, first) as advance:
        for it in range(first, cfg.train.iterations):
            if stop.requested:
                break
            stats = trainer.step(draw(), more=draw)  # dynamic sampling draws more prompts
            if cfg.train.eval_every and (it + 1) % cfg.train.eval_every == 0 and it + 1 != cfg.train.iterations:
                stats.update(trainer.evaluate(eval_examples))
            metrics.log(it + 1, stats)  # before the checkpoint: a resume never loses a logged iteration
            advance(stats)
            if cfg.train.save_every and (it + 1) % cfg.train.save_every == 0:
                saved = save_state(cfg, trainer, batches, metrics, run_dir)
            if cfg.logging.save_hf_every and (it + 1) % cfg.logging.save_hf_every == 0:
                export_hf_model(trainer, trainer.tokenizer, run_dir / HF_EXPORTS / checkpoint_name(it + 1))
    if cfg.train.save_every and trainer.iteration and saved != trainer.iteration:  # the last iterations, or a stop
        saved = save_state(cfg, trainer, batches, metrics, run_dir)
    if stop.requested:
        raise Interrupted(stop.signum, trainer.iteration, _latest_or_none(run_dir))
    after = trainer.evaluate(eval_examples)
    metrics.log(trainer.iteration, after)
    return before, after[EVAL_METRIC]


def save_state(cfg: Config, trainer: PPOTrainer, batches, metrics: MetricsWriter, run_dir: Path) -> int:
    """A resumable checkpoint of this iteration (SAVE_* phases, timed); returns the iteration."""
    start, timings = time.perf_counter(), {}

    def write(directory: Path) -> dict:
        timings.update(trainer.save_roles(str(directory)))
        return {"trainer": trainer.state_dict(), "batches": batches.state_dict()}

    path = write_checkpoint(run_dir, trainer.iteration, write, cfg.train.keep_checkpoints)
    metrics.log(trainer.iteration, {**timings, "time/checkpoint": time.perf_counter() - start})
    log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - start)
    return trainer.iteration


def restore(trainer: PPOTrainer, batches, checkpoint: Path) -> None:
    """Roles from their DeepSpeed checkpoints, then the driver's state (iteration, prompt position)."""
    state = read_state(checkpoint)
    trainer.load_roles(str(checkpoint))
    trainer.load_state_dict(state["trainer"])
    batches.load_state_dict(state["batches"])
    log.info("restored %s: iteration %d, %d prompt batches drawn", checkpoint, trainer.iteration, batches.drawn)


def export_hf_model(trainer: PPOTrainer, tokenizer, final: Path) -> Path:
    """HF-format actor + tokenizer (what vLLM loads); written beside, then renamed, so no half
    export is ever under `final`."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with trainer.phase(Phase.CHECKPOINT_ACTOR, record=False):  # keeps the engine's weights: GENERATE may follow
        trainer.roles.actor.call("save", str(partial))
    tokenizer.save_pretrained(partial)
    replace_dir(partial, final)
    return final


def _latest_or_none(run_dir: Path) -> Path | None:
    try:
        return latest_checkpoint(run_dir)
    except CheckpointError:
        return None
