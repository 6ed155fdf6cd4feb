"""Multiple-choice questions to option scores on a model (the Engine's scorer).

`OptionScorer(batch)` returns scores [B, max options] (-inf where a question has fewer) and
labels [B]. Tokenization is cached per text; sequences are grouped by length (CPU compute
is proportional to padded tokens); with an encoder whose bottom blocks hold no LoRA module
their output is computed once per (question, option) and cached (`frozen_prefix` blocks),
in one pass per question, so that a cached value never depends on which batch needed it
first (a run's numbers then do not depend on what ran before it on the same engine).

  * encoder: a cross-encoder on transformers' AutoModelForTokenClassification (one label):
    "[CLS] question [SEP] option [SEP]" is encoded and its score is the mean over its tokens
    of the `classifier` logit, which is a linear head on the mean-pooled states
    (model.load_base_model says why this class).
  * causal LM: score of option j = mean log-likelihood of the continuation tokens.
    score="option": prompt "Question: {text}\\nAnswer:" + continuation " {option}".
    score="answer": the LLM-Adapters prompt listing all options + continuation
    "the correct answer is answer{j+1}".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

_LLM_ADAPTERS_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class ModelError(ValueError):
    """A model, adapter or question the engine cannot use (fedlora.model raises it too)."""


# Token-classification classes whose forward is classifier(dropout(encoder(x))) over BERT-style
# embeddings and blocks: their computation can be split at a block, so the frozen bottom is cached.
_SPLITTABLE = {"bert", "roberta", "xlm-roberta", "camembert"}


def prefix_split_supported(net: torch.nn.Module) -> bool:
    return getattr(net.config, "model_type", "") in _SPLITTABLE


def pair_scores(token_logits: Tensor, attention_mask: Tensor) -> Tensor:
    """One score per sequence: the mean of its tokens' logits [G, L] over the attention mask."""
    m = attention_mask.to(token_logits.dtype)
    return (token_logits * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


# The forward split at encoder block `layer`; equal to the full forward up to float rounding
# (tests/test_model.py::test_frozen_prefix_cache_matches_full_forward).
def hidden_before(net: torch.nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor,
                  token_type_ids: Tensor | None = None) -> Tensor:
    """Hidden states entering encoder block `layer` (embeddings + blocks[:layer])."""
    h = net.base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    return _run_blocks(net, h, attention_mask, net.base_model.encoder.layer[:layer])


def forward_from(net: torch.nn.Module, layer: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """One score per sequence from the hidden states entering encoder block `layer`."""
    h = _run_blocks(net, hidden, attention_mask, net.base_model.encoder.layer[layer:])
    return pair_scores(net.classifier(h)[..., 0], attention_mask)  # dropout: off in eval mode


def _run_blocks(net: torch.nn.Module, h: Tensor, attention_mask: Tensor, blocks) -> Tensor:
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=net.config, inputs_embeds=h, attention_mask=attention_mask)
    for block in blocks:
        h = block(h, mask)
    return h


@dataclass
class ScorerCaches:
    """An OptionScorer's caches (OptionScorer.caches / adopt_caches)."""
    key: str
    prefix: dict
    tokens: dict


class OptionScorer:
    def __init__(self, net: torch.nn.Module, tokenizer, *, kind: str, max_length: int, score: str,
                 device: torch.device, frozen_prefix: int = 0):
        self.net, self.tokenizer, self.kind = net, tokenizer, kind
        self.max_length, self.score, self.device = int(max_length), score, device
        self.frozen_prefix = int(frozen_prefix)  # encoder blocks below every LoRA module (0: no cache)
        self._pad_id = int(tokenizer.pad_token_id or 0)
        self.prefix_cache: dict[tuple[str, str], Tensor] = {}  # (question, option) -> hidden [len, H]
        self._tok_cache: dict = {}
        self.seen_tokens = 0
        self.seen_samples = 0

    def cache_key(self) -> str:
        """What the token and prefix caches hold values of: the scorer's kind and tokenization,
        and the frozen blocks with their weights (embeddings included). Scorers with one key
        compute the same cached values (one pass per question), so they may share the caches."""
        import hashlib

        h = hashlib.sha256(repr((self.kind, self.score, self.max_length, self.frozen_prefix,
                                 getattr(self.tokenizer, "name_or_path", ""), len(self.tokenizer))).encode())
        if self.frozen_prefix:
            base = self.net.base_model
            for part in (base.embeddings, *base.encoder.layer[:self.frozen_prefix]):
                for name, t in part.state_dict().items():
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def caches(self) -> ScorerCaches:
        """The token and prefix caches with their cache_key, without the model (so a caller
        can free the model and hand the caches to the next engine)."""
        return ScorerCaches(self.cache_key(), self.prefix_cache, self._tok_cache)

    def adopt_caches(self, caches: ScorerCaches) -> bool:
        """Use `caches` (the same dicts from now on) if they have this scorer's cache_key: an
        engine for another seed of one setting then skips the frozen blocks of every question
        seen before. Returns whether it took them."""
        if caches.key != self.cache_key():
            return False
        self.prefix_cache, self._tok_cache = caches.prefix, caches.tokens
        return True

    def _ids(self, texts: Sequence[str], special: bool = True) -> list[list[int]]:
        """Token ids per text, cached (truncated at max_length for the encoder)."""
        todo = [t for t in dict.fromkeys(texts) if (t, special) not in self._tok_cache]
        if todo:
            kw = dict(truncation=True, max_length=self.max_length) if self.kind == "encoder" else {}
            ids = self.tokenizer(todo, add_special_tokens=special, **kw)["input_ids"]
            self._tok_cache.update({(t, special): list(i) for t, i in zip(todo, ids)})
        return [self._tok_cache[(t, special)] for t in texts]

    def _pad(self, seqs: Sequence[Sequence[int]], pad_id: int | None = None) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id if pad_id is None else pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def __call__(self, batch: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Scores [B, max options] (-inf padded) and labels [B] for a batch of questions."""
        for q in batch:
            if not 0 <= q.label < len(q.options):
                raise ModelError(f"question label {q.label} out of range for {len(q.options)} options: {q.text[:60]!r}")
        qi = torch.tensor([i for i, q in enumerate(batch) for _ in q.options], device=self.device)
        oj = torch.tensor([j for q in batch for j in range(len(q.options))], device=self.device)
        vals = self._encoder_option_scores(batch) if self.kind == "encoder" else self._causal_option_scores(batch)
        width = max(len(q.options) for q in batch)
        scores = torch.full((len(batch), width), -math.inf, device=self.device, dtype=vals.dtype)
        scores = scores.index_put((qi, oj), vals)
        labels = torch.tensor([q.label for q in batch], device=self.device)
        return scores, labels

    def _length_groups(self, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Split sequence indices into forward passes with little padding.

        On CPU compute is proportional to padded tokens, so sequences are sorted by length
        and cut wherever the length grows by more than 25% (groups of >= 8). On CUDA one
        padded pass is faster (launch-bound), so there is one group.
        """
        if self.device.type == "cuda" or len(seqs) <= 8:
            return [list(range(len(seqs)))]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        groups: list[list[int]] = [[]]
        for i in order:
            g = groups[-1]
            if len(g) >= 8 and len(seqs[i]) > 1.25 * len(seqs[g[0]]):
                groups.append([])
            groups[-1].append(i)
        return groups

    def _pair_ids(self, batch: Sequence[Any]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token-type ids of every (question, option) pair, cached."""
        todo = [(q.text, o) for q in batch for o in q.options if (q.text, o) not in self._tok_cache]
        if todo:
            enc = self.tokenizer([a for a, _ in todo], [b for _, b in todo], truncation="longest_first",
                                 max_length=self.max_length)
            types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
            self._tok_cache.update({k: (list(i), list(t)) for k, i, t in zip(todo, enc["input_ids"], types)})
        pairs = [self._tok_cache[(q.text, o)] for q in batch for o in q.options]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _encoder_option_scores(self, batch: Sequence[Any]) -> Tensor:
        """Cross-encoder: the score of each "[CLS] question [SEP] option [SEP]" (pair_scores of
        the token logits), flat over all (question, option) pairs."""
        self.seen_samples += len(batch)
        seqs, types = self._pair_ids(batch)
        self.seen_tokens += sum(len(x) for x in seqs)
        parts, index = [], []
        keys = [(q.text, o) for q in batch for o in q.options]
        if self.frozen_prefix:
            self._fill_prefix_cache(keys, seqs, types)
        for group in self._length_groups(seqs):
            ids, mask = self._pad([seqs[i] for i in group])
            if self.frozen_prefix:
                hidden = torch.nn.utils.rnn.pad_sequence([self.prefix_cache[keys[i]] for i in group], batch_first=True)
                parts.append(forward_from(self.net, self.frozen_prefix, hidden.to(self.device), mask).float())
            else:
                tt, _ = self._pad([types[i] for i in group], pad_id=0)
                logits = self.net(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits[..., 0]
                parts.append(pair_scores(logits, mask).float())
            index += group
        vals = torch.cat(parts)
        if index != sorted(index):
            vals = vals[torch.argsort(torch.tensor(index, device=self.device))]
        return vals

    @torch.no_grad()
    def _fill_prefix_cache(self, keys, seqs, types) -> None:
        """Compute the frozen blocks' output once per (question, option) pair (kept on CPU), one
        forward pass per question: a pass's last bits depend on the batch it ran in (padding,
        shapes), so a pair cached by whichever batch first needed it would make a run's numbers
        depend on what ran before it on the same engine (a compare, a study's worker)."""
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one row per distinct pair
        todo = [first[k] for k in dict.fromkeys(keys) if k not in self.prefix_cache]
        by_question: dict[str, list[int]] = {}
        for i in todo:
            by_question.setdefault(keys[i][0], []).append(i)
        for rows in by_question.values():
            ids, mask = self._pad([seqs[i] for i in rows])
            tt, _ = self._pad([types[i] for i in rows], pad_id=0)
            hidden = hidden_before(self.net, self.frozen_prefix, ids, mask, tt).cpu()
            for j, i in enumerate(rows):
                self.prefix_cache[keys[i]] = hidden[j, :len(seqs[i])].clone()

    def _pairs(self, q) -> tuple[list[str], list[str]]:
        """(prompt, continuation) texts of each option of a question, causal scorer."""
        if self.score == "option":
            prompt = f"Question: {q.text}\nAnswer:"
            return [prompt] * len(q.options), [f" {o}" for o in q.options]
        listing = " ".join(f"Answer{j + 1}: {o}" for j, o in enumerate(q.options))
        fmt = "/".join(f"answer{j + 1}" for j in range(len(q.options)))
        instruction = f"Please choose the correct answer to the question: {q.text}\n\n{listing}\n\nAnswer format: {fmt}"
        prompt = _LLM_ADAPTERS_PROMPT.format(instruction=instruction)
        return [prompt] * len(q.options), [f"the correct answer is answer{j + 1}" for j in range(len(q.options))]

    def _causal_option_scores(self, batch: Sequence[Any]) -> Tensor:
        """Mean log-likelihood of each continuation given its prompt (all pairs in one batch)."""
        self.seen_samples += len(batch)
        prompts, conts = [], []
        for q in batch:
            p, c = self._pairs(q)
            prompts += p
            conts += c
        p_ids, c_ids = self._ids(prompts, special=True), self._ids(conts, special=False)
        L = self.max_length
        seqs, starts = [], []
        for p, c in zip(p_ids, c_ids):
            c = c[:L - 1] if c else [self._pad_id]
            p = p[-(L - len(c)):]  # truncate the prompt from the left
            seqs.append(p + c)
            starts.append(len(p))
        self.seen_tokens += sum(len(s) for s in seqs)
        ids, mask = self._pad(seqs)
        # positions t predicting token t+1, for the continuation tokens only (no [N, L, V] logits)
        rows = torch.tensor([i for i, s in enumerate(seqs) for _ in range(starts[i], len(s))], device=self.device)
        pos = torch.tensor([t for i, s in enumerate(seqs) for t in range(starts[i], len(s))], device=self.device)
        hidden = self.net.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = self.net.get_output_embeddings()(hidden[rows, pos - 1]).float()
        tok_lp = logits.log_softmax(dim=-1).gather(1, ids[rows, pos].unsqueeze(1)).squeeze(1)
        n = len(seqs)
        total = torch.zeros(n, device=self.device).index_add(0, rows, tok_lp)
        count = torch.zeros(n, device=self.device).index_add(0, rows, torch.ones_like(tok_lp))
        return total / count

    def tokens_per_sample(self, questions: Sequence[Any] | None = None) -> float:
        """Average tokens processed per question (all its sequences), from a sample or history."""
        if questions:
            if self.kind == "encoder":
                seqs, _ = self._pair_ids(questions)
                return sum(len(s) for s in seqs) / len(questions)
            pairs = [self._pairs(q) for q in questions]
            prompts = [p for ps, _ in pairs for p in ps]
            conts = [c for _, cs in pairs for c in cs]
            n = sum(min(len(p) + len(c), self.max_length)
                    for p, c in zip(self._ids(prompts), self._ids(conts, special=False)))
            return n / len(questions)
        if self.seen_samples:
            return self.seen_tokens / self.seen_samples
        return float(self.max_length) * (5 if self.kind == "encoder" else 4)  # crude: 4 options
