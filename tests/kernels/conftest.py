"""Kernel tests run natively on CUDA, and under triton's CPU interpreter otherwise.

``TRITON_INTERPRET`` must be set before triton is first imported: ``import triton`` jits triton's own
``tl.*`` helpers in the mode selected at that moment. Our modules import triton only at a kernel's
first launch (``hybrid_ppo_kernels._utils``), so setting the variable here, at conftest import, is early
enough unless something else imported triton first; then we stop with a clear message. Test modules
import nothing from this file (a bare ``conftest`` module name is shared by every test folder).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        import triton.language as _tl
        from triton.runtime.interpreter import InterpretedFunction as _Interpreted

        if not isinstance(_tl.standard.max, _Interpreted):
            raise RuntimeError(
                "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so its "
                "tl.* helpers cannot be interpreted. Run with TRITON_INTERPRET=1 in the environment, or "
                "set it in a conftest.py that loads earlier (e.g. tests/conftest.py)."
            )
