"""hybrid-ppo train | plan [--json] | profile [--iterations N]  [CONFIG.yaml] [section.key=value ...]
hybrid-ppo resume RUN_DIR [section.key=value ...]

With no CONFIG, configs/tiny-cpu.yaml: a tiny model trained on CPU end to end. `resume` continues
a run from its latest checkpoint (train.save_every > 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from enum import Enum

from hybrid_ppo.config import Config, load_config
from hybrid_ppo.errors import InputError, is_internal, one_line, save_traceback


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

    return _report(train(cfg))


def _report(result) -> int:
    """The last lines of a run: "accuracy" only for a 0/1 rule reward, else the mean reward."""
    what = "held-out accuracy" if result.eval_is_accuracy else "held-out mean reward"
    print(f"{what}: before PPO {result.eval_before:.3f} -> after PPO {result.eval_after:.3f}")
    print(f"run directory: {result.run_dir}  ({result.seconds:.0f}s)")
    return 0


def cmd_resume(args: list[str]) -> int:
    from hybrid_ppo.launch import resume

    if not args or "=" in args[0]:
        raise InputError("resume needs the run directory: hybrid-ppo resume RUN_DIR [section.key=value ...]")
    return _report(resume(args[0], args[1:]))


def cmd_plan(cfg: Config, as_json: bool = False) -> int:
    from hybrid_ppo.launch import memory_plan
    from hybrid_ppo.memory.plan import Role, describe
    from hybrid_ppo.memory.estimate import estimate
    from hybrid_ppo.placement import make_plan

    placement = make_plan(cfg)
    memory = estimate(cfg, placement.roles)
    if as_json:
        import json

        print(json.dumps(memory.as_dict(), indent=2))
        return 0
    print(placement.describe())
    roles = [Role(r) for r in placement.roles]
    print("\nresident states per phase (everything else is offloaded):")
    print(describe(memory_plan(cfg), roles))
    print()
    print(memory.table())
    return 0


def cmd_profile(cfg: Config, iterations: int = 3) -> int:
    from hybrid_ppo.profile_run import profile

    result = profile(cfg, iterations)
    print(result.table)
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "profile": cmd_profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid-ppo", description=__doc__, epilog=_field_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="train", choices=sorted([*COMMANDS, "resume"]))
    parser.add_argument("--json", action="store_true", help="plan: print the estimate as JSON")
    parser.add_argument("--iterations", type=int, default=3, help="profile: PPO iterations to run (default 3)")
    parser.add_argument("args", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    ns = parser.parse_intermixed_args(argv)  # options may come after the command
    options = {"plan": {"as_json": ns.json}, "profile": {"iterations": ns.iterations}}.get(ns.command, {})
    try:
        if ns.command == "resume":
            return cmd_resume(ns.args)
        path, overrides = _split_args(ns.args)
        cfg = load_config(path, overrides)
        return COMMANDS[ns.command](cfg, **options)
    except BaseException as err:  # the one error boundary (hybrid_ppo/errors.py)
        # A bug, and no train.log holds its traceback: keep it in a file the line names.
        message, code = one_line(err, save_traceback(err) if is_internal(err) else None)
        print(f"hybrid-ppo: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
