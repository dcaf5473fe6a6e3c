"""The Ray executor: every role rank is a Ray actor in its node's placement group.

This is the one place where Ray wraps the role classes (`ray.remote` at spawn time) and puts rank
i on bundle i with the plan's GPU fraction. Each role group meets (torch.distributed's
MASTER_ADDR:MASTER_PORT) at the IP of the node that holds its rank 0, on a port free there, which
a zero-resource task on rank 0's bundle finds (`rendezvous`) before the ranks start. Ray is
imported inside functions only.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hybrid_ppo.config import Config
from hybrid_ppo.executor.base import DistInfo, Pending, Ports, RoleError, RoleGroup, RoleTimeout, free_port
from hybrid_ppo.placement import PLAN_BUNDLES_ENV, PlacementError, PlacementPlan, create_placement_groups, make_plan
from hybrid_ppo.stopping import check_abandoned

WORKER_OUTPUT_LOGGER = "hybrid_ppo.workers"
"""Where the role processes' own output goes (train.log; the terminal only with logging.verbose)."""

FORWARDED_ENV_NAMES = ("TMPDIR", "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")
FORWARDED_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "TRITON_", "VLLM_", "NCCL_",
                          "GLOO_", "DS_", "HYBRID_PPO_")
"""Driver variables that Ray actors inherit (cache dirs, offline mode, kernel switches).
Never CUDA_VISIBLE_DEVICES: Ray sets that per actor from its bundle."""

SPAWN_TIMEOUT_S = 1800.0
"""How long `spawn` waits for a role's constructors (model loading) before calling it stuck."""

WAIT_POLL_S = 1.0
"""A blocking wait returns to Python this often, to see whether a second SIGINT/SIGTERM asked to
abandon the phase (`stopping.check_abandoned`)."""

CLOSE_TIMEOUT_S = 20.0
"""How long `shutdown` lets roles with a `close()` method stop cleanly before it kills them all:
more than a vLLM engine's own teardown limit (vllm_engine.SHUTDOWN_TIMEOUT_S; an idle engine takes
3-5 s on CPU). A role still busy (an abandoned phase, a peer that died mid-collective) would answer
only after its current call, so it is killed instead."""

RENDEZVOUS_TIMEOUT_S = 120.0
"""How long `rendezvous` waits for its probe on rank 0's node (a fresh node starts a worker first)."""

MAX_UNIX_TEMP_DIR = 40
"""Ray puts Unix sockets at <temp_dir>/session_<date>_<pid>/sockets/...; the path limit is ~107 chars."""



@dataclass(frozen=True)
class RankSpec:
    """One Ray actor to start: where, with what resources and which extra env."""

    rank: int
    world_size: int
    bundle: int
    gpu: float
    cpu: float
    bundles: tuple[int, ...]
    env: dict[str, str] = field(default_factory=dict)


def rank_specs(plan: PlacementPlan, role: str) -> list[RankSpec]:
    """The actors of a role. One per slot, except rollout: one per engine, on its first bundle.

    A TP>1 engine's actor asks for no GPU itself; vLLM's Ray executor places the TP workers on
    the engine's reserved slots, told where by VLLM_RAY_BUNDLE_INDICES / VLLM_RAY_PER_WORKER_GPUS.
    Those index the placement group vLLM finds itself in, the node's: so they are in-node indices.
    """
    if role not in plan.roles:
        raise ValueError(f"role '{role}' has no slots in the placement plan; planned roles: {', '.join(plan.roles)}")
    if role != "rollout":
        slots = plan.for_role(role)
        return [RankSpec(s.rank, len(slots), s.bundle, s.gpu, s.cpu, (s.bundle,)) for s in slots]
    engines, specs = plan.engines(), []
    for e, workers in enumerate(engines):
        head, bundles = workers[0], tuple(w.bundle for w in workers)
        if len(workers) == 1:
            specs.append(RankSpec(e, len(engines), head.bundle, head.gpu, head.cpu, bundles))
        else:
            env = {"VLLM_RAY_PER_WORKER_GPUS": str(head.gpu),
                   "VLLM_RAY_BUNDLE_INDICES": ",".join(str(plan.index_in_node(b)) for b in bundles),
                   PLAN_BUNDLES_ENV: ",".join(map(str, bundles))}
            specs.append(RankSpec(e, len(engines), head.bundle, 0.0, head.cpu, bundles, env))
    return specs


def rendezvous_probe(taken: dict[str, frozenset[int]]) -> tuple[str, int]:
    """Runs on a rank-0 node (a Ray task): this node's IP as Ray knows it and a port free on every
    interface here (the other nodes connect to it), not one of `taken[that IP]`."""
    import ray

    addr = ray.util.get_node_ip_address()
    return addr, free_port("", taken.get(addr, frozenset()))


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver variables Ray actors get (see FORWARDED_ENV_*)."""
    environ = dict(os.environ) if environ is None else environ
    return {k: v for k, v in environ.items()
            if k in FORWARDED_ENV_NAMES or k.startswith(FORWARDED_ENV_PREFIXES)}


class RayRoleGroup(RoleGroup):
    def __init__(self, name: str, handles: list, closable: bool = False, startable: bool = False):
        self.name, self.world_size, self._handles = name, len(handles), handles
        self.closable = closable  # the role class has close(): shutdown calls it before killing
        self.startable = startable  # the role class has started(): called once every rank is built

    @property
    def members(self) -> list:
        return list(self._handles)

    def submit_each(self, method: str, per_rank_args: Sequence[tuple], **kwargs: Any) -> Pending:
        self._check_args(per_rank_args)
        refs = [self._bound(rank, method).remote(*args, **kwargs) for rank, args in enumerate(per_rank_args)]
        return Pending(lambda timeout_s=None: self._gather(method, list(enumerate(refs)), timeout_s))

    def submit_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Pending:
        self._check_rank(rank)
        ref = self._bound(rank, method).remote(*args, **kwargs)
        return Pending(lambda timeout_s=None: self._gather(method, [(rank, ref)], timeout_s))

    def wait_ready(self, timeout_s: float = SPAWN_TIMEOUT_S) -> None:
        """Block until every rank's constructor returned; a failed one raises RoleError('__init__').

        A rank that is still not built after `timeout_s` (e.g. pending: its bundle has no GPU
        fraction left) raises TimeoutError naming the ranks.
        """
        refs = [h.__ray_ready__.remote() for h in self._handles]
        self._gather("__init__", list(enumerate(refs)), timeout_s)
        if self.startable:
            self.call("started")

    def _bound(self, rank: int, method: str) -> Any:
        try:
            return getattr(self._handles[rank], method)
        except AttributeError:
            raise AttributeError(f"role '{self.name}' has no method '{method}'") from None

    def _gather(self, method: str, ranked_refs: list[tuple[int, Any]], timeout_s: float | None = None) -> list:
        """Results in the given order; the FIRST rank to fail raises (others may hang on it)."""
        import ray

        rank_of = {ref: rank for rank, ref in ranked_refs}
        results: dict[int, Any] = {}
        pending = [ref for _, ref in ranked_refs]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = WAIT_POLL_S if deadline is None else min(WAIT_POLL_S, max(0.0, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready and (deadline is None or time.monotonic() < deadline):
                check_abandoned()  # a second SIGINT/SIGTERM: stop waiting for this phase
                continue
            if not ready:
                stuck = sorted(rank_of[ref] for ref in pending)
                raise RoleTimeout(f"role '{self.name}': {method}() of ranks {stuck} not done after {timeout_s:g} s")
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayError as err:
                    # A constructor that raised also surfaces as RayActorError; only a process
                    # that is gone (killed, out of memory) counts as died.
                    died = isinstance(err, ray.exceptions.RayActorError) and not err.actor_init_failed
                    raise RoleError(self.name, rank_of[ref], method, err, died=died) from err
        return [results[rank] for rank, _ in ranked_refs]


class RayExecutor:
    """Every role rank is a Ray actor in its node's placement group (bundle i = GPU i)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.plan = make_plan(cfg)  # refuses an infeasible layout before Ray starts
        self.placement_groups: list[Any] = []  # one per node: placement.create_placement_groups
        self.owns_ray = False
        self._groups: list[RayRoleGroup] = []
        self._ports = Ports()

    def start(self) -> RayExecutor:
        """Start (or join) Ray and reserve the placement groups."""
        import ray

        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            if self.plan.num_nodes > 1 and not address:
                raise PlacementError(f"placement.num_nodes = {self.plan.num_nodes} needs a running Ray cluster: start "
                                     f"one (`ray start --head`, then `ray start --address=...` on each other node) "
                                     f"and set RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(**self._local_init_kwargs())
                self.owns_ray = True
        if not self.cfg.logging.verbose:
            from hybrid_ppo.compat.ray import send_worker_output_to

            send_worker_output_to(logging.getLogger(WORKER_OUTPUT_LOGGER))
        self.placement_groups = create_placement_groups(self.plan)
        return self

    def _local_init_kwargs(self) -> dict[str, Any]:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # When one rank fails, the driver stops waiting for the others; Ray would print each of
        # their later errors as an "unhandled error" traceback. The first one is what we report.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        # Every task's events go to the GCS, which keeps up to 100,000 of them: its RSS grew by
        # 16 MiB per 100 iterations of the default job (scripts/soak.py). Only `ray list tasks` and
        # the dashboard (off) read them.
        os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
        cpus = max(os.cpu_count() or 1, math.ceil(self.plan.num_bundles * self.plan.bundle_cpu))
        kwargs: dict[str, Any] = dict(num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                                      _temp_dir=str(self._temp_dir()),
                                      logging_level=logging.INFO if self.cfg.logging.verbose else logging.WARNING)
        if _cuda_device_count() == 0:
            kwargs["num_gpus"] = self.plan.num_bundles  # fake GPUs: the placement path stays the real one
        return kwargs

    def _temp_dir(self) -> Path:
        """<cache_dir>/ray when short enough for Unix socket paths, else /tmp/hybrid_ppo_ray_<uid>."""
        candidate = (self.cfg.logging.resolved_cache_dir / "ray").resolve()
        if len(str(candidate)) > MAX_UNIX_TEMP_DIR:
            candidate = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / f"hppo_ray_{os.getuid()}"
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate

    def spawn(self, role: str, cls: type, *extra_args: Any, wait: bool = True) -> RayRoleGroup:
        """One actor per rank of `role` on its bundle, built as `cls(cfg, DistInfo, *extra_args)`.

        With `wait` (default) block until every constructor returned, so a failing one raises
        `RoleError(..., '__init__')` here. The ranks of a role are built concurrently (they meet
        in init_process_group).
        """
        import ray

        if not self.placement_groups:
            raise RuntimeError("RayExecutor.spawn() before start()")
        specs, env = rank_specs(self.plan, role), forwarded_env()
        addr, port = self.rendezvous(specs[0].bundle)
        remote_cls = ray.remote(cls)
        handles = []
        for spec in specs:
            strategy = self.bundle_strategy(spec.bundle)
            actor_env = {**env, **spec.env}
            dist = DistInfo(spec.rank, spec.world_size, addr, port, spec.bundles)
            handles.append(remote_cls.options(
                num_gpus=spec.gpu, num_cpus=spec.cpu, scheduling_strategy=strategy,
                runtime_env={"env_vars": actor_env} if actor_env else None,
            ).remote(self.cfg, dist, *extra_args))
        group = RayRoleGroup(role, handles, closable=callable(getattr(cls, "close", None)),
                             startable=callable(getattr(cls, "started", None)))
        self._groups.append(group)
        if wait:
            group.wait_ready()
        return group

    def bundle_strategy(self, bundle: int) -> Any:
        """Ray's scheduling strategy for plan bundle `bundle`: its node's group, its index there."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.placement_groups[self.plan.node_of(bundle)],
                                                placement_group_bundle_index=self.plan.index_in_node(bundle))

    def rendezvous(self, bundle: int) -> tuple[str, int]:
        """Where a role group whose rank 0 lives on `bundle` meets: that node's IP (the driver's
        127.0.0.1 would not reach another node) and a port free there, distinct from every other
        group's there. A task on the bundle finds both; it asks for no CPU or GPU, so it fits
        beside the ranks already there."""
        import ray

        probe = ray.remote(num_cpus=0)(rendezvous_probe)
        ref = probe.options(scheduling_strategy=self.bundle_strategy(bundle)).remote(self._ports.taken())
        try:
            addr, port = ray.get(ref, timeout=RENDEZVOUS_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise PlacementError(f"no answer from the node of bundle {bundle} in {RENDEZVOUS_TIMEOUT_S:g} s (asked "
                                 f"for its IP and a free port): is its raylet alive? (`ray status`)") from None
        self._ports.record(addr, port)
        return addr, port

    def shutdown(self) -> None:
        """Let the roles that can close do so, kill the actors, release the placement group, and
        stop Ray if this executor started it."""
        import ray

        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        closing = [h.close.remote() for group in self._groups if group.closable for h in group.members]
        if closing:  # a dead or stuck rank must not hold up the shutdown: it is killed below anyway
            ready, _ = ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    pass
        for group in self._groups:
            for handle in group.members:
                ray.kill(handle)
        self._groups.clear()
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.placement_groups = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch / broken driver: treat as a CPU box
        return 0
