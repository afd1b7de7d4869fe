"""The transformers engine's own decode loop, run over a prefilled (stitched) KV cache.

Why not ``model.generate`` there: with 64 sequences, each of its steps copies the ``[batch, vocab]`` logits to
float32 and masks the whole vocabulary for ``min_new_tokens`` (a ``where`` over 64 x 49,152), about 0.1 s a step
that is not the model (torch profiler, docs/benchmarks.md). This loop asks the model for the last position's
logits only, bans end-of-sequence by writing the few end-of-sequence columns, and picks the next token in place.

It keeps ``generate``'s semantics where the engine relies on them, and the tests hold it to ``generate``'s texts:
greedy picks the arg max; sampling divides by the temperature, keeps the smallest top-p nucleus (at least one
token) and draws from the global torch generator (seeded by the engine, as for ``generate``); a sequence ends with
an end-of-sequence token or when a stop string ends inside its newest token (the prompt's tail counts, as in
``generate``'s stop-string criterion), and is then padded; the loop ends when every sequence has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: prompt tokens kept beside the new ones for stop-string matching (a stop string may start in the prompt)
PROMPT_TAIL = 8


class StopStrings:
    """Whether a sequence's newest token ends a stop string: the stop string must end after the text that came
    before that token (so one already in the prompt, or matched earlier, does not count again)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_tails: list[list[int]]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tails = prompt_tails

    def __bool__(self) -> bool:
        return bool(self.stop)

    def ended(self, rows: list[int], new: list[list[int]]) -> list[int]:
        """Of ``rows`` (with ``new[k]`` the new tokens of ``rows[k]``), those whose newest token ends a stop
        string."""
        before = self.tokenizer.batch_decode([self.tails[r] + toks[:-1] for r, toks in zip(rows, new)])
        after = self.tokenizer.batch_decode([self.tails[r] + toks for r, toks in zip(rows, new)])
        hit = []
        for r, old, text in zip(rows, before, after):
            if any(text.find(s, max(0, len(old) - len(s) + 1)) >= 0 for s in self.stop):
                hit.append(r)
        return hit


def decode(model, cache, cache_kw: str, last_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
           *, max_new_tokens: int, min_new_tokens: int, temperature: float, top_p: float, eos: set[int], pad: int,
           stops: StopStrings | None = None) -> list[list[int]]:
    """The new tokens of each row (padded after its end; as many columns as the longest row took).

    ``cache`` holds every row's prompt but its last token, right-aligned; ``last_ids`` ``[batch]`` is that last
    token, ``mask`` ``[batch, width]`` the attention mask over cache + last token, ``positions`` ``[batch]`` the
    last token's position (the row's length - 1)."""
    batch = last_ids.shape[0]
    device = last_ids.device
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    step_ids, step_pos = last_ids[:, None], positions[:, None]
    width = mask.shape[1]
    full_mask = torch.ones((batch, width + max_new_tokens), dtype=mask.dtype, device=device)
    full_mask[:, :width] = mask
    steps = 0
    for step in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=full_mask[:, :width + step], position_ids=step_pos,
                       use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
        if step < min_new_tokens and len(eos_ids):
            logits[:, eos_ids] = float("-inf")
        nxt = _sampled(logits, temperature, top_p) if temperature > 0 else logits.argmax(-1)
        nxt = nxt.cpu().masked_fill_(done, pad)
        out[:, step] = nxt
        steps = step + 1
        ended = torch.isin(nxt, eos_ids.cpu()) & ~done
        if stops:
            live = (~done & ~ended).nonzero().flatten().tolist()
            if live:
                new = out[live, :steps].tolist()
                ended[stops.ended(live, new)] = True
        done |= ended
        if bool(done.all()):
            break
        step_ids, step_pos = nxt[:, None].to(device), step_pos + 1
    return out[:, :steps].tolist()


def _sampled(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token a row drawn from the temperature-scaled distribution cut to its top-p nucleus."""
    scores = logits / temperature
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1)  # ascending, as transformers' top-p warper
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
