"""hybrid-ppo train | plan  [CONFIG.yaml] [section.key=value ...]
hybrid-ppo resume RUN_DIR [section.key=value ...]

With no CONFIG, configs/tiny-cpu.yaml: a tiny model trained on CPU end to end. `resume` continues
a run from its latest checkpoint (train.save_every > 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from enum import Enum

import traceback

from hybrid_ppo.config import Config, load_config
from hybrid_ppo.errors import is_internal, one_line


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is the config file unless it is an override (contains '=')."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _field_help() -> str:
    lines = ["config keys (section.key=value), with their defaults:"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        for f in dataclasses.fields(cls):
            default = f.default.value if isinstance(f.default, Enum) else f.default
            lines.append(f"  {section.name}.{f.name}={default}")
            doc = _docstring_of(cls, f.name)
            if doc:
                lines.append(f"      {doc}")
    return "\n".join(lines)


def _docstring_of(cls: type, name: str) -> str:
    """The string literal right after a field in its class body (how the config documents fields)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return str(following.value.value).split("\n")[0]
    return ""


def cmd_train(cfg: Config) -> int:
    from hybrid_ppo.launch import train

    result = train(cfg)
    print(f"held-out accuracy: before PPO {result.eval_before:.3f} -> after PPO {result.eval_after:.3f}")
    print(f"run directory: {result.run_dir}  ({result.seconds:.0f}s)")
    return 0


def cmd_resume(args: list[str]) -> int:
    from hybrid_ppo.launch import resume

    if not args or "=" in args[0]:
        raise ValueError("resume needs the run directory: hybrid-ppo resume RUN_DIR [section.key=value ...]")
    result = resume(args[0], args[1:])
    print(f"held-out accuracy: before PPO {result.eval_before:.3f} -> after PPO {result.eval_after:.3f}")
    print(f"run directory: {result.run_dir}  ({result.seconds:.0f}s)")
    return 0


def cmd_plan(cfg: Config) -> int:
    from hybrid_ppo.memory.plan import PHASE_PLAN, Role, describe, resident_everything
    from hybrid_ppo.placement import make_plan

    placement = make_plan(cfg)
    print(placement.describe())
    roles = [Role(r) for r in placement.roles]
    print("\nresident states per phase (everything else is offloaded):")
    print(describe(PHASE_PLAN if cfg.memory.offload else resident_everything(), roles))
    return 0


COMMANDS = {"train": cmd_train, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-ppo", description=__doc__, epilog=_field_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="train", choices=sorted([*COMMANDS, "resume"]))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[CONFIG.yaml] [section.key=value ...]")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "resume":
            return cmd_resume(ns.args)
        path, overrides = _split_args(ns.args)
        cfg = load_config(path, overrides)
        return COMMANDS[ns.command](cfg)
    except BaseException as err:  # the one error boundary (hybrid_ppo/errors.py)
        if is_internal(err):  # a bug, and no train.log holds its traceback: show it
            traceback.print_exception(err, file=sys.stderr)
        message, code = one_line(err)
        print(f"hybrid-ppo: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
