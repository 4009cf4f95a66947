"""lm-evaluation-harness adapter: zoo models as the harness model ``zoo`` (docs/interop.md#lm-evaluation-harness).

Importing this module registers ``ZooLM`` with lm-eval (the ``memzoo[eval]`` extra installs it):

    import lm_eval, zoo.eval.harness
    lm_eval.simple_evaluate(model="zoo", model_args="pretrained=checkpoints/titans-kjv,batch_size=8", tasks=[...])

Scores are exact: sequences of one length are batched together (no padding), and a document of
``loglikelihood_rolling`` is scored in one pass of the model's state (chunks of ``chunk_tokens`` carry the state; no
sliding windows).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from zoo.data.tokenizer import load_tokenizer
from zoo.errors import ConfigError

__all__ = ["ZooLM", "run_harness"]

DEFAULT_MAX_GEN_TOKS = 256


@register_model("zoo")
class ZooLM(LM):
    """A zoo language model directory (a zoo export or an imported Hugging Face directory) with its tokenizer.

    ``model_args``: ``pretrained=DIR`` (required), ``batch_size=N`` (sequences per forward, default 1),
    ``chunk_tokens=N`` (tokens per forward of a long rolling document, default 2048), ``device``.
    """

    def __init__(self, pretrained: str, batch_size: int | str = 1, chunk_tokens: int | str = 2048,
                 device: str = "cpu", **unused):
        super().__init__()
        from zoo.checkpoint import load_export

        if unused:
            raise ValueError(f"ZooLM: unknown model_args {', '.join(sorted(unused))}; valid: pretrained, batch_size, "
                             f"chunk_tokens, device")
        self.batch_size, self.chunk_tokens = int(batch_size), int(chunk_tokens)
        if self.batch_size < 1 or self.chunk_tokens < 1:
            raise ValueError(f"ZooLM: batch_size and chunk_tokens must be >= 1, got {batch_size}, {chunk_tokens}")
        self.model = load_export(pretrained, device)
        if not hasattr(self.model, "generate"):
            raise ValueError(f"ZooLM: {pretrained} holds a {type(self.model).__name__}, not a language model")
        self.tokenizer = load_tokenizer(Path(pretrained))
        self.pretrained = str(pretrained)
        self._device = torch.device(device)

    @property
    def tokenizer_name(self) -> str:
        return f"zoo:{self.pretrained}"

    # ---------------------------------------------------------------------------------------------- scoring
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation): the continuation's ids are those of ``context + continuation``
        past the context's (trailing spaces move to the continuation); an empty context is the EOS token."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        if not stripped:
            return [self.tokenizer.eos_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(stripped + continuation)
        context_ids = self.tokenizer.encode(stripped)
        return context_ids, whole[len(context_ids):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding produces it) for each
        (context ids, continuation ids), batching sequences of equal length."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        by_length = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            by_length[len(context) + len(continuation)].append(i)
        for length, indices in sorted(by_length.items()):
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                ids = torch.tensor([pairs[i][0] + pairs[i][1] for i in batch], device=self._device)  # (b, L)
                logprobs = self.log_probs(ids)                                                      # (b, L-1, V)
                for row, i in enumerate(batch):
                    n = len(pairs[i][1])
                    target = ids[row, length - n:]                                                  # (n,)
                    scored = logprobs[row, length - n - 1:]                                         # (n, V)
                    total = scored.gather(-1, target[:, None]).sum().item()
                    results[i] = (total, bool((scored.argmax(-1) == target).all()))
        return results

    def log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """Log-softmax (B, T−1, V) fp32 of the next token at every position but the last, in chunks of
        ``chunk_tokens`` that carry the model's state (one pass over the sequence)."""
        parts, state = [], None
        for start in range(0, ids.shape[1] - 1, self.chunk_tokens):
            logits, state = self.model(ids[:, start:min(start + self.chunk_tokens, ids.shape[1] - 1)], state)
            parts.append(F.log_softmax(logits.float(), dim=-1))                                    # (B, t, V)
        return torch.cat(parts, dim=1)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = self.score([self.encode_pair(*request.args) for request in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each document's log-probability after the EOS token, in one pass of the state (no windows)."""
        results = []
        for request in requests:
            (text,) = request.args
            ids = self.tokenizer.encode(text)
            total = self.score([([self.tokenizer.eos_id], ids)])[0][0] if ids else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            results.append(total)
        return results

    # ---------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with ``do_sample`` and ``temperature``) continuations cut before the first ``until``
        string; the EOS token also stops."""
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            until, max_new, temperature = generation_options(gen_kwargs, self.tokenizer)
            ids = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
            out = self.model.generate(torch.tensor([ids], device=self._device), max_new, temperature=temperature,
                                      eos_id=self.tokenizer.eos_id)
            text = self.tokenizer.decode([t for t in out[0, len(ids):].tolist() if t != self.tokenizer.eos_id])
            for stop in until:
                text = text.split(stop, 1)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results


def generation_options(gen_kwargs: dict, tokenizer) -> tuple[list[str], int, float]:
    """(until strings, max new tokens, temperature) from a harness request's ``gen_kwargs``."""
    options = dict(gen_kwargs)
    until = options.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(options.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    do_sample = bool(options.pop("do_sample", False))
    temperature = float(options.pop("temperature", 1.0 if do_sample else 0.0))
    if not do_sample:
        temperature = 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"ZooLM.generate_until: temperature must be a finite number >= 0, got {temperature}")
    return until, max_new, temperature


def run_harness(model_dir: str, tasks: list[str], include: str | None, batch_size: int,
                limit: int | None = None) -> dict:
    """Run lm-eval ``tasks`` (found in ``include``, a directory of task YAMLs, and lm-eval's own) on a model
    directory; returns the harness's per-task metrics, versions and n-shot."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include is not None and not Path(include).is_dir():
        raise FileNotFoundError(f"harness_include={include} is not a directory of lm-eval task YAMLs")
    manager = TaskManager(include_path=include)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" (looked in harness_include={include} and lm-eval's tasks)" if include else \
            " (lm-eval's own tasks; harness_include=DIR adds a directory of task YAMLs)"
        raise ConfigError(f"unknown harness task {unknown[0]!r}{where}")
    lm = ZooLM(model_dir, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {"results": output["results"], "versions": output.get("versions", {}), "n-shot": output.get("n-shot", {})}
