"""The programmable teacher: the exact next-token distribution after any prefix.

The oracle reads the problem from the prompt ids alone (its first word picks the family's
:class:`~opd.testbed.steps.Grammar`), then walks the completion once, left to right, keeping
the state of the solution grammar (closed steps, the step in progress, deviations so far).
At every position the walk names an *intended* word ``i`` and a set ``W`` of
plausible-but-wrong words; the knobs turn that into a distribution. Where a family allows
several equally right words (``two_orders``: a step's operands in either order) the walk
names a set ``I`` of them, each with the logit ``s`` below, and any of them is no deviation.

Intended word:
- ``recovers=True`` (default): on a correct prefix, the reference's next word. From the
  first wrong word of a step on (a *deviation*), ``wait``, until a ``wait`` is written;
  then the first word of the step that held the earliest uncorrected deviation, and the
  rest of that step and the solution (see the correction grammar in
  :mod:`opd.testbed.steps`). At a ``wait`` slot ``W`` = {the word that would continue the
  wrong prefix}. A word the family calls a legal action (the ring walk's other move,
  :attr:`~opd.testbed.steps.Grammar.legal`) is not a mistake: the walk goes on from it, as
  DAgger's expert does from any state (it still counts as a deviation for ``decay``).
- ``recovers=False``: the word that continues the written prefix as if it were right
  (the grammar's ``next_token`` trusting what was written: the next step copies the
  written carry/value, the answer copies the written results).
- Both: after ``<eos>``, or once the answer is complete, ``<eos>``. Words that do not fit
  the grammar (garbage) make ``wait`` intended (``W`` empty); an unparseable prompt makes
  ``<eos>`` intended everywhere. A *deviation* is any written word that differs from the
  word this oracle intended at its position.

``recover_prob = r`` in (0, 1) (with ``recovers=True``) makes a teacher that recovers from
a deviation only sometimes: its distribution is the mixture ``r p_rec + (1 - r) p_cont`` of
the recovering and the continuing oracle, each walking the prefix on its own (so after a
deviation it puts mass ``r`` on ``wait`` and ``1 - r`` on the consistent wrong continuation).

Distribution, with ``L`` the live tokens (all but ``<pad>``, ``<bos>``, ``<unk>``), ``D``
the dead ones, ``s = sharpness``::

    q_v = exp(s [v = i] + DEAD_LOGIT [v in D]) / Z,  Z = e^s + (|L| - 1) + |D| e^DEAD_LOGIT
    (with a set I: s [v in I], Z = |I| e^s + (|L| - |I|) + |D| e^DEAD_LOGIT)
    p_v = (1 - eps) q_v + eps [v in W'] / |W'|,      W' = W if W else L \\ {i}
    eps = 1 - (1 - noise) (1 - decay)^n

``n`` is the number of deviations in the prefix (``decay_mode="deviations"``) or the
number of completion tokens before the position (``decay_mode="position"``). So
``sharpness`` is the logit gap of the intended word over every other live word; ``noise``
is the mass moved onto plausible-but-wrong words (other digits at a digit slot; at a slot
with no plausible alternative, e.g. ``=`` or ``;``, onto all other live words); with
``noise_kind="off_by_one"`` it all goes to one of them, the next digit of ``W`` after the
intended one (cyclically: ``i + 1 mod 10`` for addition's digits), a biased rather than a
uniform error; ``decay``
makes that mass grow geometrically toward 1 with deviations or position (coverage decay).
With ``noise_legal_only`` the noise goes to the legal alternatives alone (``W`` = the ring
walk's other move) and positions without one get none: samples that take detours and walk
back, never slip.
Scoring at temperature ``tau`` uses ``logits = log p / tau``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from opd.batch import SeqBatch
from opd.models.base import Scores
from opd.testbed.steps import Grammar
from opd.testbed.tokenizer import BOS, DIGITS, EOS, PAD, SEP, UNK, VOCAB, WAIT

DEAD_LOGIT = -30.0  # <pad>, <bos>, <unk>: finite but never sampled in practice
DECAY_MODES = ("deviations", "position")
NOISE_KINDS = ("uniform", "off_by_one")


class Target(NamedTuple):
    intended: int  # the token id the oracle intends at this position
    plausible: tuple[int, ...]  # W, the plausible-but-wrong ids (empty: all other live ids)
    deviations: int  # deviations in the prefix before this position
    position: int  # completion tokens before this position


class _Walk:
    """Incremental grammar state of one sequence: one pass, O(step length) work per word."""

    __slots__ = (
        "grammar", "spec", "recovers", "committed", "cur", "err", "last", "dev", "pos", "done"
    )

    def __init__(self, grammar: Grammar | None, spec, recovers: bool):
        self.grammar, self.spec, self.recovers = grammar, spec, recovers
        self.committed: list[tuple[str, ...]] = []
        self.cur: list[str] = []
        self.err: int | None = None  # step of the earliest uncorrected deviation
        self.last: int | None = None  # step of the last non-wait word
        self.dev = self.pos = 0
        self.done = False

    def target(self) -> tuple[str, tuple[str, ...]]:
        if self.spec is None or self.done:
            return EOS, ()
        word, plausible = self.grammar.next_token(self.spec, self.committed, self.cur)
        if self.recovers and self.err is not None:
            intended = word if isinstance(word, tuple) else (word,) if word not in (None, WAIT) else ()
            return WAIT, intended
        if word is None:
            return WAIT, ()
        intended = word if isinstance(word, tuple) else (word,)
        return word, tuple(w for w in plausible if w not in intended)

    def legal(self, word: str) -> bool:
        legal = self.grammar.legal if self.grammar is not None else None
        return legal is not None and self.spec is not None and legal(self.spec, self.committed, self.cur, word)

    def push(self, word: str, intended: tuple[str, ...]) -> None:
        self.pos += 1
        if word not in intended:
            self.dev += 1
            if self.recovers and self.err is None and word != WAIT and not self.legal(word):
                self.err = len(self.committed)
        if self.done:
            return
        if word == EOS:
            self.done = True
        elif word == WAIT:
            redo = len(self.committed) if self.last is None else self.last
            redo = redo if self.err is None else min(self.err, redo)
            self.committed, self.cur, self.err, self.last = self.committed[:redo], [], None, redo
        elif word == SEP:
            self.last = len(self.committed)
            self.committed.append(tuple(self.cur))
            self.cur = []
        else:
            self.last = len(self.committed)
            self.cur.append(word)


class OracleTeacher:
    """A program teacher for the testbed tasks; implements :class:`opd.models.base.Teacher`.

    Args:
        task: optional; a testbed task (from :func:`opd.testbed.tasks.make_task`) checked to
            be one the oracle knows. The oracle reads every problem from its prompt, so one
            oracle serves every family and horizon.
        tokenizer: the testbed tokenizer (default: :func:`build_tokenizer`).
        sharpness: logit gap ``s`` between the intended word and every other live word.
        noise: base mass ``eps`` in [0, 1) spread on plausible-but-wrong words.
        decay: in [0, 1); ``eps`` grows as ``1 - (1 - noise)(1 - decay)^n``.
        decay_mode: ``"deviations"`` (n = deviations in the prefix) or ``"position"``.
        recovers: correct a wrong prefix with ``wait`` + the redone step (True) or continue
            it as if it were right (False).
        grammars: keyword -> Grammar (default: every testbed family).
        recover_prob: with ``recovers``, the weight ``r`` of the recovering oracle in a
            mixture with the continuing one (module doc); 1 is the recovering oracle.
        noise_kind: ``"uniform"`` over ``W`` or ``"off_by_one"`` (module doc).
        noise_legal_only: the noise goes only to legal alternatives (the ring walk's other
            move) and there is none elsewhere: a teacher whose samples take detours and walk
            back, never slip (DART's noise injection).
        two_orders: on addition, a step's two operand digits may come in either order
            (:func:`opd.testbed.addition.two_orders_grammar`): both are intended at the
            step's first slot, a legitimately uncertain position.
        blind_spot: 0 (off), or ``n``: a verifiable blind spot on addition, where problems
            with ``n`` or more carries in a row get their carries dropped
            (:func:`opd.testbed.addition.blind_spot_grammar`); ``eval_subsets`` then names
            them (``blind_spot``) and the others (``rest``) for the evaluation.
    """

    def __init__(
        self,
        task=None,
        tokenizer=None,
        *,
        sharpness: float = 10.0,
        noise: float = 0.0,
        decay: float = 0.0,
        decay_mode: str = "deviations",
        recovers: bool = True,
        grammars: dict[str, Grammar] | None = None,
        blind_spot: int = 0,
        recover_prob: float = 1.0,
        noise_kind: str = "uniform",
        two_orders: bool = False,
        noise_legal_only: bool = False,
    ):
        if not (0.0 <= noise < 1.0 and 0.0 <= decay < 1.0):
            raise ValueError("noise and decay must lie in [0, 1)")
        if not 0.0 < recover_prob <= 1.0 or (recover_prob < 1.0 and not recovers):
            raise ValueError("recover_prob must lie in (0, 1], and below 1 only with recovers=True "
                             "(recovers=False is the continuing oracle, recover_prob 0)")
        if noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}")
        if decay_mode not in DECAY_MODES:
            raise ValueError(f"decay_mode must be one of {DECAY_MODES}")
        if tokenizer is None:
            from opd.testbed.tokenizer import build_tokenizer

            tokenizer = build_tokenizer()
        if grammars is None:
            from opd.testbed.tasks import GRAMMARS as grammars
        self.eval_subsets = {}
        if blind_spot or two_orders:
            from opd.testbed import addition

            add = addition.blind_spot_grammar(blind_spot) if blind_spot else grammars[addition.KEYWORD]
            grammars = {**grammars, addition.KEYWORD: addition.two_orders_grammar(add) if two_orders else add}
        if blind_spot:
            self.eval_subsets = {"blind_spot": lambda p: addition.in_blind_spot(p, blind_spot),
                                 "rest": lambda p: not addition.in_blind_spot(p, blind_spot)}
        if task is not None:
            from opd.testbed.tasks import TASKS

            if getattr(task, "name", None) not in TASKS:
                raise ValueError(f"the oracle only knows the testbed tasks {sorted(TASKS)}")
        self.sharpness, self.noise, self.decay = float(sharpness), float(noise), float(decay)
        self.decay_mode, self.recovers, self.grammars = decay_mode, recovers, grammars
        self.noise_kind, self.noise_legal_only = noise_kind, noise_legal_only
        # mixture components: (recovers, log weight); one component unless 0 < recover_prob < 1
        self._parts = [(recovers, 0.0)] if recover_prob == 1.0 else [(True, math.log(recover_prob)), (False, math.log1p(-recover_prob))]
        vocab = tokenizer.get_vocab()
        missing = [w for w in VOCAB if w not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks testbed words {missing}; use build_tokenizer()")
        self.vocab_size = len(tokenizer)
        self.full_logits = True
        self.words = [UNK] * self.vocab_size
        for w, i in vocab.items():
            self.words[i] = w
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.eos_token_id, self.wait_token_id = self.ids[EOS], self.ids[WAIT]
        self.pad_token_id = self.ids[PAD]
        dead = torch.zeros(self.vocab_size, dtype=torch.bool, device="cpu")  # a program: it runs on the host
        dead[[self.ids[w] for w in (PAD, BOS, UNK) if w in self.ids]] = True
        self.live_V = ~dead
        n_live, n_dead = int(self.live_V.sum()), int(dead.sum())
        log_z = math.log(math.exp(self.sharpness) + (n_live - 1) + n_dead * math.exp(DEAD_LOGIT))
        self._base_V = torch.where(dead, DEAD_LOGIT, 0.0).double() - log_z
        self._keys: dict[tuple, int] = {}  # walk.target() (+ "legal" with noise_legal_only) -> row
        self._rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first i, log q, log U(W'))
        self._words_of_row: list[tuple[str, ...]] = []  # the intended words of each row
        self._table: tuple[torch.Tensor, ...] | None = None

    # ----------------------------------------------------------------- the walk
    def _start(self, prompt_ids: Sequence[int]) -> list[_Walk]:
        """One walk per mixture component (one unless ``recover_prob`` is in (0, 1))."""
        words = [self._word(i) for i in prompt_ids]
        words = [w for w in words if w not in (PAD, BOS)]
        starts = [i for i, w in enumerate(words) if w in self.grammars]
        words = words[starts[-1]:] if starts else words  # a context may put y* or a draft before x
        grammar = self.grammars.get(words[0]) if words else None
        spec = grammar.parse_prompt(words) if grammar is not None else None
        return [_Walk(grammar, spec, recovers) for recovers, _ in self._parts]

    def _word(self, i: int) -> str:
        return self.words[i] if 0 <= i < self.vocab_size else UNK

    def _row(self, walk: _Walk) -> tuple[int, float]:
        """Push-independent part of a position: (row in the target table, n for the decay)."""
        key = walk.target()
        if self.noise_legal_only:  # W: the legal alternatives only; none: no noise at this position
            key = (key[0], tuple(w for w in key[1] if walk.legal(w)), "legal")
        row = self._keys.get(key)
        if row is None:
            row = self._keys[key] = len(self._rows)
            words = key[0] if isinstance(key[0], tuple) else (key[0],)
            intended = [self.ids[w] for w in words]
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device="cpu")
            mask[[self.ids[w] for w in self._spread_words(words[0], key[1]) if w in self.ids]] = True
            if not mask.any() and not self.noise_legal_only:
                mask = self.live_V.clone()
            mask[intended] = False
            log_q = self._log_q(intended)
            spread_V = torch.full_like(self._base_V, -math.inf).masked_fill(mask, -math.log(mask.sum())) if mask.any() else log_q
            self._rows.append((intended[0], log_q, spread_V))
            self._words_of_row.append(words)
            self._table = None
        n = walk.dev if self.decay_mode == "deviations" else walk.pos
        return row, float(n)

    def _log_q(self, intended: list[int]) -> torch.Tensor:
        """log q [V]: the logit ``sharpness`` on each intended id (module doc), normalized."""
        base_V = self._base_V.clone()
        if len(intended) == 1:
            base_V[intended[0]] += self.sharpness
            return base_V
        base_V[intended] += self.sharpness
        return base_V - torch.logsumexp(base_V, 0)

    def _spread_words(self, intended: str, plausible: tuple[str, ...]) -> tuple[str, ...]:
        """The words the noise mass goes to (before the all-live fallback for an empty set)."""
        if self.noise_kind == "uniform" or intended not in DIGITS or not plausible:
            return plausible
        digits = sorted(int(w) for w in plausible if w in DIGITS)
        after = [d for d in digits if d > int(intended)]
        return (str((after or digits)[0]),) if digits else plausible

    def _advance(self, walk: _Walk, token: int, row: int) -> None:
        walk.push(self._word(token), self._words_of_row[row])

    def _mixed(self, rows_C: list[list[int]], n_C: list[list[float]]) -> torch.Tensor:
        """log p [N, V]: the mixture over components of :meth:`_logp` (rows and n per component)."""
        parts = [w + self._logp(rows, n) for (_, w), rows, n in zip(self._parts, rows_C, n_C)]
        return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), 0)

    def _logp(self, rows: list[int], n: list[float]) -> torch.Tensor:
        """log p [N, V] in float64 for table rows ``rows`` and decay counts ``n``."""
        if self._table is None:
            self._table = tuple(torch.stack([r[i] for r in self._rows]) for i in (1, 2))
        base_RV, spread_RV = self._table
        rows_N = torch.tensor(rows, dtype=torch.long, device="cpu")
        n_N = torch.tensor(n, dtype=torch.float64, device="cpu")
        log_keep_N = math.log1p(-self.noise) + n_N * math.log1p(-self.decay)  # log(1 - eps)
        log_eps_N = torch.log(-torch.expm1(log_keep_N))
        return torch.logaddexp(
            log_keep_N[:, None] + base_RV[rows_N], log_eps_N[:, None] + spread_RV[rows_N]
        )

    # ----------------------------------------------------------------- public API
    def trace(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[Target]:
        """The oracle's target at each completion position (intended id, W, n counts); of the
        first mixture component (the recovering oracle) when there are two."""
        walk, out = self._start(prompt_ids)[0], []
        for tok in completion_ids:
            word, plausible = walk.target()
            words = word if isinstance(word, tuple) else (word,)
            ids = tuple(self.ids[w] for w in plausible)
            out.append(Target(self.ids[words[0]], ids, walk.dev, walk.pos))
            walk.push(self._word(tok), words)
        return out

    def next_logprobs(
        self, prompt_ids: Sequence[int], prefix_ids: Sequence[int], temperature: float = 1.0
    ) -> torch.Tensor:
        """``log softmax(log p / temperature)`` [V] (float32) of the next token after the prefix."""
        walks = self._start(prompt_ids)
        for tok in prefix_ids:
            for walk in walks:
                self._advance(walk, tok, self._row(walk)[0])
        rows = [self._row(walk) for walk in walks]
        logp_V = self._mixed([[r] for r, _ in rows], [[n] for _, n in rows])[0]
        return torch.log_softmax(logp_V / temperature, -1).float()

    def score(
        self, batch: SeqBatch, *, topk: int = 8, full: bool = False, temperature: float = 1.0
    ) -> Scores:
        """Scores of every completion column of ``batch`` (one O(T) walk per row)."""
        comp_BT = batch.completion_ids_BT
        B, T = comp_BT.shape
        rows_C, n_C = [[] for _ in self._parts], [[] for _ in self._parts]
        for prompt, tokens in zip(batch.prompts(), comp_BT.tolist()):
            for c, walk in enumerate(self._start(prompt)):
                for tok in tokens:
                    row, n = self._row(walk)
                    rows_C[c].append(row)
                    n_C[c].append(n)
                    self._advance(walk, tok, row)
        logits_BTV = (self._mixed(rows_C, n_C) / temperature).view(B, T, self.vocab_size)
        logq_BTV = torch.log_softmax(logits_BTV, -1)
        token_logp_BT = logq_BTV.gather(-1, comp_BT.cpu()[..., None]).squeeze(-1)
        entropy_BT = -(logq_BTV.exp() * logq_BTV).sum(-1)
        topk_logp_BTK, topk_ids_BTK = logq_BTV.topk(min(topk, self.vocab_size), dim=-1)
        dev = batch.input_ids_BL.device
        return Scores(
            token_logp_BT=token_logp_BT.float().to(dev),
            entropy_BT=entropy_BT.float().to(dev),
            topk_ids_BTK=topk_ids_BTK.to(dev),
            topk_logp_BTK=topk_logp_BTK.float().to(dev),
            logits_BTV=logits_BTV.float().to(dev) if full else None,
        )

    def generate(
        self,
        prompt_ids_list: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        prefix_ids_list: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """Sample completions from the oracle's own distribution; each stops after ``<eos>``.

        ``temperature=0`` is greedy. ``prefix_ids_list`` (optional) gives completion tokens
        already written (e.g. a student's prefix); only the new tokens are returned. The
        returned lists include the final ``<eos>`` when one was generated.
        """
        walks = [self._start(p) for p in prompt_ids_list]  # [B][component]
        for parts, prefix in zip(walks, prefix_ids_list or [[]] * len(walks)):
            for tok in prefix:
                for walk in parts:
                    self._advance(walk, tok, self._row(walk)[0])
        out: list[list[int]] = [[] for _ in walks]
        active = [b for b, parts in enumerate(walks) if not parts[0].done]
        for _ in range(max_new_tokens):
            if not active:
                break
            targets = [[self._row(walks[b][c]) for b in active] for c in range(len(self._parts))]
            logp_AV = self._mixed([[r for r, _ in t] for t in targets], [[n for _, n in t] for t in targets])
            tokens = _sample(logp_AV, temperature, top_p, generator).tolist()
            for a, (b, tok) in enumerate(zip(active, tokens)):
                for c, walk in enumerate(walks[b]):
                    self._advance(walk, tok, targets[c][a][0])
                out[b].append(tok)
            active = [b for b, tok in zip(active, tokens) if tok != self.eos_token_id]
        return out


def _sample(logp_AV: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logp_AV.argmax(-1)
    probs_AV = torch.softmax(logp_AV / temperature, -1)
    if top_p < 1.0:
        sorted_AV, order_AV = probs_AV.sort(-1, descending=True)
        drop_AV = (sorted_AV.cumsum(-1) - sorted_AV) >= top_p
        sorted_AV = sorted_AV.masked_fill(drop_AV, 0.0)
        probs_AV = torch.zeros_like(probs_AV).scatter(-1, order_AV, sorted_AV)
    return torch.multinomial(probs_AV, 1, generator=generator).squeeze(-1)
