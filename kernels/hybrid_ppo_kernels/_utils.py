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
    """A ``@triton.jit`` helper called from inside kernels (e.g. a scan's combine function).

    Becomes a plain ``JITFunction`` when a kernel of the same module first launches: compiled kernels
    need one, and the interpreter calls its ``.fn`` directly, so one object serves both modes.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__


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
            from triton.runtime.jit import JITFunction

            namespace = self.fn.__globals__  # the kernel module's globals
            namespace["tl"] = triton.language
            for name, value in list(namespace.items()):
                if isinstance(value, DeviceFn):
                    namespace[name] = JITFunction(value.fn)
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode]

    def __getitem__(self, grid: Any) -> Any:
        return self.jitted()[grid]


def lazy_jit(fn: Callable[..., Any]) -> LazyJit:
    """Decorator form of :class:`LazyJit` for kernels launched with ``kernel[grid](...)``."""
    return LazyJit(fn)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (for n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
