"""The transformers rollout engine: `generate()` behind the vLLM-shaped engine protocol.

It is the engine on CPU and the fallback where vLLM is not installed. The model is built from its
config alone; its weights arrive from the actor through `load_weights`, exactly as vLLM's will,
never by sharing a module object. transformers allocates its KV cache per `generate` call, so
the `kv_cache` tag has nothing to free or allocate here; it is tracked so the same phase plan
drives both engines.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from hybrid_ppo.rollout.engine import (Generation, SamplingParams, check_wake_tags, check_weight, left_pad, pad_responses,
                                       response_mask)
from hybrid_ppo.special_tokens import resolve_special_tokens
from hybrid_ppo.rollout.weight_sync import BucketHandle, OpenedBuffers, probe_opened


class HFEngine:
    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.special = device, resolve_special_tokens(model_path)
        self.awake = {"weights", "kv_cache"}
        self._host: dict[str, Tensor] = {}  # level-1 sleep keeps weights here
        self._shapes = {name: p.shape for name, p in self._params().items()}
        self._loaded: set[str] = set()  # random init is not a policy: generate() waits for a sync
        self._buffers = OpenedBuffers(device)  # the actor's staging buffers, open during a sync

    def _params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generation:
        if self.awake != {"weights", "kv_cache"}:
            raise RuntimeError(f"HF engine asked to generate while asleep (awake: {sorted(self.awake)})")
        missing = set(self._params()) - self._loaded
        if missing:
            raise RuntimeError(f"HF engine has no weights loaded for {len(missing)} parameter(s), "
                               f"e.g. {sorted(missing)[0]!r}: sync from the actor first")
        if not prompt_token_ids:  # an engine with no share of a small batch
            empty = torch.empty(0, sampling.max_new_tokens, dtype=torch.long)
            return Generation(empty, empty.clone(), torch.zeros(empty.shape))
        pad_id, eos_ids = self.special.pad_id, list(self.special.eos_ids)
        ids, attention = left_pad(prompt_token_ids, pad_id)
        width = ids.shape[1]
        knobs = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        # generate() samples from torch's global RNG: seed a fork of it, so the seed decides the
        # sample and nothing else in this process (the local executor shares it) is disturbed.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attention.to(self.device),
                                      max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_ids,
                                      pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True,
                                      **knobs)
        responses = pad_responses(out.sequences[:, width:].cpu(), sampling.max_new_tokens, pad_id)
        mask = response_mask(responses, eos_ids)
        return Generation(responses, mask, _sampled_logprobs(out.scores, responses, mask))

    def sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        for name, param in self._params().items():
            if level == 1 and "weights" in self.awake:
                self._host[name] = param.data.to("cpu", copy=True)
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        if level == 2:
            self._loaded.clear()
        self.awake.clear()

    def wake_up(self, tags: list[str]) -> None:
        for tag in check_wake_tags(tags):
            if tag == "weights" and "weights" not in self.awake:
                for name, param in self._params().items():
                    host = self._host.pop(name, None)
                    param.data = host.to(self.device) if host is not None else torch.empty(
                        self._shapes[name], dtype=param.dtype, device=self.device)
            self.awake.add(tag)

    def memory_bytes(self) -> dict[str, int]:
        """Weights at their full size (asleep or not); the KV cache is per `generate` call, so 0."""
        weights = sum(shape.numel() * p.element_size() for shape, p in zip(self._shapes.values(), self._params().values()))
        return {"weights": weights, "kv_cache": 0}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        if "weights" not in self.awake:
            raise RuntimeError("HF engine: wake_up(['weights']) before load_weights")
        params = self._params()
        for name, tensor in weights:
            check_weight("HF engine", self._shapes, name, tensor.shape)
            params[name].copy_(tensor)
            self._loaded.add(name)

    def load_bucket(self, handles: list[BucketHandle]) -> None:
        """Copy one staged bucket into the parameters (TP=1: one handle)."""
        if len(handles) != 1:
            raise ValueError(f"HF engine has one worker; got {len(handles)} bucket handles")
        with self._buffers.bucket(handles[0]) as named:
            self.load_weights(named)

    def probe_bucket(self, handles: list[BucketHandle]) -> str | None:
        return probe_opened(handles[0], self.device)

    def close(self) -> None:
        self._buffers.close()  # nothing else outlives this process

    def finish_weight_sync(self) -> None:
        self._buffers.close()
        missing = set(self._params()) - self._loaded
        if missing:
            raise RuntimeError(f"HF engine: the sync ended without {len(missing)} parameter(s), e.g. {sorted(missing)[0]!r}")


def _sampled_logprobs(scores: tuple[Tensor, ...], responses: Tensor, mask: Tensor) -> Tensor:
    """[B, R] log-prob of each sampled token under the distribution generate() sampled from (its
    processed scores: after temperature and top-p, as vLLM's `processed_logprobs`); 0 on padding.
    One [B, V] step at a time, so no [B, R, V] float32 copy is made."""
    logprobs = torch.zeros(responses.shape, dtype=torch.float32)
    for t, step in enumerate(scores[:responses.shape[1]]):
        tokens = responses[:, t:t + 1].to(step.device)
        logprobs[:, t] = torch.log_softmax(step.float(), -1).gather(-1, tokens)[:, 0].cpu()
    return torch.where(mask.bool(), logprobs, 0.0)  # a pad token may lie outside top-p: -inf there
