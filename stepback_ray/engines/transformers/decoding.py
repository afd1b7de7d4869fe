"""The transformers engine's own decode loop, run over a prefilled (stitched) KV cache.

Why not ``model.generate`` there: each of its steps copies the ``[batch, vocab]`` logits to float32 and masks the
whole vocabulary for ``min_new_tokens`` (a ``where`` over every row and every token of the vocabulary): work that is
not the model, repeated every step, and a visible share of a decode step on a CPU. This loop asks the model for the
last position's logits only, bans end-of-sequence by writing the few end-of-sequence columns, and picks the next
token in place.

It keeps ``generate``'s semantics where the engine relies on them, and the tests hold it to ``generate``'s texts:
greedy picks the arg max; sampling divides the float32 logits by the temperature, keeps the top-k tokens and then
the smallest top-p nucleus (at least one token) and draws from the global torch generator (seeded by the engine);
a sequence ends with an end-of-sequence token or when a stop string ends inside its newest token (the prompt's
tail counts, as in ``generate``'s stop-string criterion), and is then padded; the loop ends when every sequence
has. Logits processors it does not implement (a repetition penalty in the model's generation config, say) are the
engine's to detect: it keeps ``generate`` for such a model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

NEUTRAL_GENERATION_CONFIG = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_p": None,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "renormalize_logits": False,
}
"""Generation-config settings whose logits processors this loop does not implement, at their neutral values."""


def covers(generation_config) -> bool:
    """Whether this loop implements every logits processor a model's generation config asks of ``generate`` (a
    repetition penalty, banned words and the like are left to ``generate``)."""
    return all(getattr(generation_config, k, v) in (None, v) for k, v in NEUTRAL_GENERATION_CONFIG.items())


class StopStrings:
    """Whether a sequence's newest token ends a stop string, as transformers' stop-string criterion decides: the
    stop string must end after the text that came before that token (one already in the prompt, or matched
    earlier, does not count again), and may start in the prompt. Only the last ``window`` tokens are decoded, as
    many as the longest stop string has bytes (a token holds at least one byte)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompts: list[list[int]]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 1
        self.tails = [p[-self.window :] for p in prompts] if self.stop else []

    def __bool__(self) -> bool:
        return bool(self.stop)

    def ended(self, rows: list[int], new: list[list[int]]) -> list[int]:
        """Of ``rows`` (with ``new[k]`` the newest new tokens of ``rows[k]``, at least the last ``window`` of them
        or all there are), those whose newest token ends a stop string."""
        seen = [(self.tails[r] + toks)[-self.window :] for r, toks in zip(rows, new)]
        before = self.tokenizer.batch_decode([toks[:-1] for toks in seen])
        after = self.tokenizer.batch_decode(seen)
        hit = []
        for r, old, text in zip(rows, before, after):
            # a character split across tokens decodes as U+FFFD until it is whole: compare from the common prefix
            start = len(os.path.commonprefix([old, text]))
            if any(text.find(s, max(0, start - len(s) + 1)) >= 0 for s in self.stop):
                hit.append(r)
        return hit


def decode(
    model,
    cache,
    cache_kw: str,
    last_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos: set[int],
    pad: int,
    stops: StopStrings | None = None,
) -> list[list[int]]:
    """The new tokens of each row (padded after its end; as many columns as the longest row took).

    ``cache`` holds every row's prompt but its last token, right-aligned; ``last_ids`` ``[batch]`` is that last
    token, ``mask`` ``[batch, width]`` the attention mask over cache + last token, ``positions`` ``[batch]`` the
    last token's position (the row's length - 1)."""
    batch = last_ids.shape[0]
    device = last_ids.device
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
    eos_on_device = eos_ids.to(device)
    step_ids, step_pos = last_ids[:, None], positions[:, None]
    width = mask.shape[1]
    full_mask = torch.ones((batch, width + max_new_tokens), dtype=mask.dtype, device=device)
    full_mask[:, :width] = mask
    steps = 0
    for step in range(max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=full_mask[:, : width + step],
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        ).logits[:, -1]
        if step < min_new_tokens and len(eos_ids):
            logits[:, eos_on_device] = float("-inf")
        nxt = sampled(logits, temperature, top_k, top_p) if temperature > 0 else logits.argmax(-1)
        nxt = nxt.cpu().masked_fill_(done, pad)
        out[:, step] = nxt
        steps = step + 1
        ended = torch.isin(nxt, eos_ids) & ~done
        if stops:
            live = (~done & ~ended).nonzero().flatten().tolist()
            if live:
                new = out[live, max(0, steps - stops.window) : steps].tolist()  # all the check reads
                ended[stops.ended(live, new)] = True
        done |= ended
        if bool(done.all()):
            break
        step_ids, step_pos = nxt[:, None].to(device), step_pos + 1
    return out[:, :steps].tolist()


def sampled(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token a row drawn from :func:`warped` scores."""
    return torch.multinomial(warped(logits, temperature, top_k, top_p).softmax(-1), num_samples=1).squeeze(1)


def warped(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The scores ``generate`` samples from: in float32, the logits over the temperature, cut to the ``top_k``
    most likely tokens (0: no cut), then to the top-p nucleus (at least one token kept); cut tokens at -inf."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1)  # ascending, as transformers' top-p warper
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return scores
