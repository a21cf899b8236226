"""/v1/completions (OpenAI-compatible, with latent extra fields), /v1/models and /health over a LatentEngine.

One worker thread owns the engine: it steps while requests are unfinished and hands each request's new tokens
to its HTTP handler (an asyncio queue per request). A prompt is a list of token ids, or a string when a
tokenizer is given. Extra fields: `latent_steps` (append `<bot> <latent>*k <eot>` to the prompt), `latent_stop`
(the thought's stop rule, as LatentLM.generate's `stop`), `feedback`, `seed`, `top_k`, `return_latents` (true
or k: each thought's k most likely tokens, default 5, with their probabilities). `stop` takes token ids and,
with a tokenizer, strings of any length: a sample ends once its text contains one, and the text is cut before
it, as OpenAI does (a stream holds back the last characters that could begin a stop string). Bad input is a 400
with a JSON error body, a body over max_body_bytes a 413; a full queue is a 429; a server shutting down lets
running requests finish (uvicorn's graceful shutdown), then answers 503 and cancels what still runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import validation
from .._cli import run_cli
from ..errors import CoconutError
from ..engine import LatentEngine, SamplingParams

KNOWN = {"model", "prompt", "n", "temperature", "top_p", "max_tokens", "stop", "logprobs", "stream", "latent_steps",
         "latent_stop", "feedback", "seed", "top_k", "user", "return_latents"}


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
               max_prompt_tokens: int | None = None, max_body_bytes: int = 1 << 20):
    """The FastAPI app over `engine`; the worker thread starts now and stops at the app's shutdown. The
    engine decodes stop strings with `tokenizer` when it has none of its own."""
    lm = engine.lm
    if tokenizer is not None and engine.tokenizer is None:
        engine.tokenizer = tokenizer
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
        if not isinstance(stop, list):
            raise CoconutError(f"stop must be a string, a token id or a list of them, got {stop!r:.60}")
        stop_strings = [s for s in stop if isinstance(s, str)]
        if stop_strings and tokenizer is None:
            raise CoconutError("stop strings need a tokenizer; this server takes token ids in stop")
        stop_ids = [s for s in stop if not isinstance(s, str)]
        k = body.get("return_latents", False)
        if not isinstance(k, (bool, int)) or (not isinstance(k, bool) and k < 1):
            raise CoconutError(f"return_latents must be true, false or a top-k >= 1, got {k!r}")
        params = SamplingParams(n=body.get("n", 1), max_tokens=body.get("max_tokens", 16),
                                do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                                top_k=body.get("top_k", 0), top_p=body.get("top_p", 1.0),
                                stop=body.get("latent_stop"), feedback=body.get("feedback"),
                                stop_token_ids=tuple(stop_ids), stop_strings=tuple(stop_strings),
                                seed=body.get("seed"), return_latents=k is not False,
                                latent_topk=5 if isinstance(k, bool) else k, logprobs=body.get("logprobs") is not None)
        return ids, params, bool(body.get("stream", False)), body.get("logprobs")

    def tok_str(ids):
        return [tokenizer.decode([t]) for t in ids] if tokenizer is not None else [str(t) for t in ids]

    def text(s):
        """A sample's answer so far: cut before its stop string once one ended it."""
        if s.text is not None and s.finish_reason is not None:
            return s.text
        return tokenizer.decode(s.token_ids) if tokenizer is not None else ""

    def choice(i, s, want_logprobs, start=0, text_start=0, text_end=None):
        c = {"index": i, "text": text(s)[text_start:text_end], "token_ids": s.token_ids[start:],
             "finish_reason": s.finish_reason, "n_latents": s.n_latents}
        if want_logprobs is not None:
            c["logprobs"] = {"tokens": tok_str(s.token_ids[start:]), "token_logprobs": s.logprobs[start:],
                             "model_logprobs": s.model_logprobs[start:]}
        if s.latent_topk_ids is not None and start == 0:
            c["latents"] = [{"top_tokens": tok_str(ids), "top_token_ids": ids, "top_probs": probs}
                            for ids, probs in zip(s.latent_topk_ids.tolist(), s.latent_topk_probs.tolist())]
        return c

    @app.get("/health")
    def health():
        return {"status": "ok", "waiting": len(engine.waiting), "running": len(engine.running)}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "coconut_kernels"}]}

    async def read_body(request: Request) -> bytes | None:
        """The body, or None when it is over max_body_bytes (by its Content-Length or, without one, as read)."""
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            return None
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                return None
        return bytes(data)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request)
        if raw is None:
            return _error(413, f"the request body is larger than this server's limit of {max_body_bytes} bytes "
                               "(max_body_bytes)", "invalid_request_error")
        try:
            body = json.loads(raw)
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

        # the characters a stream holds back while they could still begin a stop string
        hold = max((len(x) for x in params.stop_strings), default=1) - 1

        async def events():
            sent, sent_text = [0] * params.n, [0] * params.n
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
                            final = kind == "done" or s.finish_reason is not None
                            safe = len(text(s)) if final else max(sent_text[i], len(text(s)) - hold)
                            c = choice(i, s, want_logprobs, sent[i], sent_text[i], safe)
                            c["token_ids"] = s.token_ids[sent[i]:end]
                            if kind != "done":
                                c["finish_reason"] = None
                            sent[i], sent_text[i] = end, safe
                            yield f"data: {json.dumps({**head, 'choices': [c]})}\n\n"
                    if kind == "done":
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client left (or the stream ended): free the request's slots if it still runs
                worker.abort(rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0,
          log_level: str = "info") -> None:
    """Run `app` under uvicorn until SIGINT or SIGTERM, then shut down gracefully: stop accepting, let running
    requests finish for up to shutdown_timeout seconds (then cancel them), stop the engine, and return, so that
    the process exits 0. (uvicorn alone re-raises the signal after its shutdown, which ends the process with the
    signal's status, as if it had been killed.)"""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=shutdown_timeout)).run()


def main(argv=None) -> int:
    """coconut-serve CHECKPOINT: serve a Hugging Face folder as a LatentLM (LatentLM.from_pretrained: the ids
    not given come from its tokenizer, which also makes string prompts possible) on --host:--port. A user error
    prints ``coconut-serve: error: ...`` and returns 2 (the traceback only with ``--debug``)."""
    return run_cli("coconut-serve", _main, argv)


def _main(argv: list[str]) -> int:
    import argparse

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
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get a 413")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="seconds running requests may take to finish after SIGTERM before they are cancelled")
    a = ap.parse_args(argv)
    # the flags before the model is loaded, under their own names
    validation.check_int(a.port, "--port", low=0, high=65535)
    validation.check_int(a.max_batch, "--max-batch", low=1)
    validation.check_int(a.max_queue, "--max-queue", low=1)
    if a.max_tokens is not None:
        validation.check_int(a.max_tokens, "--max-tokens", low=2)
    validation.check_int(a.max_body_bytes, "--max-body-bytes", low=1)
    validation.check_real(a.shutdown_timeout, "--shutdown-timeout", low=0.0)
    lm = LatentLM.from_pretrained(a.checkpoint, latent_token_id=a.latent_token_id, start_latent_id=a.start_latent_id,
                                  end_latent_id=a.end_latent_id, eos_token_id=a.eos_token_id)
    app = create_app(LatentEngine(lm.eval(), a.max_batch, a.max_tokens), a.checkpoint, tokenizer=lm.tokenizer,
                     max_queue=a.max_queue, max_body_bytes=a.max_body_bytes)
    serve(app, a.host, a.port, shutdown_timeout=a.shutdown_timeout)
    return 0
