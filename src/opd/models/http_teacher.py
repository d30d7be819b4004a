"""A teacher behind an OpenAI-compatible server: vLLM's ``/v1/completions`` with ``prompt_logprobs``.

``teacher=http://HOST:PORT/v1`` (several comma-separated URLs: rows are spread over them in
turn). Each row's prompt and completion go as one prompt of token ids with ``max_tokens: 1``
and ``prompt_logprobs: K``; the answer's ``choices[0].prompt_logprobs`` holds, per prompt
position, a map from token id to ``{logprob, rank, decoded_token}`` with the K most likely
ids and the position's own token, the first entry ``null`` (vLLM's ``PromptLogprobs``,
``vllm/logprobs.py``; the request fields in ``vllm/entrypoints/openai/protocol.py``). vLLM's
server must allow K (``vllm serve TEACHER --max-logprobs K``).

What the scores hold: the completion tokens' log-probs (exact), the top-K ids and
log-probs (exact), and the entropy of the top-K with the remaining mass spread evenly over
the other ``V - K`` ids (exact when K = V; else an estimate: a top-K server sends no more).
Log-probs are at temperature 1, as vLLM computes them; another temperature, or a method that
needs the teacher's full distribution, is refused at start (``full_logits = False``).

Requests run concurrently in a bounded pool (``concurrency``), each with a timeout, retried
with exponential backoff on a connection error, a timeout or a 5xx answer (``retries``);
``take_retries()`` returns and resets the count the loop logs as ``teacher/retries``. The API
key is ``OPENAI_API_KEY`` unless given. At connect time ``GET /v1/models`` must answer within
the timeout (else one error naming the URL) and, when the server reports
``opd_vocab_size`` (``opd serve`` does; vLLM does not), it must be the student tokenizer's.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from opd.batch import SeqBatch
from opd.errors import UserError
from opd.models.base import Scores


def is_http(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(("http://", "https://"))


class HTTPTeacher:
    full_logits = False  # top-K log-probs only

    def __init__(self, spec: str, *, topk: int = 8, timeout_s: float = 30.0, retries: int = 5, concurrency: int = 16,
                 api_key: str | None = None, backoff_s: float = 0.5):
        self.urls = [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]
        self.topk, self.timeout_s, self.retries, self.backoff_s = topk, timeout_s, retries, backoff_s
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self._turn, self._lock, self._retries = itertools.count(), threading.Lock(), 0
        self.models = [self._connect(url) for url in self.urls]
        self.model_name = self.models[0]["id"]
        sizes = {m.get("opd_vocab_size") for m in self.models} - {None}
        if len(sizes) > 1:
            raise UserError(f"the teacher servers {', '.join(self.urls)} serve different vocabularies ({sorted(sizes)})")
        self.vocab_size = sizes.pop() if sizes else None  # None: the server does not say (vLLM)

    # ------------------------------------------------------------- transport
    def _request(self, url: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def _connect(self, url: str) -> dict:
        try:
            listing = self._request(f"{url}/models")
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise UserError(f"the teacher server at {url} does not answer ({getattr(err, 'reason', err)}); start it "
                            f"(opd serve MODEL --port P, or vllm serve MODEL --max-logprobs K) or fix teacher=") from None
        data = listing.get("data") or []
        if not data:
            raise UserError(f"the teacher server at {url} lists no model at {url}/models")
        return data[0]

    def _post(self, body: dict) -> dict:
        """POST ``/completions`` to the next server in turn, retried with backoff."""
        url = self.urls[next(self._turn) % len(self.urls)]
        for attempt in range(self.retries + 1):
            try:
                return self._request(f"{url}/completions", body)
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == self.retries:
                    detail = err.read().decode(errors="replace")[:300]
                    raise UserError(f"the teacher server at {url} refused a request ({err.code}: {detail})") from None
            except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as err:
                # HTTPException: e.g. IncompleteRead, a server killed while it sent the body
                if attempt == self.retries:
                    raise UserError(f"the teacher server at {url} failed {self.retries + 1} times in a row "
                                    f"({getattr(err, 'reason', err)}); check it and resume the run") from None
            with self._lock:
                self._retries += 1
            time.sleep(self.backoff_s * 2**attempt)
            url = self.urls[next(self._turn) % len(self.urls)]
        raise AssertionError("unreachable")

    def take_retries(self) -> int:
        with self._lock:
            n, self._retries = self._retries, 0
        return n

    # ------------------------------------------------------------- scoring
    def score(self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0) -> Scores:
        if full:
            raise UserError("a server teacher returns top-K log-probs only; this method needs the full distribution")
        if temperature != 1.0:
            raise UserError("a server teacher scores at temperature 1 (vLLM's prompt log-probs); set the loss "
                            "temperature to 1 or use a local teacher")
        k = max(topk, 1)
        rows = [(p, c) for p, c in zip(batch.prompts(), batch.completions())]
        answers = list(self.pool.map(lambda pc: self._row(pc[0], pc[1], k), rows))
        return self._scores(answers, rows, batch, k)

    def _row(self, prompt: list[int], completion: list[int], k: int) -> list:
        if not completion:
            return []
        body = {"model": self.model_name, "prompt": prompt + completion, "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}
        entries = self._post(body)["choices"][0]["prompt_logprobs"]
        return entries[len(prompt):]  # the entries that predict the completion tokens

    def _scores(self, answers: list, rows: list, batch: SeqBatch, k: int) -> Scores:
        B, T = batch.completion_mask_BT.shape
        V = self.vocab_size or 0
        uniform = -math.log(V) if V else 0.0
        token_BT = torch.full((B, T), uniform, device="cpu")
        entropy_BT = torch.full((B, T), -uniform, device="cpu")
        ids_BTK = torch.arange(k, device="cpu").expand(B, T, k).clone()
        logp_BTK = torch.full((B, T, k), uniform, device="cpu")
        for b, (entries, (_, completion)) in enumerate(zip(answers, rows)):
            for t, (entry, token) in enumerate(zip(entries, completion)):
                pairs = sorted(((int(i), float(v["logprob"])) for i, v in entry.items()), key=lambda p: -p[1])
                token_BT[b, t] = float(entry[str(token)]["logprob"])
                top = pairs[:k]
                ids_BTK[b, t, : len(top)] = torch.tensor([i for i, _ in top], device="cpu")
                logp_BTK[b, t, : len(top)] = torch.tensor([lp for _, lp in top], device="cpu")
                entropy_BT[b, t] = topk_entropy([lp for _, lp in top], V)
        return Scores(token_BT, entropy_BT, ids_BTK, logp_BTK)


def topk_entropy(logps: list[float], vocab: int) -> float:
    """``-Σ_topK p log p`` plus the rest of the mass spread evenly over the other ids."""
    probs = [math.exp(lp) for lp in logps]
    h = -sum(p * lp for p, lp in zip(probs, logps) if p > 0)
    rest, others = max(0.0, 1.0 - sum(probs)), vocab - len(logps)
    if rest > 0 and others > 0:
        h -= rest * math.log(rest / others)
    return h
