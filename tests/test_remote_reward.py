"""model.reward_url against a real HTTP server on localhost (http.server in a thread)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hybrid_ppo.config import load_config
from hybrid_ppo.errors import one_line
from hybrid_ppo.rewards.remote import RemoteReward, RemoteRewardError
from hybrid_ppo.roles.reward import build_reward

PROMPTS, RESPONSES, LABELS = ["a", "b", "c", "d", "e"], ["1", "22", "333", "4444", "55555"], ["x", None, 3, [1], "y"]
METADATA = [{"i": i} for i in range(5)]


class RewardServer:
    """Answers each POST by the next step of `script` (the last one repeats): "ok" scores each
    response by its length, "500" fails, "slow" sleeps past the client's timeout and then answers,
    "short" drops a reward, "text" answers non-JSON, "400" refuses."""

    def __init__(self, script: list[str], slow_s: float = 1.0):
        self.script, self.slow_s, self.bodies = list(script), slow_s, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                step = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if step == "slow":
                    time.sleep(server.slow_s)
                status, answer = {"500": (500, b"boom"), "400": (400, b"bad request"), "text": (200, b"<html>")}.get(
                    step, (200, None))
                if answer is None:
                    rewards = [float(len(r)) for r in body["responses"]]
                    answer = json.dumps({"rewards": rewards[:-1] if step == "short" else rewards}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                try:
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    pass

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script, slow_s=1.0):
        servers.append(RewardServer(script, slow_s))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _client(server, retries=2, batch_size=256, timeout_s=5.0):
    return RemoteReward(server.url, timeout_s=timeout_s, retries=retries, batch_size=batch_size, backoff_s=0.01)


def test_success_sends_the_documented_body_and_splits_batches(serve):
    server = serve(["ok"])
    rewards = _client(server, batch_size=2)(PROMPTS, RESPONSES, LABELS, METADATA)
    assert rewards.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(b["responses"]) for b in server.bodies] == [2, 2, 1]  # split to the size limit, in order
    assert server.bodies[0] == {"prompts": ["a", "b"], "responses": ["1", "22"], "labels": ["x", None],
                                "metadata": [{"i": 0}, {"i": 1}]}
    assert server.bodies[2]["labels"] == ["y"]


def test_500_then_200_is_retried(serve):
    server = serve(["500", "500", "ok"])
    assert _client(server, retries=2)(PROMPTS, RESPONSES, LABELS).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(server.bodies) == 3


def test_slow_answer_times_out_then_succeeds(serve):
    server = serve(["slow", "ok"], slow_s=1.0)
    assert _client(server, retries=1, timeout_s=0.3)(PROMPTS, RESPONSES, LABELS).tolist() == [1, 2, 3, 4, 5]


def test_always_slow_fails_naming_url_and_timeout(serve):
    server = serve(["slow"], slow_s=1.0)
    with pytest.raises(RemoteRewardError) as err:
        _client(server, retries=1, timeout_s=0.3)(PROMPTS, RESPONSES, LABELS)
    assert server.url in str(err.value) and "0.3 s" in str(err.value) and "2 attempt(s)" in str(err.value)


@pytest.mark.parametrize("script, retries, expect_requests, message", [
    (["500"], 2, 3, "HTTP 500"),                     # permanent failure: every retry used
    (["400"], 2, 1, "HTTP 400"),                     # refused: not retried
    (["short"], 2, 1, "expected 5 rewards for samples 0..4, got 4 rewards"),
    (["text"], 2, 1, "expected JSON"),
])
def test_permanent_failure_is_one_line_naming_the_url(serve, script, retries, expect_requests, message):
    server = serve(script)
    with pytest.raises(RemoteRewardError) as err:
        _client(server, retries=retries)(PROMPTS, RESPONSES, LABELS)
    line, code = one_line(err.value)
    assert "\n" not in line and server.url in line and message in line, line
    assert code == 1 and len(server.bodies) == expect_requests


def test_no_server_at_all():
    client = RemoteReward("http://127.0.0.1:9/none", timeout_s=1.0, retries=1, batch_size=8, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match=r"127.0.0.1:9/none: cannot connect .*after 2 attempt"):
        client(["p"], ["r"], [None])


def test_reward_url_is_the_runs_reward_source(serve):
    server = serve(["ok"])
    cfg = load_config(None, ["model.reward_fn=null", f"model.reward_url={server.url}", "model.reward_batch_size=4"])
    scores = build_reward(cfg)(PROMPTS, RESPONSES, LABELS, METADATA)
    assert scores.total.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and scores.terms == {}
    assert [len(b["responses"]) for b in server.bodies] == [4, 1]
