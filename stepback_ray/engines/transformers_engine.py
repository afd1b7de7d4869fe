"""A batched Hugging Face transformers engine: the CPU default and the reference implementation.

Prompts are tokenized once, sorted by length (so each batch pads little), left-padded, and decoded greedily by
default. Stop strings end a sequence early. A prompt that does not fit the context is not sent to the model: it
comes back as an ``error`` completion, so one bad row never kills a batch.
"""

from __future__ import annotations

import os
import time

from ..config import EngineConfig
from ..errors import StepbackError
from .base import Completion, Prompt, Request, SamplingParams, cut_at_stop, split_requests
from .formatting import FormattedEngine


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
        dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
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

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        prompts, prefix_embeds = split_requests(requests)
        torch = self.torch
        texts = [self.render(p) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        prefix = [None if prefix_embeds is None or prefix_embeds[i] is None
                  else torch.as_tensor(prefix_embeds[i], dtype=self.model.dtype) for i in range(len(prompts))]
        lengths = [len(seq) + (0 if p is None else p.shape[0]) for seq, p in zip(ids, prefix)]
        results, runnable = self.fit_context(lengths, params)
        runnable.sort(key=lambda i: lengths[i])
        pad = self.tokenizer.pad_token_id
        embed = self.model.get_input_embeddings()
        n_seq = params.n if params.temperature > 0 else 1
        for idx in self._batches(runnable, lengths, params.max_new_tokens, n_seq):
            width = max(lengths[i] for i in idx)
            soft = any(prefix[i] is not None for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = ids[i]
                input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - lengths[i]:] = 1
            sample = params.temperature > 0
            kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
                          do_sample=sample, pad_token_id=pad)
            if sample:  # n completions per prompt: generate expands the batch (each prompt is prefilled n times)
                torch.manual_seed(params.seed)
                kwargs.update(temperature=params.temperature, top_p=params.top_p, num_return_sequences=n_seq)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if params.stop:
                kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
            t0 = time.perf_counter()
            with torch.inference_mode():
                if soft:  # soft tokens go between the left padding and the prompt's own tokens
                    embeds = embed(input_ids.to(self.device))
                    for row, i in enumerate(idx):
                        if prefix[i] is not None:
                            k = prefix[i].shape[0]
                            start = width - lengths[i]
                            embeds[row, start:start + k] = prefix[i].to(self.device)
                            embeds[row, start + k:] = embed(torch.tensor(ids[i], device=self.device))
                    out = self.model.generate(inputs_embeds=embeds, attention_mask=mask.to(self.device), **kwargs)
                    new = out.tolist()  # with inputs_embeds only the new tokens come back
                else:
                    out = self.model.generate(input_ids=input_ids.to(self.device),
                                              attention_mask=mask.to(self.device), **kwargs)
                    new = out[:, width:].tolist()
            share = (time.perf_counter() - t0) / len(idx)
            for row, i in enumerate(idx):  # generate returns each prompt's n sequences next to each other
                done = [self._completion(new[row * n_seq + k], params, pad) for k in range(n_seq)]
                text, n, reason = done[0]
                results[i] = Completion(text, lengths[i], sum(d[1] for d in done), reason, share,
                                        samples=[d[0] for d in done] if n_seq > 1 else [])
        return [r for r in results if r is not None]

    def _completion(self, toks: list[int], params: SamplingParams, pad: int) -> tuple[str, int, str]:
        """One generated sequence as (text cut at the stop strings, tokens generated, finish reason)."""
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

    def _batches(self, order: list[int], lengths: list[int], new_tokens: int, n_seq: int = 1) -> list[list[int]]:
        """Consecutive groups of the length-sorted prompts: at most ``batch_size`` sequences and, padded to the
        longest, at most ``max_batch_tokens`` tokens (long prompts go in small batches: on CPU a long batch costs
        more in attention and memory than it gains). A prompt sampled ``n_seq`` times counts as ``n_seq``."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = lengths[i] + new_tokens  # sorted ascending: the newcomer is the longest
            if current and ((len(current) + 1) * n_seq > self.config.batch_size
                            or (len(current) + 1) * n_seq * width > self.config.max_batch_tokens):
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

