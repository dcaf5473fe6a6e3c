"""A remote reward service: `model.reward_url`.

Each batch is POSTed as JSON, at most `batch_size` samples per request:

    {"prompts": [str], "responses": [str], "labels": [any], "metadata": [dict]}

and the service answers `{"rewards": [float, ...]}`, one finite number per sample, in order. A
request that times out (`timeout_s`), cannot connect, or gets HTTP 5xx or 429 is retried up to
`retries` times with exponential backoff (backoff_s, 2 backoff_s, 4 backoff_s, ...). Any other
4xx, an answer that is not JSON, or one with the wrong number of rewards is not retried: the
service answered and retrying would get the same. Every failure is one `RemoteRewardError` that
names the URL and the HTTP status (or why there was none).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import requests
import torch
from torch import Tensor

from hybrid_ppo.errors import HybridPPOError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Answers worth another try: the service is overloaded or restarting, not refusing the request."""


class RemoteRewardError(HybridPPOError, RuntimeError):
    """The reward service failed for good; the message names the URL and the status."""


class RemoteReward:
    """POSTs batches to a reward service; a `rewards.combine.Scorer`."""

    def __init__(self, url: str, timeout_s: float, retries: int, batch_size: int, backoff_s: float = 1.0):
        self.url, self.timeout_s, self.retries, self.batch_size, self.backoff_s = url, timeout_s, retries, batch_size, backoff_s
        self.session = requests.Session()  # one connection pool for the run's requests

    def __call__(self, prompts: list[str], responses: list[str], labels: list[Any] | None,
                 metadata: list[dict] | None = None) -> Tensor:
        n = len(responses)
        labels = list(labels) if labels is not None else [None] * n
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        rewards: list[float] = []
        for start in range(0, n, self.batch_size):
            rows = slice(start, start + self.batch_size)
            body = {"prompts": list(prompts[rows]), "responses": list(responses[rows]), "labels": labels[rows],
                    "metadata": metadata[rows]}
            rewards.extend(self._post(body, start))
        return torch.tensor(rewards, dtype=torch.float32)

    def _post(self, body: dict, first_row: int) -> list[float]:
        try:
            payload = json.dumps(body)
        except (TypeError, ValueError) as err:
            raise RemoteRewardError(f"reward service {self.url}: samples {first_row}.. cannot be sent as JSON "
                                    f"({err}); labels and metadata must be JSON values") from None
        attempts, why = self.retries + 1, ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                answer = self.session.post(self.url, data=payload, timeout=self.timeout_s,
                                           headers={"Content-Type": "application/json"})
            except requests.Timeout:
                why = f"no answer within model.reward_timeout_s = {self.timeout_s:g} s"
                continue
            except requests.ConnectionError as err:
                why = f"cannot connect ({type(err).__name__})"
                continue
            if answer.status_code in RETRY_STATUSES:
                why = f"HTTP {answer.status_code}: {answer.text[:200]!r}"
                continue
            if answer.status_code != 200:
                raise RemoteRewardError(f"reward service {self.url}: HTTP {answer.status_code}: {answer.text[:200]!r}")
            return self._rewards(answer, len(body["responses"]), first_row)
        raise RemoteRewardError(f"reward service {self.url}: {why} (after {attempts} attempt(s); "
                                f"model.reward_retries = {self.retries})")

    def _rewards(self, answer: requests.Response, expected: int, first_row: int) -> list[float]:
        """The answer's rewards, checked: JSON, {"rewards": [...]}, the right count, finite numbers."""
        where = f"reward service {self.url}: HTTP {answer.status_code}"
        try:
            rewards = answer.json().get("rewards")
        except (ValueError, AttributeError):
            raise RemoteRewardError(f"{where}: expected JSON {{\"rewards\": [...]}}, got {answer.text[:200]!r}") from None
        if not isinstance(rewards, list) or len(rewards) != expected:
            got = f"{len(rewards)} rewards" if isinstance(rewards, list) else repr(rewards)[:100]
            raise RemoteRewardError(f"{where}: expected {expected} rewards for samples {first_row}..{first_row + expected - 1}, "
                                    f"got {got}")
        for i, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RemoteRewardError(f"{where}: reward {value!r} for sample {first_row + i}; expected a finite number")
        return [float(v) for v in rewards]
