"""Shared plumbing for the kernel files: triton imported at first launch, never at import.

Why not ``import triton`` at the top of the kernel files:

* triton is a Linux-x86-only dependency. The PyTorch references beside the kernels (and
  ``hybrid_ppo.ops`` with ``backend="torch"``) must import and run without it.
* ``import triton`` imports ``triton.language``, whose own helpers (``tl.max``, ``tl.sum``, ...) are
  jitted at that moment, in the mode that ``TRITON_INTERPRET`` selects *then*. Importing triton early,
  before a test harness sets ``TRITON_INTERPRET=1``, leaves those helpers uninterpretable for the rest
  of the process. Importing it at the first launch lets the caller decide up to that point.

So kernels are written as plain functions decorated with :func:`lazy_jit`. On first launch
:class:`LazyJit` imports triton, binds ``tl`` (``triton.language``) and any :func:`device_fn` helpers
into the kernel module's globals, and applies ``triton.jit``. Kernel signatures annotate
``BLOCK: tl.constexpr`` under ``from __future__ import annotations``, so the annotation stays a string
until triton reads it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

#: Whether triton is installed (checked without importing it).
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when triton kernels run under the CPU interpreter (``TRITON_INTERPRET`` as triton parses it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def require_triton(device: Any) -> None:
    """Raise a clear error when a triton kernel cannot run on ``device``."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed (it is a Linux x86-64 dependency); use backend='torch'")
    if getattr(device, "type", str(device)) != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' on {device} tensors needs TRITON_INTERPRET=1 (the CPU interpreter); "
            "use backend='auto' or 'torch' on CPU"
        )


class DeviceFn:
    """A ``@triton.jit`` helper called from inside kernels (a scan's combine function, a tile helper
    that two kernels share).

    Jitted when a kernel of the same module launches, once per mode: ``triton.jit`` gives a
    ``JITFunction`` for compiled kernels and an ``InterpretedFunction`` under the interpreter (the only
    kind that a kernel can call there; both expose ``.fn``, which the interpreter's scans call).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: dict[bool, Any] = {}

    def jitted(self, mode: bool) -> Any:
        if mode not in self._jitted:
            import triton

            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode]


def device_fn(fn: Callable[..., Any]) -> DeviceFn:
    """Decorator: mark ``fn`` as a device helper, jitted at first launch (see :class:`DeviceFn`)."""
    return DeviceFn(fn)


class LazyJit:
    """``triton.jit`` applied at first launch, once per mode (compiled / interpreted).

    ``kernel[grid](**kwargs)`` works as with a plain ``@triton.jit`` kernel.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: dict[bool, Any] = {}

    def jitted(self) -> Any:
        mode = interpreter_enabled()
        if mode not in self._jitted:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language
            self._jitted[mode] = triton.jit(self.fn)
        # The module's helpers, bound for this mode (a name bound in the other mode would not run here).
        namespace = self.fn.__globals__  # the kernel module's globals
        helpers = namespace.setdefault("_device_fns_", {n: v for n, v in namespace.items() if isinstance(v, DeviceFn)})
        for name, helper in helpers.items():
            namespace[name] = helper.jitted(mode)
        return self._jitted[mode]

    def __getitem__(self, grid: Any) -> Any:
        return self.jitted()[grid]


def lazy_jit(fn: Callable[..., Any]) -> LazyJit:
    """Decorator form of :class:`LazyJit` for kernels launched with ``kernel[grid](...)``."""
    return LazyJit(fn)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (for n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
