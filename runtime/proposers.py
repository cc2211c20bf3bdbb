"""Who proposes the tokens a speculative step verifies (runtime/speculative.py):

    DraftProposer   a smaller bundle with the same tokenizer decodes k tokens ahead, sampling
                    with the target's settings and seed; its cache follows the accepted text
                    (rolled back per row, caught up by the one or two tokens it has not seen)
    LookupProposer  no model: what followed the first earlier occurrence of the last n tokens
                    in the prompt and the text so far (Hugging Face's prompt lookup)

Both take the committed text of every row, tokens (B, T) int64 with lengths (B,), and how
many tokens each row may get, want (B,) (0 for a row that is done); they return a Proposal.
`commit(accepted)` tells them how many of each row's proposals the target kept.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest
from arx.runtime.sampler import Sampler, SamplingOptions


@dataclass
class Proposal:
    tokens: np.ndarray  # (B, K) int64 proposed ids, right-padded
    lengths: np.ndarray  # (B,) int64 valid proposals per row, 0..K
    # (B, K, V) float64: the distribution each proposed token was drawn from (the draft's
    # filtered probabilities); None: chosen deterministically, a point mass on the token
    probs: np.ndarray | None = None

    @staticmethod
    def empty(batch: int) -> "Proposal":
        return Proposal(np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64))


class LookupProposer:
    """Prompt lookup (HF's PromptLookupCandidateGenerator): for n from min(max_ngram, len - 1)
    down to 1, find the last n tokens earlier in the row's text, the first (leftmost) match
    with a continuation wins; up to `want` tokens of it, cut before an EOS."""

    method = "lookup"

    def __init__(self, max_ngram: int = 2, eos: tuple[int, ...] = ()):
        if max_ngram < 1:
            raise ArxError(f"--lookup takes the longest n-gram to match, >= 1 (got {max_ngram})")
        self.max_ngram, self.eos = max_ngram, np.array(eos, np.int64)

    def start(self, batch: int, max_len: int, sampling: SamplingOptions) -> None:
        pass

    def propose(self, tokens, lengths, want, seen) -> Proposal:
        found = [lookup(tokens[b, : lengths[b]], self.max_ngram, int(want[b]), self.eos)
                 if want[b] > 0 else np.zeros(0, np.int64) for b in range(len(lengths))]
        out = Proposal(np.zeros((len(found), max(map(len, found))), np.int64),
                       np.array([len(f) for f in found], np.int64))
        for b, f in enumerate(found):
            out.tokens[b, : len(f)] = f
        return out

    def commit(self, accepted: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def lookup(text: np.ndarray, max_ngram: int, want: int, eos: np.ndarray) -> np.ndarray:
    """Up to `want` tokens that followed the leftmost earlier occurrence of text's last n
    tokens, n from min(max_ngram, len - 1) down to 1; empty when nothing matches."""
    for n in range(min(max_ngram, len(text) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(text, n)  # (len - n + 1, n)
        starts = np.flatnonzero((windows == text[-n:]).all(axis=1)) + n
        starts = starts[starts < len(text)]  # the match at the very end continues nowhere
        if starts.size:
            got = text[starts[0]: starts[0] + want]
            stop = np.flatnonzero(np.isin(got, eos))
            return got[: stop[0]] if stop.size else got
    return np.zeros(0, np.int64)


class DraftProposer:
    """A draft bundle's session proposing by decoding: one step catches its cache up with the
    committed text (1 token, or 2 after a step whose proposals were all accepted), then k - 1
    width-1 steps; every token is drawn by arx::sample with the target's settings and seed at
    its own position, and its filtered distribution is kept for the rejection rule."""

    method = "draft"

    def __init__(self, session):
        if not session.ragged:
            raise ArxError("the draft bundle's cache grows by concatenation (a custom-protocol "
                           "export), so its rows cannot roll back separately; use a draft "
                           "exported from a Hugging Face model or run without --draft")
        self.session, self.cache, self.sampler = session, None, None

    def start(self, batch: int, max_len: int, sampling: SamplingOptions) -> None:
        """max_len: the longest text a row reaches (prompt + new tokens) plus the widest step."""
        cap = self.session.capacity.max_seq_len
        self.cache = self.session.new_cache(batch, min(max_len, cap))
        self.sampler = Sampler(sampling, self.session.manifest.vocab_size)  # the resolved seed
        self._base, self._fed = np.zeros(batch, np.int64), 0

    def check_room(self, need: int) -> None:
        cap = self.session.capacity.max_seq_len
        if need > cap:
            raise ArxError(f"the draft's context of {cap} tokens is shorter than the prompt + new "
                           f"tokens + 1 ({need}); lower --max-new-tokens or use a draft exported "
                           f"with a larger --max-seq-len")

    def propose(self, tokens, lengths, want, seen) -> Proposal:
        # width-1 steps after the catch-up reach lengths + k - 1; the cache bounds k
        k = min(int(want.max()), self.cache.max_seq_len - int(lengths.max()) + 1)
        if k <= 0:  # nothing fed: commit() keeps the cache as it is
            self._base, self._fed = self.cache.lengths.copy(), 0
            return Proposal.empty(len(lengths))
        logits = self._catch_up(tokens, lengths)
        seen = seen.copy() if seen is not None else None
        out, probs = np.zeros((len(lengths), k), np.int64), []
        for i in range(k):
            if i:
                logits = self.session.step(self.cache, out[:, i - 1: i],
                                           np.ones(len(lengths), np.int64), logits="last")[:, 0]
            out[:, i] = self.sampler(logits, seen, self.cache.lengths)  # offset = its position
            if self.sampler.options.do_sample:
                probs.append(self.sampler.probs(logits, seen))
            if seen is not None:
                seen[np.arange(len(lengths)), out[:, i]] = True
        self._base, self._fed = lengths.copy(), k - 1
        return Proposal(out, np.minimum(want, k), np.stack(probs, 1) if probs else None)

    def _catch_up(self, tokens, lengths) -> np.ndarray:
        """Feed each row the committed tokens its cache lacks (at least its last one, so a
        row that is done rides along); -> the logits (B, V) after them."""
        start = np.minimum(self.cache.lengths, lengths - 1)
        self.cache.rollback(start)
        new = lengths - start
        ids = np.zeros((len(lengths), int(new.max())), np.int64)  # (B, 1 or 2) right-padded
        for b in range(len(lengths)):
            ids[b, : new[b]] = tokens[b, start[b]: lengths[b]]
        return self.session.step(self.cache, ids, new, logits="last")[:, 0]

    def commit(self, accepted: np.ndarray) -> None:
        """Keep in the draft's cache the committed text and the accepted proposals it fed."""
        keep = self._base + np.minimum(accepted, self._fed)
        self.cache.rollback(np.minimum(self.cache.lengths, keep))

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def check_same_tokenizer(target: Manifest, target_dir: str | Path, draft: Manifest,
                         draft_dir: str | Path) -> None:
    """Ids mean the same in both bundles: the same vocabulary size and the same tokenizer.json
    content (parsed, so formatting does not matter), or neither has one (ids only)."""
    if draft.vocab_size != target.vocab_size:
        raise ArxError(f"the draft {draft_dir} has a vocabulary of {draft.vocab_size} tokens, the "
                       f"target {target.vocab_size}: speculation needs one tokenizer; use a "
                       f"draft trained with the target's tokenizer")
    files = [(Path(d) / m.tokenizer.file) if m.tokenizer.file else None
             for d, m in ((target_dir, target), (draft_dir, draft))]
    if files == [None, None]:
        return
    if None in files:
        which = "draft" if files[1] is None else "target"
        raise ArxError(f"the {which} bundle has no tokenizer.json and the other has one, so the "
                       f"ids cannot be checked to mean the same; export both with a tokenizer")
    if _tokenizer_digest(files[0]) != _tokenizer_digest(files[1]):
        raise ArxError(f"the draft {draft_dir} has another tokenizer than the target (their "
                       f"tokenizer.json differ): speculation needs one tokenizer; use a draft "
                       f"trained with the target's tokenizer")


def _tokenizer_digest(path: Path) -> str:
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArxError(f"cannot read {path} ({e}); re-export the bundle") from None
    return hashlib.sha256(json.dumps(parsed, sort_keys=True).encode()).hexdigest()


def draft_backend_options(options=None):
    """The draft's ONNX Runtime options: the target's (or the defaults), with its idle threads
    asleep instead of spinning. Draft and target take turns on the same cores, and a pool that
    spins after its run takes them from the other: on 2 cores (benchmarks/bench_speculative.py,
    its trained 3.5M draft and 32M target) --draft ran at 0.89x plain decoding with a spinning
    draft and 1.82x without. The target keeps its own setting (its steps follow one another
    closely, where spinning pays)."""
    from dataclasses import replace

    from arx.runtime.backend import BackendOptions

    return replace(options or BackendOptions(), spin_wait=False)


@contextmanager
def open_proposer(target: Manifest, target_dir: str | Path, *, draft: str | Path | None = None,
                  lookup: int | None = None, backend_options=None) -> Iterator:
    """The proposer `arx generate --draft BUNDLE` or `--lookup N` asks for (exactly one)."""
    if (draft is None) == (lookup is None):
        raise ArxError("speculation takes a proposer: --draft BUNDLE (a smaller model with the "
                       "same tokenizer) or --lookup N (n-grams of the text), not both")
    if lookup is not None:
        yield LookupProposer(lookup, tuple(target.tokenizer.eos_token_ids))
        return
    from arx.manifest import read_manifest
    from arx.runtime.decoder import DecoderSession

    manifest = read_manifest(draft)
    check_same_tokenizer(target, target_dir, manifest, draft)
    with DecoderSession(draft, draft_backend_options(backend_options), manifest) as session:
        yield DraftProposer(session)
