"""coconut-serve on the loopback with a real HTTP client: completions equal generate alone, streaming (SSE),
concurrent requests, 400 for bad input, 413 for a body over the limit, 429 when the queue is full, a client
that leaves mid-stream frees its slot, stop strings, each thought's top-k tokens, and a graceful shutdown of a
server process on SIGTERM."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
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
from .helpers import CharTokenizer  # noqa: E402

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


def stream_choices(s, body) -> list[dict]:
    """The choice of every server-sent event of a streamed completion, in order."""
    out = []
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:])["choices"][0])
    return out


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
    chunks = stream_choices(srv, body)
    toks = [t for c in chunks for t in c["token_ids"]]
    finish = next((c["finish_reason"] for c in reversed(chunks) if c["finish_reason"]), None)
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


def test_return_latents_gives_each_thoughts_top_k(srv):
    prompt = [5, 6, 7, BOT, LAT, LAT, LAT, EOT]
    r = post(srv, {"prompt": prompt[:3], "latent_steps": 3, "max_tokens": 4, "temperature": 0,
                   "return_latents": 3})
    assert r.status_code == 200, r.text
    lat = r.json()["choices"][0]["latents"]
    ref = srv.lm.generate(torch.tensor([prompt]), max_new_tokens=4, return_latents=True)
    assert [t["top_token_ids"] for t in lat] == ref.latent_topk_ids[0, :, :3].tolist()
    assert all(t["top_tokens"] == [str(i) for i in t["top_token_ids"]] for t in lat)  # no tokenizer: the ids
    torch.testing.assert_close(torch.tensor([t["top_probs"] for t in lat]), ref.latent_topk_probs[0, :, :3])
    assert "latents" not in post(srv, {"prompt": [1, 2], "max_tokens": 2}).json()["choices"][0]
    assert post(srv, {"prompt": [1, 2], "return_latents": 0}).status_code == 400


def test_body_over_the_limit_is_413(srv):
    big = json.dumps({"prompt": [1] * 400_000}).encode()  # over the default 1 MiB
    r = httpx.post(f"{srv.url}/v1/completions", content=big, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    # without a Content-Length (chunked), the limit holds as the body is read
    r = httpx.post(f"{srv.url}/v1/completions", content=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                   timeout=60)
    assert r.status_code == 413
    assert post(srv, {"prompt": [1, 2], "max_tokens": 2, "temperature": 0}).status_code == 200


def stream_text(s, body):
    chunks = stream_choices(s, body)
    return "".join(c["text"] for c in chunks), next((c["finish_reason"] for c in reversed(chunks)
                                                   if c["finish_reason"]), None)


def test_multi_token_stop_strings_cut_the_text_also_when_streaming():
    tok = CharTokenizer()
    s = Server(tokenizer=tok)
    try:
        prompt = [9, 8, 7, BOT, LAT, EOT]
        full = tok.decode(alone(s.lm, prompt, 30))
        stop = full[6:9]  # three tokens
        want = full[:full.find(stop)]
        body = {"prompt": tok.decode(prompt), "max_tokens": 30, "temperature": 0, "stop": [stop, "zzzz"]}
        c = post(s, body).json()["choices"][0]
        assert c["text"] == want and c["finish_reason"] == "stop"
        assert stream_text(s, body) == (want, "stop")
        # a stop string that never appears: the whole answer, to max_tokens
        assert stream_text(s, {**body, "stop": "ZZ9"}) == (full, "length")
    finally:
        s.stop()


SERVER_SCRIPT = textwrap.dedent("""
    import sys, torch
    from coconut_kernels import LatentLM
    from coconut_kernels.engine import LatentEngine
    from coconut_kernels.models import GPT2, GPT2Config
    from coconut_kernels.serve import create_app, serve
    torch.manual_seed(0)
    V = 61
    model = GPT2(GPT2Config(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_position=1024)).eval()
    lm = LatentLM(model, V - 2, V - 3, V - 1, -1)  # no EOS: an answer runs to max_tokens
    app = create_app(LatentEngine(lm, 2, 1024), "tiny")
    serve(app, "127.0.0.1", int(sys.argv[1]), shutdown_timeout=60, log_level="warning")
""")


def test_sigterm_lets_the_running_request_finish_and_exits_0(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "serve_tiny.py"
    script.write_text(SERVER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, "the server process did not start", polls=1200)
        body = {"prompt": [5, 6], "max_tokens": 400, "temperature": 0, "stream": True}
        chunks, tokens = [], 0
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            tokens += len(json.loads(first[6:])["choices"][0]["token_ids"])
            assert tokens < 400
            proc.send_signal(signal.SIGTERM)  # mid-request
            for line in lines:
                if line.startswith("data: "):
                    chunks.append(line[6:])
        assert chunks[-1] == "[DONE]"  # the stream ended cleanly, not cut
        last = json.loads(chunks[-2])["choices"][0]
        tokens += sum(len(json.loads(c)["choices"][0]["token_ids"]) for c in chunks[:-1])
        assert last["finish_reason"] == "length" and tokens == 400  # it finished
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):  # and nothing listens any more
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
