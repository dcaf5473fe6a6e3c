#!/usr/bin/env python
"""Check that .whl/ holds what scripts/gpu_check.sh needs on the GPU image, without that image.

    python scripts/check_gpu_bundle.py [.whl]

* every distribution the check imports and the image lacks has exactly one wheel;
* each wheel installs on the image's CPython 3.12, x86_64 Linux;
* every requirement of every wheel (as evaluated on that Python) is met by another wheel in the
  bundle, with a matching version, or is a package the image has (KINDS.md's list, below);
* the bundle fits in the parts the device tool carries, one per command (`PART_LIMIT_BYTES`, in
  .gpu_bundle/<k>/: make_gpu_bundle.sh cuts them).
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

NEEDED = {"deepspeed", "omegaconf", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions", "ray"}
IMAGE_HAS = {  # /work/.library/device/KINDS.md, the 'cuda' image's package list (the ones our wheels ask for)
    "torch", "triton", "transformers", "numpy", "packaging", "psutil", "py-cpuinfo", "msgpack", "ninja", "einops",
    "tqdm", "pyyaml", "matplotlib", "rich", "nvidia-ml-py", "pytest", "accelerate", "safetensors", "tokenizers",
    "filelock"}  # filelock: torch needs it
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PART_LIMIT_BYTES = 60 << 20  # what one part (one device-tool command, which carries 64 MiB) may take
PARTS_DIR = ".gpu_bundle"


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode())


def _installable(wheel: Path) -> bool:
    _, _, _, tags = parse_wheel_filename(wheel.name)
    return any((t.interpreter in ("py3", "cp312") and t.abi in ("none", "abi3", "cp312")
                or (t.abi == "abi3" and t.interpreter.startswith("cp3") and int(t.interpreter[3:]) <= 12))  # stable ABI
               and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
               for t in tags)


def check(bundle: Path) -> list[str]:
    wheels = sorted(bundle.glob("*.whl"))
    if not wheels:
        return [f"{bundle}/ has no wheels: run scripts/make_gpu_bundle.sh"]
    problems, versions = [], {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in versions:
            problems.append(f"two wheels of {name}")
        versions[name] = version
        if not _installable(wheel):
            problems.append(f"{wheel.name}: does not install on CPython 3.12 / x86_64 Linux")
    problems += [f"missing a wheel of {name}" for name in sorted(NEEDED - set(versions))]
    for wheel in wheels:
        for line in _metadata(wheel).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET):
                continue
            dep = canonicalize_name(req.name)
            if dep in versions:
                if not req.specifier.contains(versions[dep], prereleases=True):
                    problems.append(f"{wheel.name} needs {req}, the bundle has {dep} {versions[dep]}")
            elif dep not in IMAGE_HAS:
                problems.append(f"{wheel.name} needs {req}: neither in the bundle nor in the GPU image")
    parts = sorted(p for p in (bundle.parent / PARTS_DIR).glob("*") if p.is_dir())
    if not parts:
        problems.append(f"no parts in {bundle.parent / PARTS_DIR}/: run scripts/make_gpu_bundle.sh")
    for part in parts:
        size = sum(f.stat().st_size for f in part.iterdir())
        if size >= PART_LIMIT_BYTES:
            problems.append(f"part {part.name} is {size / 2**20:.1f} MiB, not under {PART_LIMIT_BYTES >> 20} MiB")
    return problems


def main() -> int:
    bundle = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    problems = check(bundle)
    for p in problems:
        print(f"bundle: {p}")
    if not problems:
        total = sum(w.stat().st_size for w in bundle.glob("*.whl"))
        print(f"bundle ok: {len(list(bundle.glob('*.whl')))} wheels, {total >> 10} KiB")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
