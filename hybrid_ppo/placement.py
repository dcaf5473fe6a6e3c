"""Where every role rank runs: one placement group per node, one bundle per GPU, a GPU fraction per rank.

The plan is a pure function of the config (`make_plan`), checked (`check_plan`) before Ray
starts, so an infeasible layout fails with the per-bundle sums instead of an actor that stays
pending forever. On GPU bundle i live actor rank i, critic rank i, reference rank i, reward rank
i (only with a reward *model*; a rule reward runs in the driver) and rollout worker i. Rollout
engine e with tensor parallel size t owns the workers on bundles e*t .. e*t+t-1; its rank-0
worker is engine e's actor. Bundles are numbered over the whole cluster: node n holds bundles
n*g .. n*g+g-1 (g = placement.num_gpus), as bundles 0 .. g-1 of that node's group.

`create_placement_groups` is the only function here that touches Ray, and it imports Ray
lazily: importing this module starts nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybrid_ppo.config import Config
from hybrid_ppo.errors import EXIT_CONFIG, HybridPPOError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

ROLES: tuple[str, ...] = ("actor", "critic", "reference", "reward", "rollout")
"""Every role, in table order. `reward` has slots only when `model.reward_model` is set, `critic`
only when the advantage estimator needs one (gae)."""

FRACTION_TOLERANCE = 1e-6
"""Slack on `sum <= 1` per bundle: 5 x 0.2 is 1.0000000000000002 in floating point."""

PLAN_BUNDLES_ENV = "HYBRID_PPO_BUNDLES"
"""Set on a TP>1 engine's actor: its plan bundles, cluster-wide numbers like the actor ranks'. On CPU
they name its workers' GPUs (weight_sync.device_key); VLLM_RAY_BUNDLE_INDICES holds the same
bundles' indices within the node's group, for vLLM's Ray executor."""

PG_READY_TIMEOUT_S = 60.0
"""How long `create_placement_group` waits for all bundles before giving up."""


class PlacementError(HybridPPOError, ValueError):
    """The plan cannot be placed; the message lists the offending bundles and roles."""

    exit_code = EXIT_CONFIG


@dataclass(frozen=True)
class Slot:
    """One role rank: which bundle (GPU) it lives on and what it asks for there."""

    role: str
    rank: int
    bundle: int
    gpu: float
    cpu: float


@dataclass(frozen=True)
class PlacementPlan:
    """Bundles of the one placement group and the slots that share them."""

    num_bundles: int
    bundle_cpu: float
    slots: tuple[Slot, ...]
    tensor_parallel_size: int = 1
    """Rollout workers per engine; engine e owns rollout ranks e*tp .. e*tp+tp-1."""
    num_nodes: int = 1
    """Nodes the bundles are split over, num_bundles / num_nodes each, in bundle order."""

    @property
    def bundles_per_node(self) -> int:
        return self.num_bundles // self.num_nodes

    def node_of(self, bundle: int) -> int:
        """The node (placement group) that holds `bundle`."""
        return bundle // self.bundles_per_node

    def index_in_node(self, bundle: int) -> int:
        """`bundle`'s index in its node's placement group."""
        return bundle % self.bundles_per_node

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles that have slots, in `ROLES` order."""
        present = {s.role for s in self.slots}
        return tuple(r for r in ROLES if r in present) + tuple(sorted(present - set(ROLES)))

    def for_role(self, role: str) -> list[Slot]:
        """The role's slots, sorted by rank."""
        return sorted((s for s in self.slots if s.role == role), key=lambda s: s.rank)

    def engines(self) -> list[list[Slot]]:
        """Rollout slots grouped by engine: `engines()[e][0]` is engine e's rank-0 worker."""
        workers, tp = self.for_role("rollout"), self.tensor_parallel_size
        return [workers[e:e + tp] for e in range(0, len(workers), tp)]

    def bundle_gpu_sums(self) -> list[float]:
        return _sums(self, "gpu")

    def bundle_cpu_sums(self) -> list[float]:
        return _sums(self, "cpu")

    def describe(self) -> str:
        """A bundle x role table of GPU fractions, with the per-bundle GPU and CPU sums (and each
        bundle's node, on more than one)."""
        roles = self.roles
        cells: dict[tuple[int, str], float] = defaultdict(float)
        for s in self.slots:
            cells[(s.bundle, s.role)] += s.gpu
        where = (lambda b: [str(b), str(self.node_of(b))]) if self.num_nodes > 1 else (lambda b: [str(b)])
        header = [*(["bundle", "node"] if self.num_nodes > 1 else ["bundle"]), *roles, "GPU sum", "CPU sum"]
        rows = [
            [*where(b), *(_fmt(cells[(b, r)]) if (b, r) in cells else "-" for r in roles), _fmt(g), _fmt(c)]
            for b, (g, c) in enumerate(zip(self.bundle_gpu_sums(), self.bundle_cpu_sums()))
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
        nodes = f"{self.num_nodes} nodes x " if self.num_nodes > 1 else ""
        title = (f"placement group: {nodes}{self.bundles_per_node} bundles x {{GPU: 1, CPU: {_fmt(self.bundle_cpu)}}}, "
                 f"rollout TP={self.tensor_parallel_size}")
        return "\n".join([title, *lines])


def _sums(plan: PlacementPlan, attr: str) -> list[float]:
    sums = [0.0] * plan.num_bundles
    for s in plan.slots:
        if 0 <= s.bundle < plan.num_bundles:
            sums[s.bundle] += getattr(s, attr)
    return sums


def _fmt(x: float) -> str:
    return f"{round(x, 6):g}"


def roles_for(cfg: Config) -> tuple[str, ...]:
    """Roles this config runs as ranks: `reward` only with a reward model, `critic` only for an
    estimator that needs one (a critic-free run has no critic process and no critic memory),
    `reference` only with a KL term (`Config.uses_reference`)."""
    runs = {"reward": cfg.model.reward_model is not None, "critic": cfg.algo.advantage_estimator.needs_critic,
            "reference": cfg.uses_reference}
    return tuple(r for r in ROLES if runs.get(r, True))


def make_plan(cfg: Config) -> PlacementPlan:
    """One slot per role per GPU bundle of every node (rank i on bundle i), each with the configured fractions."""
    p = cfg.placement
    slots = tuple(
        Slot(role=role, rank=gpu, bundle=gpu, gpu=p.gpu_per_role, cpu=p.cpu_per_role)
        for gpu in range(p.world_size)
        for role in roles_for(cfg)
    )
    plan = PlacementPlan(num_bundles=p.world_size, bundle_cpu=p.cpu_per_bundle, slots=slots,
                         tensor_parallel_size=cfg.rollout.tensor_parallel_size, num_nodes=p.num_nodes)
    check_plan(plan, cfg)
    return plan


def check_plan(plan: PlacementPlan, cfg: Config) -> None:
    """Raise `PlacementError` listing every problem: over-full bundles, bad ranks, bad TP split."""
    problems = _fraction_problems(plan) + _rank_problems(plan, cfg) + _engine_problems(plan, cfg)
    if problems:
        raise PlacementError("infeasible placement plan:\n  " + "\n  ".join(problems)
                             + f"\n(placement.gpu_per_role={cfg.placement.gpu_per_role}, "
                               f"placement.cpu_per_role={cfg.placement.cpu_per_role}, "
                               f"placement.cpu_per_bundle={cfg.placement.cpu_per_bundle})")


def _fraction_problems(plan: PlacementPlan) -> list[str]:
    problems = []
    for b, (gpu, cpu) in enumerate(zip(plan.bundle_gpu_sums(), plan.bundle_cpu_sums())):
        here = sorted((s for s in plan.slots if s.bundle == b), key=lambda s: ROLES.index(s.role)
                      if s.role in ROLES else len(ROLES))
        if gpu > 1.0 + FRACTION_TOLERANCE:
            terms = " + ".join(f"{s.role} {_fmt(s.gpu)}" for s in here)
            problems.append(f"bundle {b}: {terms} = {_fmt(gpu)} > 1 GPU")
        if cpu > plan.bundle_cpu + FRACTION_TOLERANCE:
            terms = " + ".join(f"{s.role} {_fmt(s.cpu)}" for s in here)
            problems.append(f"bundle {b}: {terms} = {_fmt(cpu)} > {_fmt(plan.bundle_cpu)} CPU "
                            f"(placement.cpu_per_bundle)")
    return problems


def _rank_problems(plan: PlacementPlan, cfg: Config) -> list[str]:
    n, problems = cfg.placement.world_size, []
    if plan.num_bundles != n or plan.num_nodes != cfg.placement.num_nodes:
        problems.append(f"{plan.num_bundles} bundles on {plan.num_nodes} node(s), but placement.num_nodes x "
                        f"num_gpus = {cfg.placement.num_nodes} x {cfg.placement.num_gpus}")
    for s in plan.slots:
        if not 0 <= s.bundle < plan.num_bundles:
            problems.append(f"{s.role} rank {s.rank}: bundle {s.bundle} outside 0..{plan.num_bundles - 1}")
    expected = roles_for(cfg)
    for role in sorted(set(plan.roles) - set(expected)):
        problems.append(f"role '{role}' has slots but is not run by this config (expected {', '.join(expected)})")
    for role in expected:
        slots = plan.for_role(role)
        ranks, bundles = [s.rank for s in slots], {s.bundle for s in slots}
        if ranks != list(range(n)):
            problems.append(f"role '{role}': ranks {ranks}, expected exactly 0..{n - 1}")
        elif len(bundles) != n:
            problems.append(f"role '{role}': ranks share bundles {sorted(s.bundle for s in slots)}")
    return problems


def _engine_problems(plan: PlacementPlan, cfg: Config) -> list[str]:
    tp, n = cfg.rollout.tensor_parallel_size, cfg.placement.world_size
    problems = []
    if plan.tensor_parallel_size != tp:
        problems.append(f"plan TP {plan.tensor_parallel_size} != rollout.tensor_parallel_size {tp}")
    if cfg.num_engines * tp != n:
        problems.append(f"rollout: {cfg.num_engines} engines x TP {tp} != {n} GPUs")
    for e, workers in enumerate(plan.engines()):
        nodes = sorted({plan.node_of(w.bundle) for w in workers})
        if len(nodes) > 1:  # vLLM's TP workers share weights through one node's GPUs
            problems.append(f"rollout engine {e}: TP workers on bundles {[w.bundle for w in workers]} straddle "
                            f"nodes {nodes}; rollout.tensor_parallel_size must divide placement.num_gpus")
    return problems


def create_placement_groups(plan: PlacementPlan, timeout_s: float = PG_READY_TIMEOUT_S) -> list["PlacementGroup"]:
    """Reserve the plan's bundles as one STRICT_PACK Ray placement group per node, and wait until
    all are ready. Node n's group holds bundles n*g .. n*g+g-1, as its bundles 0 .. g-1.

    Why one STRICT_PACK group per node: a bundle is one GPU, and every guarantee here is per node.
    Colocated roles share GPU i; a TP engine's workers share one node; a role group meets at its
    rank-0 node. STRICT_PACK is Ray's only strategy that keeps a set of bundles on ONE node. PACK
    may split a group anywhere when a node runs out of room, and STRICT_SPREAD puts every bundle on
    a distinct node, so a node's GPUs could never be used together. A single group cannot be told
    "these g bundles here, those g there" without knowing the node ids in advance. The cost: Ray may
    put two node groups on one physical node with room for both. Nothing then breaks, because each
    role group still meets at its own rank 0 (executor/ray.py), and weight sync stays within a GPU.

    Ray must already be initialized. Raises `PlacementError` at once if the cluster has fewer
    GPUs/CPUs in total than the groups need, or after `timeout_s` if the bundles never fit (e.g. no
    node has placement.num_gpus GPUs free).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    need = {"GPU": float(plan.num_bundles), "CPU": plan.num_bundles * plan.bundle_cpu}
    total = ray.cluster_resources()
    short = {k: v for k, v in need.items() if total.get(k, 0.0) + FRACTION_TOLERANCE < v}
    if short:
        raise PlacementError(_missing_message(plan, need, total, ray.available_resources(), "the cluster has"))
    bundles = [{"GPU": 1.0, "CPU": plan.bundle_cpu} for _ in range(plan.bundles_per_node)]
    groups = [placement_group(bundles, strategy="STRICT_PACK") for _ in range(plan.num_nodes)]
    ready, waiting = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=timeout_s)
    if waiting:
        available = ray.available_resources()
        for pg in groups:
            remove_placement_group(pg)
        raise PlacementError(_missing_message(plan, need, total, available,
                                              f"not ready after {timeout_s:g} s; the cluster has"))
    return groups


def _missing_message(plan: PlacementPlan, need: dict, total: dict, available: dict, what: str) -> str:
    def show(res: dict) -> str:
        return ", ".join(f"{k} {_fmt(res.get(k, 0.0))}" for k in need)

    nodes = f"{plan.num_nodes} nodes x " if plan.num_nodes > 1 else ""
    return (f"cannot reserve the placement group ({nodes}{plan.bundles_per_node} bundles of "
            f"{{GPU: 1, CPU: {_fmt(plan.bundle_cpu)}}} on one node; needs {show(need)}): {what} {show(total)} in "
            f"total, {show(available)} free. Start Ray with more GPUs/CPUs (`ray start --num-gpus`), or lower "
            f"placement.num_nodes / placement.num_gpus / placement.cpu_per_bundle.")
