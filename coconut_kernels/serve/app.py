"""/v1/completions (OpenAI-compatible, with latent extra fields), /v1/models and /health over a LatentEngine.

One worker thread owns the engine: it steps while requests are unfinished and hands each request's new tokens
to its HTTP handler (an asyncio queue per request). A prompt is a list of token ids, or a string when a
tokenizer is given. Extra fields: `latent_steps` (append `<bot> <latent>*k <eot>` to the prompt), `latent_stop`
(the thought's stop rule, as LatentLM.generate's `stop`), `feedback`, `seed`, `top_k`. `stop` takes token
ids (strings too with a tokenizer: each must be one token). Bad input is a 400 with a JSON error body; a full
queue is a 429; a server shutting down answers 503 and cancels what still runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import validation
from .._cli import run_cli
from ..errors import CoconutError
from ..engine import LatentEngine, SamplingParams

KNOWN = {"model", "prompt", "n", "temperature", "top_p", "max_tokens", "stop", "logprobs", "stream", "latent_steps",
         "latent_stop", "feedback", "seed", "top_k", "user"}


class EngineWorker:
    """The thread that steps the engine. submit() validates and queues (CoconutError for bad input), and
    delivers ("tokens", request_id, samples) after every step that grew them and ("done", output) at the end."""

    def __init__(self, engine: LatentEngine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.lock = threading.Condition()
        self.subs: dict[int, tuple] = {}  # request id -> (loop, asyncio queue)
        self.sent: dict[int, list[int]] = {}
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="coconut-engine", daemon=True)
        self.thread.start()

    def submit(self, ids, params: SamplingParams, loop, queue) -> int:
        with self.lock:
            if self.closing:
                raise RuntimeError("shutting down")
            if len(self.subs) >= self.max_queue:
                raise OverflowError(f"the server holds {len(self.subs)} requests, its limit (max_queue)")
            rid = self.engine.add(ids, params)
            self.subs[rid] = (loop, queue)
            self.sent[rid] = [0] * params.n
            self.lock.notify()
        return rid

    def abort(self, rid: int) -> None:
        with self.lock:
            self.engine.abort(rid)
            self.subs.pop(rid, None)
            self.sent.pop(rid, None)

    def close(self) -> None:
        """Stop taking requests, cancel the running ones (their clients get an error), end the thread."""
        with self.lock:
            self.closing = True
            for rid, (loop, q) in list(self.subs.items()):
                self.engine.abort(rid)
                loop.call_soon_threadsafe(q.put_nowait, ("error", "the server is shutting down"))
            self.subs.clear()
            self.lock.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.closing and not self.engine.has_unfinished():
                    self.lock.wait()
                if self.closing:
                    return
                done = self.engine.step()
                for rid, (loop, q) in list(self.subs.items()):
                    samples = self.engine.progress(rid)
                    if samples is not None and [len(s.token_ids) for s in samples] != self.sent[rid]:
                        self.sent[rid] = [len(s.token_ids) for s in samples]
                        loop.call_soon_threadsafe(q.put_nowait, ("tokens", rid, samples))
                for out in done:
                    sub = self.subs.pop(out.request_id, None)
                    self.sent.pop(out.request_id, None)
                    if sub is not None:
                        sub[0].call_soon_threadsafe(sub[1].put_nowait, ("done", out))


def _error(status: int, message: str, kind: str):
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(engine: LatentEngine, model_name: str = "coconut", *, tokenizer=None, max_queue: int = 64,
               max_prompt_tokens: int | None = None):
    """The FastAPI app over `engine`; the worker thread starts now and stops at the app's shutdown."""
    lm = engine.lm
    worker = EngineWorker(engine, max_queue)
    limit = engine.max_tokens if max_prompt_tokens is None else max_prompt_tokens

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()  # graceful shutdown: running requests are cancelled, their clients told so

    app = FastAPI(title="coconut-serve", lifespan=lifespan)
    app.state.worker = worker

    def to_ids(x, what):
        if isinstance(x, str):
            if tokenizer is None:
                raise CoconutError(f"{what}: a string needs a tokenizer; this server takes lists of token ids")
            return tokenizer.encode(x)
        if isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            return x
        raise CoconutError(f"{what} must be a list of token ids{' or a string' if tokenizer else ''}, got {x!r:.60}")

    def parse(body: dict):
        unknown = sorted(set(body) - KNOWN)
        if unknown:
            raise CoconutError(f"unknown field(s) {unknown}: expected some of {sorted(KNOWN)}")
        if "prompt" not in body:
            raise CoconutError("prompt is required")
        ids = to_ids(body["prompt"], "prompt")
        k = body.get("latent_steps")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise CoconutError(f"latent_steps must be an int >= 0, got {k!r}")
            ids = ids + [lm.start_latent_id] + [lm.latent_token_id] * k + [lm.end_latent_id]
        if len(ids) > limit:
            raise CoconutError(f"prompt has {len(ids)} tokens, more than this server's limit of {limit}")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise CoconutError(f"temperature must be a number, got {temperature!r}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, (str, int)) else stop
        stop_ids = []
        for s in stop:
            t = to_ids(s, "stop") if isinstance(s, str) else [s]
            if len(t) != 1:
                raise CoconutError(f"stop {s!r} is {len(t)} tokens: each stop must be one token")
            stop_ids.append(t[0])
        params = SamplingParams(n=body.get("n", 1), max_tokens=body.get("max_tokens", 16),
                                do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                                top_k=body.get("top_k", 0), top_p=body.get("top_p", 1.0),
                                stop=body.get("latent_stop"), feedback=body.get("feedback"),
                                stop_token_ids=tuple(stop_ids), seed=body.get("seed"))
        return ids, params, bool(body.get("stream", False)), body.get("logprobs")

    def text(ids):
        return tokenizer.decode(ids) if tokenizer is not None else ""

    def choice(i, s, want_logprobs, start=0):
        c = {"index": i, "text": text(s.token_ids[start:]), "token_ids": s.token_ids[start:],
             "finish_reason": s.finish_reason, "n_latents": s.n_latents}
        if want_logprobs is not None:
            c["logprobs"] = {"tokens": [str(t) for t in s.token_ids[start:]],
                             "token_logprobs": s.logprobs[start:], "model_logprobs": s.model_logprobs[start:]}
        return c

    @app.get("/health")
    def health():
        return {"status": "ok", "waiting": len(engine.waiting), "running": len(engine.running)}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "coconut_kernels"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"the body must be JSON: {err}", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ids, params, stream, want_logprobs = parse(body)
            rid = worker.submit(ids, params, loop, queue)
        except CoconutError as err:
            return _error(400, str(err), "invalid_request_error")
        except TypeError as err:
            return _error(400, f"bad field type: {err}", "invalid_request_error")
        except OverflowError as err:
            return _error(429, str(err), "rate_limit_error")
        except RuntimeError as err:
            return _error(503, str(err), "server_error")
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_name}

        if not stream:
            try:
                while True:
                    kind, *rest = await queue.get()
                    if kind == "done":
                        out = rest[0]
                        break
                    if kind == "error":
                        return _error(503, rest[0], "server_error")
            except asyncio.CancelledError:
                worker.abort(rid)
                raise
            if out.error is not None:
                return _error(500, f"generation failed: {out.error}", "server_error")
            return {**head, "choices": [choice(i, s, want_logprobs) for i, s in enumerate(out.samples)],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": sum(len(s.token_ids)
                                                                                  for s in out.samples)}}

        async def events():
            sent = [0] * params.n
            try:
                while True:
                    kind, *rest = await queue.get()
                    if kind == "error":
                        yield f"data: {json.dumps({'error': {'message': rest[0]}})}\n\n"
                        break
                    samples = rest[-1] if kind == "tokens" else rest[0].samples
                    if kind == "done" and rest[0].error is not None:
                        yield f"data: {json.dumps({'error': {'message': str(rest[0].error)}})}\n\n"
                        break
                    for i, s in enumerate(samples):
                        end = len(s.token_ids)
                        if end > sent[i] or (kind == "done"):
                            c = choice(i, s, want_logprobs, sent[i])
                            c["token_ids"] = s.token_ids[sent[i]:end]
                            if kind != "done":
                                c["finish_reason"] = None
                            sent[i] = end
                            yield f"data: {json.dumps({**head, 'choices': [c]})}\n\n"
                    if kind == "done":
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client left (or the stream ended): free the request's slots if it still runs
                worker.abort(rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv=None) -> int:
    """coconut-serve CHECKPOINT: serve a Hugging Face folder as a LatentLM (LatentLM.from_pretrained: the ids
    not given come from its tokenizer, which also makes string prompts possible) on --host:--port. A user error
    prints ``coconut-serve: error: ...`` and returns 2 (the traceback only with ``--debug``)."""
    return run_cli("coconut-serve", _main, argv)


def _main(argv: list[str]) -> int:
    import argparse

    import uvicorn

    from ..latent import LatentLM

    ap = argparse.ArgumentParser(prog="coconut-serve", description=main.__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    for name in ("latent-token-id", "start-latent-id", "end-latent-id", "eos-token-id"):
        ap.add_argument(f"--{name}", type=int, default=None, help="default: from the checkpoint's tokenizer")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=None, help="positions per slot (default: the model's)")
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    # the flags before the model is loaded, under their own names
    validation.check_int(a.port, "--port", low=0, high=65535)
    validation.check_int(a.max_batch, "--max-batch", low=1)
    validation.check_int(a.max_queue, "--max-queue", low=1)
    if a.max_tokens is not None:
        validation.check_int(a.max_tokens, "--max-tokens", low=2)
    lm = LatentLM.from_pretrained(a.checkpoint, latent_token_id=a.latent_token_id, start_latent_id=a.start_latent_id,
                                  end_latent_id=a.end_latent_id, eos_token_id=a.eos_token_id)
    app = create_app(LatentEngine(lm.eval(), a.max_batch, a.max_tokens), a.checkpoint, tokenizer=lm.tokenizer,
                     max_queue=a.max_queue)
    uvicorn.run(app, host=a.host, port=a.port)
    return 0
