"""coconut-serve on the loopback with a real HTTP client: completions equal generate alone, streaming (SSE),
concurrent requests, 400 for bad input, 429 when the queue is full, a client that leaves mid-stream frees its
slot."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from coconut_kernels import LatentLM  # noqa: E402
from coconut_kernels.engine import LatentEngine  # noqa: E402
from coconut_kernels.models import GPT2, GPT2Config  # noqa: E402
from coconut_kernels.serve import create_app  # noqa: E402

V = 61
EOS, BOT, LAT, EOT = V - 4, V - 3, V - 2, V - 1


def tiny_lm():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_position=96)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    return LatentLM(model, LAT, BOT, EOT, EOS)



def wait_until(condition, failure: str, polls: int = 400, pause: float = 0.05) -> None:
    """Poll `condition` a bounded number of times (about 20 s in all); fail with `failure` if it never holds."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(pause)
    raise AssertionError(failure)

class Server:
    def __init__(self, **kw):
        self.lm = tiny_lm()
        self.engine = LatentEngine(self.lm, 4, 96)
        self.app = create_app(self.engine, "tiny", **kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def srv():
    s = Server()
    yield s
    s.stop()


def alone(lm, prompt, max_tokens):
    ref = lm.generate(torch.tensor([prompt]), max_new_tokens=max_tokens)
    return ref.tokens[0, :int(ref.lengths[0])].tolist()


def post(srv, body, timeout=60):
    return httpx.post(f"{srv.url}/v1/completions", json=body, timeout=timeout)


def test_health_and_models(srv):
    assert httpx.get(f"{srv.url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"


def test_completion_equals_generate_alone(srv):
    r = post(srv, {"prompt": [5, 6, 7], "latent_steps": 2, "max_tokens": 8, "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["token_ids"] == alone(srv.lm, [5, 6, 7, BOT, LAT, LAT, EOT], 8) and c["n_latents"] == 2
    assert len(c["logprobs"]["model_logprobs"]) == len(c["token_ids"])


def test_n_samples_and_seed(srv):
    body = {"prompt": [5, 6, BOT, LAT, EOT], "n": 3, "max_tokens": 8, "temperature": 1.5, "seed": 3}
    a, b = post(srv, body).json(), post(srv, body).json()
    assert len(a["choices"]) == 3 and [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]


def test_stream_equals_non_stream(srv):
    body = {"prompt": [9, 8, BOT, LAT, LAT, EOT], "max_tokens": 10, "temperature": 0}
    whole = post(srv, body).json()["choices"][0]
    toks, finish = [], None
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                c = json.loads(line[6:])["choices"][0]
                toks += c["token_ids"]
                finish = c["finish_reason"] or finish
    assert toks == whole["token_ids"] and finish == whole["finish_reason"]


def test_concurrent_requests(srv):
    prompts = [[i, i + 1, BOT] + [LAT] * (i % 4) + [EOT] for i in range(1, 9)]
    with ThreadPoolExecutor(8) as ex:
        res = list(ex.map(lambda p: post(srv, {"prompt": p, "max_tokens": 6, "temperature": 0}), prompts))
    for p, r in zip(prompts, res):
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == alone(srv.lm, p, 6)


@pytest.mark.parametrize("body, match", [
    ({"prompt": [], "max_tokens": 4}, "empty"),
    ({"prompt": [1, 2], "beams": 2}, "unknown field"),
    ({"prompt": [1, 2], "n": 9}, "n"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens must be"),  # the request's own field name
    ({"prompt": [1] * 97}, "limit"),
    ({"prompt": [1, LAT, EOT]}, "latent"),
    ({"prompt": "hello"}, "tokenizer"),
])
def test_bad_input_is_400(srv, body, match):
    r = post(srv, body)
    assert r.status_code == 400 and match in r.json()["error"]["message"]
    assert post(srv, {"prompt": [1, 2], "max_tokens": 2, "temperature": 0}).status_code == 200


def test_client_leaving_mid_stream_frees_its_slot(srv):
    body = {"prompt": [3, 4, BOT, LAT, EOT], "max_tokens": 80, "temperature": 1.0, "stream": True,
            "stop": [EOS]}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    wait_until(lambda: not httpx.get(f"{srv.url}/health", timeout=10).json()["running"],
               "the aborted request still holds its slot")
    assert all(s is None for s in srv.engine.slots)


def test_full_queue_is_429():
    s = Server(max_queue=0)
    try:
        r = post(s, {"prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 429 and "max_queue" in r.json()["error"]["message"]
    finally:
        s.stop()
