"""``opd serve MODEL --port P``: a teacher behind vLLM's OpenAI-compatible protocol.

For a teacher on a machine without vLLM, and for the tests. Two endpoints, in the shape vLLM
serves them (vLLM's ``vllm/entrypoints/openai/protocol.py`` and ``vllm/logprobs.py``;
https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html):

- ``GET /v1/models`` -> ``{"object": "list", "data": [{"id", "object": "model",
  "owned_by", "max_model_len", "opd_vocab_size"}]}``; ``opd_vocab_size`` (the tokenizer's
  ids) is opd's addition, which the client checks at connect time.
- ``POST /v1/completions`` with ``{"prompt": [token ids], "max_tokens": 0 | 1,
  "prompt_logprobs": K}`` -> ``{"choices": [{"index": 0, "text": "", "prompt_logprobs":
  [null, {id: {"logprob", "rank", "decoded_token"}}, ...]}]}``: entry ``i`` is the
  distribution that predicts prompt token ``i`` (the first is ``null``), holding the K most
  likely ids and the prompt's own token (vLLM's ``PromptLogprobs``; ids are JSON object keys,
  so strings). ``rank`` is exact for ids in the top K and ``null`` for the prompt's token
  outside it (vLLM computes every rank). No token is generated (``text`` is empty).

Concurrent requests are batched: a worker thread takes every request waiting (up to
``max_batch`` rows) and scores them in one padded forward pass (:class:`HFTeacher`, length
buckets, the head on kept positions only). Log-probs are at temperature 1, as vLLM's.
"""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from opd.batch import make_batch
from opd.models.hf import HFTeacher, load_model, load_tokenizer


class _Job:
    def __init__(self, ids: list[int], k: int):
        self.ids, self.k, self.done = ids, k, threading.Event()
        self.result: list | None = None
        self.error: str | None = None


def prompt_logprobs(ids: list[int], token_logp: list[float], top_ids: list[list[int]], top_logp: list[list[float]],
                    decode) -> list:
    """vLLM's ``prompt_logprobs`` list for prompt ``ids``: ``None``, then per position the
    top-K ids and the prompt's own token, each ``{"logprob", "rank", "decoded_token"}``."""
    out: list = [None]
    for t, token in enumerate(ids[1:]):
        entry = {str(i): {"logprob": lp, "rank": r + 1, "decoded_token": decode(i)}
                 for r, (i, lp) in enumerate(zip(top_ids[t], top_logp[t]))}
        entry.setdefault(str(token), {"logprob": token_logp[t], "rank": None, "decoded_token": decode(token)})
        out.append(entry)
    return out


class TeacherServer:
    """The model, its tokenizer and the batching worker behind the HTTP handler."""

    def __init__(self, model_path: str, *, name: str | None = None, max_batch: int = 64, device: str = "cpu",
                 dtype: str = "float32"):
        self.tokenizer = load_tokenizer(model_path, what="served model")
        model = load_model(model_path, dtype, what="served model").to(device)
        self.teacher = HFTeacher(model, eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id)
        self.name, self.max_batch = name or model_path, max_batch
        self.positions = getattr(model.config, "max_position_embeddings", None)
        self.jobs: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def models(self) -> dict:
        entry = {"id": self.name, "object": "model", "owned_by": "opd", "max_model_len": self.positions,
                 "opd_vocab_size": len(self.tokenizer)}
        return {"object": "list", "data": [entry]}

    def submit(self, ids: list[int], k: int) -> _Job:
        job = _Job(ids, k)
        self.jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                self._score(jobs)
            except Exception as err:  # noqa: BLE001 (answered as a 500; the server stays up)
                for job in jobs:
                    job.error = f"{type(err).__name__}: {err}"
            for job in jobs:
                job.done.set()

    @torch.no_grad()
    def _score(self, jobs: list[_Job]) -> None:
        """One padded pass over every job: token ``i`` of each prompt scored from ``< i``."""
        k = max(job.k for job in jobs)
        batch = make_batch([j.ids[:1] for j in jobs], [j.ids[1:] for j in jobs], self.teacher.pad_id)
        scores = self.teacher.score(batch, topk=k)
        decode = lambda i: self.tokenizer.convert_ids_to_tokens(i)  # noqa: E731
        for b, job in enumerate(jobs):
            n = len(job.ids) - 1
            job.result = prompt_logprobs(
                job.ids, scores.token_logp_BT[b, :n].tolist(), scores.topk_ids_BTK[b, :n, : job.k].tolist(),
                scores.topk_logp_BTK[b, :n, : job.k].tolist(), decode,
            )


def _handler(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: one line per request is noise here
            return

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, server.models())
            return self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                ids, k = req["prompt"], int(req.get("prompt_logprobs") or 0)
                if not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)) or k < 1:
                    raise ValueError("prompt must be a non-empty list of token ids and prompt_logprobs >= 1")
                if int(req.get("max_tokens", 1)) > 1:
                    raise ValueError("this server scores prompts only: max_tokens must be 0 or 1")
            except (ValueError, KeyError, TypeError) as err:
                return self._send(400, {"error": {"message": str(err), "type": "BadRequestError"}})
            job = server.submit(ids, k)
            job.done.wait()
            if job.error is not None:
                return self._send(500, {"error": {"message": job.error}})
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "prompt_logprobs": job.result}
            return self._send(200, {"object": "text_completion", "model": server.name, "choices": [choice]})

    return Handler


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    """Serve ``model_path`` until interrupted (one line on stderr when ready)."""
    import sys

    server = TeacherServer(model_path, **kw)
    httpd = ThreadingHTTPServer((host, port), _handler(server))
    print(f"opd serve: {server.name} on http://{host}:{httpd.server_address[1]}/v1", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
