"""A batched Hugging Face transformers engine: the CPU default and the reference implementation.

Prompts are tokenized
once and sorted by length. Each decode batch (``engine.batch_size`` sequences) is prefilled in small groups of
similar length (``engine.max_batch_tokens``), the opening its prompts share computed once, and their KV caches are
stitched into one (:mod:`.kv_cache`), then decoded together by the engine's own loop (:mod:`.decoding`, with the
CPU kernels of :mod:`.cpu_decode`; transformers' ``generate`` where the loop does not cover the model's generation
config): greedily by default. Stop strings end a sequence early. A prompt that does not fit the context is not sent
to the model: it comes back as an ``error`` completion, so one bad row never kills a batch.
"""

from __future__ import annotations

import inspect
import logging
import os
import time

from stepback_ray.config import EngineConfig
from stepback_ray.engines.base import (
    Completion,
    EnginePhases,
    Prompt,
    Request,
    SamplingParams,
    cut_at_stop,
    split_requests,
)
from stepback_ray.engines.formatting import FormattedEngine
from stepback_ray.errors import StepbackError

logger = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 16
"""Opening tokens a decode batch's prompts must share before the split prefill computes them once (one vLLM cache
block; below that the saving does not pay for the copies)."""


class TransformersEngine(FormattedEngine):
    supports_json_schema = False  # small models are kept on format by a prefilled answer instead

    def __init__(self, config: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-actor weight-loading bars only clutter the job log

        self.threads = config.threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise StepbackError("engine.device is 'cuda' but no CUDA device is visible")
        dtype = {
            "auto": torch.bfloat16 if device == "cuda" else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[config.dtype]
        self._init_prompt_tools(config)
        try:
            if config.load_format == "dummy":
                from transformers import AutoConfig

                model_config = AutoConfig.from_pretrained(self.formatter.path)
                with torch.device(device):
                    self.model = AutoModelForCausalLM.from_config(model_config, dtype=dtype).eval()
            else:
                self.model = AutoModelForCausalLM.from_pretrained(self.formatter.path, dtype=dtype).to(device).eval()
        except OSError as e:
            raise StepbackError(f"cannot load model {config.model!r}: {str(e).splitlines()[0]}") from None
        self.device = device
        self.torch = torch
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self.split_prefill = config.split_prefill and self._supports_split_prefill()
        from stepback_ray.engines.transformers import decoding  # deferred: imports torch

        self.own_decode = config.decode_loop == "own" and decoding.covers(self.model.generation_config)
        if device == "cpu" and config.cpu_decode_kernels:
            from stepback_ray.engines.transformers import cpu_decode

            if not cpu_decode.install(self.model):
                logger.warning(
                    "engine: %s keeps its stock attention and LM head (the CPU decode kernels do not apply to it)",
                    config.model,
                )
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name warns, then goes)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        #: where this engine's time went (read by profiles of a run; see :class:`~.base.EnginePhases`)
        self.phases = EnginePhases()

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        prompts, prefix_embeds = split_requests(requests)
        torch = self.torch
        started = time.perf_counter()
        texts = [self.render(p) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        prefix = [
            None
            if prefix_embeds is None or prefix_embeds[i] is None
            else torch.as_tensor(prefix_embeds[i], dtype=self.model.dtype)
            for i in range(len(prompts))
        ]
        lengths = [len(seq) + (0 if p is None else p.shape[0]) for seq, p in zip(ids, prefix)]
        results, runnable = self.fit_context(lengths, params)
        runnable.sort(key=lambda i: lengths[i])
        n_seq = params.n if params.temperature > 0 else 1
        split = self.split_prefill and all(ids[i] and lengths[i] > 1 for i in runnable)
        budget = self.config.max_cache_tokens if split else self.config.max_batch_tokens
        self.phases.add("tokenize", time.perf_counter() - started)
        for idx in self._batches(runnable, lengths, params.max_new_tokens, self.config.batch_size, budget, n_seq):
            t0 = time.perf_counter()
            shared = self._shared_prefix([ids[i] for i in idx], [prefix[i] for i in idx]) if split else 0
            with torch.inference_mode():
                new = self._generate_batch(
                    [ids[i] for i in idx],
                    [prefix[i] for i in idx],
                    [lengths[i] for i in idx],
                    params,
                    n_seq,
                    split,
                    shared,
                )
            t1 = time.perf_counter()
            share = (t1 - t0) / len(idx)
            for row, i in enumerate(idx):  # each prompt's n sequences come back next to each other
                done = [self._completion(new[row * n_seq + k], params) for k in range(n_seq)]
                text, n, reason = done[0]
                results[i] = Completion(
                    text,
                    lengths[i],
                    sum(d[1] for d in done),
                    reason,
                    share,
                    samples=[d[0] for d in done] if n_seq > 1 else [],
                    cached_tokens=shared if row else 0,
                )  # the batch's first computed it
            self.phases.add("finish", time.perf_counter() - t1)
        return [r for r in results if r is not None]

    def _shared_prefix(self, seqs: list[list[int]], soft: list) -> int:
        """How many opening tokens the prompts of a decode batch share and :meth:`_prefill` computes once: at
        least :data:`MIN_SHARED_PREFIX`, and short of every prompt's last two tokens (each prompt keeps a suffix to
        prefill); 0 with ``engine.prefix_reuse`` off, one prompt, or soft tokens (they open the prompt)."""
        if not self.config.prefix_reuse or len(seqs) < 2 or any(p is not None for p in soft):
            return 0
        shared = min(len(os.path.commonprefix(seqs)), min(len(s) for s in seqs) - 2)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _generate_batch(
        self,
        seqs: list[list[int]],
        soft: list,
        lengths: list[int],
        params: SamplingParams,
        n_seq: int,
        split: bool,
        shared: int = 0,
    ) -> list[list[int]]:
        """The new tokens of each sequence of one decode batch (``n_seq`` rows per prompt, next to each other).

        Split (the default): every prompt but its last token is prefilled in small groups of similar length
        (:meth:`_prefill`), their KV caches are left-padded into one, and the whole batch is decoded from there
        by the engine's own loop (:mod:`.decoding`; ``generate`` with ``engine.decode_loop: generate``). Prefill,
        most of the work, then pads little and keeps its activations in the CPU's caches, while decoding still
        steps many sequences at once. Otherwise one padded ``generate`` call does both.
        ``lengths`` counts each prompt's soft tokens and ids; ``shared``: opening tokens every prompt has
        (:meth:`_shared_prefix`), prefilled once."""
        torch = self.torch
        width = max(lengths)
        input_ids, mask = self._left_padded(seqs, lengths, width)
        kwargs = self._generate_kwargs(params, n_seq)
        if params.temperature > 0:
            torch.manual_seed(params.seed)  # both decoders draw from the global generator
        if split:
            from stepback_ray.engines.transformers import decoding, kv_cache  # deferred: import torch

            t0 = time.perf_counter()
            buffers = self._prefill(
                seqs, soft, lengths, width - 1, n_seq, room=params.max_new_tokens + 1, shared=shared
            )
            self.phases.add("prefill", time.perf_counter() - t0)
            if n_seq > 1:  # generate cannot expand a cache: each sample has its own row (and its own draws)
                input_ids, mask = input_ids.repeat_interleave(n_seq, 0), mask.repeat_interleave(n_seq, 0)
                kwargs.pop("num_return_sequences")
            cache = kv_cache.stitched(self.model.config, buffers, filled=width - 1)
            t0 = time.perf_counter()
            if not self.own_decode:
                new = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    **{self._cache_kw: cache},
                    **kwargs,
                )[:, width:].tolist()
            else:
                positions = torch.tensor(lengths, dtype=torch.long).repeat_interleave(n_seq) - 1
                new = decoding.decode(
                    self.model,
                    cache,
                    self._cache_kw,
                    input_ids[:, -1].to(self.device),
                    mask.to(self.device),
                    positions.to(self.device),
                    max_new_tokens=params.max_new_tokens,
                    min_new_tokens=params.min_new_tokens or 0,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=self.model.generation_config.top_k or 50,
                    eos=self._eos,
                    pad=self.tokenizer.pad_token_id,
                    stops=decoding.StopStrings(
                        self.tokenizer, params.stop or (), [s for s in seqs for _ in range(n_seq)]
                    ),
                )
            self.phases.add("decode", time.perf_counter() - t0)
            self.phases.decode_batches.append((len(new), len(new[0]) if new else 0, width - 1))
            return new
        t0 = time.perf_counter()  # one generate call prefills and decodes: its time is not split
        if any(p is not None for p in soft):
            embeds = self._embedded(input_ids, seqs, soft, lengths, width)
            new = self.model.generate(inputs_embeds=embeds, attention_mask=mask.to(self.device), **kwargs).tolist()
        else:
            new = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )[:, width:].tolist()
        self.phases.add("generate", time.perf_counter() - t0)
        return new

    def _prefill(
        self, seqs: list[list[int]], soft: list, lengths: list[int], width: int, n_seq: int, room: int, shared: int = 0
    ) -> list[tuple]:
        """Per layer, (keys, values) buffers of ``n_seq`` rows per prompt and ``width + room`` positions, whose
        first ``width`` hold every prompt but its last token, right-aligned (the padding before it zeroed).
        Prompts run in consecutive groups of at most ``max_batch_tokens`` padded tokens (one alone if longer); a
        group's positions start at 0 after its padding, as in one padded call, so the cache is the one generate
        would build. Each group's cache is written once into the buffers, rows in the batch's order.

        ``shared`` > 0: the prompts' first ``shared`` tokens (the same in every prompt) are run once, alone; each
        group then starts from a copy of their cache and runs only its prompts' remaining tokens (left-padded
        after the shared part, positions continuing from it), and each row's buffer gets the shared part right
        before its own (no gap: the decode step sees the cache it would have without sharing)."""
        from transformers import DynamicCache

        from stepback_ray.engines.transformers.kv_cache import layers_of  # deferred: imports torch

        opening: list[tuple] = []
        self.phases.prefill_tokens += shared + sum(n - 1 - shared for n in lengths)
        self.phases.prefill_pairs += shared * (shared + 1) // 2 + sum(
            (n - 1 - shared) * shared + (n - 1 - shared) * (n - shared) // 2 for n in lengths
        )
        if shared:
            cache = DynamicCache(config=self.model.config)
            self.model(
                input_ids=self.torch.tensor([seqs[0][:shared]], device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
            opening = layers_of(cache)
        head = [n - 1 - shared for n in lengths]
        buffers: list[tuple] = []
        row = 0
        # a group's budget counts the shared part too: its queries attend to it
        for group in self._batches(
            list(range(len(seqs))), [h + shared for h in head], 0, len(seqs), self.config.max_batch_tokens
        ):
            fed, fed_soft = [seqs[i][shared:-1] for i in group], [soft[i] for i in group]
            fed_lengths = [head[i] for i in group]
            w = max(fed_lengths)
            ids, mask = self._left_padded(fed, fed_lengths, w)
            cache = DynamicCache(config=self.model.config)
            inputs = {"input_ids": ids.to(self.device)}
            if any(p is not None for p in fed_soft):
                inputs = {"inputs_embeds": self._embedded(ids, fed, fed_soft, fed_lengths, w)}
            padded = min(fed_lengths) < w
            if shared:  # the group continues from the shared tokens' cache, one copy per prompt
                for layer, (k, v) in enumerate(opening):
                    cache.update(k.expand(len(group), -1, -1, -1), v.expand(len(group), -1, -1, -1), layer)
                mask = self.torch.cat([self.torch.ones((len(group), shared), dtype=mask.dtype), mask], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
            self.model(
                **inputs,
                attention_mask=mask.to(self.device) if padded else None,
                position_ids=positions.to(self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
            rows = slice(row, row + len(group) * n_seq)
            for layer, (k, v) in enumerate(layers_of(cache)):
                if len(buffers) <= layer:
                    buffers.append(
                        tuple(x.new_empty((len(seqs) * n_seq, x.shape[1], width + room, x.shape[3])) for x in (k, v))
                    )
                for buffer, x in zip(buffers[layer], (k, v)):
                    if not shared:
                        buffer[rows, :, : width - w].zero_()  # masked out, but never garbage (0 x NaN is NaN)
                        buffer[rows, :, width - w : width] = x.repeat_interleave(n_seq, 0) if n_seq > 1 else x
                        continue
                    for j, n in enumerate(fed_lengths):  # per row: [zeros][shared part][its own tokens]
                        own = slice(rows.start + j * n_seq, rows.start + (j + 1) * n_seq)
                        start = width - n - shared
                        buffer[own, :, :start].zero_()
                        buffer[own, :, start : width - n] = x[j : j + 1, :, :shared]
                        buffer[own, :, width - n : width] = x[j : j + 1, :, shared + w - n :]
            row = rows.stop
        return buffers

    def _left_padded(self, seqs: list[list[int]], lengths: list[int], width: int):
        """Token ids right-aligned in ``width`` columns (soft-token and padding positions hold the pad id) and
        the attention mask over each row's last ``lengths[row]`` positions (its soft tokens and its ids)."""
        torch = self.torch
        input_ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            if seq:
                input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - n :] = 1
        return input_ids, mask

    def _embedded(self, input_ids, seqs: list[list[int]], soft: list, lengths: list[int], width: int):
        """Input embeddings with each row's soft tokens between its left padding and its own token embeddings."""
        torch = self.torch
        embed = self.model.get_input_embeddings()
        embeds = embed(input_ids.to(self.device))
        for row, p in enumerate(soft):
            if p is not None:
                start = width - lengths[row]
                embeds[row, start : start + p.shape[0]] = p.to(self.device)
                embeds[row, start + p.shape[0] :] = embed(torch.tensor(seqs[row], device=self.device))
        return embeds

    def _generate_kwargs(self, params: SamplingParams, n_seq: int) -> dict:
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=params.temperature > 0,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if params.temperature > 0:  # n completions per prompt: generate expands the batch
            kwargs.update(temperature=params.temperature, top_p=params.top_p, num_return_sequences=n_seq)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    def _supports_split_prefill(self) -> bool:
        """Prefilled caches can be stitched together where every layer keeps a plain growing cache (full
        attention, transformers 5's layered caches); sliding-window or hybrid models keep the one-call path."""
        try:
            from stepback_ray.engines.transformers import kv_cache  # deferred: imports torch
        except ImportError:
            return False
        return kv_cache.full_attention(self.model.config)

    def _completion(self, toks: list[int], params: SamplingParams) -> tuple[str, int, str]:
        """One generated sequence as (text cut at the stop strings, tokens generated, finish reason)."""
        pad = self.tokenizer.pad_token_id
        n, ended = len(toks), False
        for k, t in enumerate(toks):
            if t in self._eos:
                n, ended = k + 1, True
                break
        text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        if stopped and ended and pad in self._eos:
            n -= 1  # a stop string ended it; the token after is padding, not a generated end-of-sequence
        reason = "stop" if (ended or stopped or n < params.max_new_tokens) else "length"
        return text, n, reason

    @staticmethod
    def _batches(
        order: list[int], lengths: list[int], new_tokens: int, max_seqs: int, max_tokens: int, n_seq: int = 1
    ) -> list[list[int]]:
        """Consecutive groups of the length-sorted prompts: at most ``max_seqs`` sequences and, padded to the
        longest plus ``new_tokens``, at most ``max_tokens`` tokens (one prompt alone if it is longer). A prompt
        sampled ``n_seq`` times counts as ``n_seq``."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = lengths[i] + new_tokens  # sorted ascending: the newcomer is the longest
            if current and ((len(current) + 1) * n_seq > max_seqs or (len(current) + 1) * n_seq * width > max_tokens):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def close(self) -> None:
        self.model = None
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
