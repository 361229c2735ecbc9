"""The model as a task sees it: batched generation and first-token log-probabilities over an adapter.

:class:`AdapterCalls` implements :class:`tasks.base.ModelCalls`. A task hands it :class:`tasks.base.Request`
objects (text + images, possibly none) and gets back one :class:`tasks.base.Call` per request, or per-request
answer log-probabilities. The engine creates one inside the method's context, so every call a task makes (a
multi-call pipeline's text-only reasoning call included) runs under the method being evaluated.

Requests are formatted with the adapter's prompt template (image placeholders before the text), left-padded into
batches of at most ``batch_size`` and, for generation, grouped by image count so a text-only call never shares a
batch with image calls (processors reject batches that mix rows with and without images).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from adapters.base import Adapter
from adapters.prepared_images import preparing
from methods.base import Method
from tasks.base import Call, Request, Scored


def batches_by_images(has_images: Sequence[bool], size: int) -> list[list[int]]:
    """Row indices in batches: rows with and without images apart, at most ``size`` each, original order kept.

    Every backend (HF, vLLM, the lmms-eval bridge) cuts batches this way, so a method's ``rewrite`` sees the same
    batches whichever engine generates.
    """
    groups: dict[bool, list[int]] = {}
    for i, flag in enumerate(has_images):
        groups.setdefault(bool(flag), []).append(i)
    return [idx[k : k + size] for idx in groups.values() for k in range(0, len(idx), size)]


class AdapterCalls:
    """Batched model calls through one loaded adapter.

    Args:
        adapter: A loaded adapter.
        batch_size: Most requests per model call.
        method: The active method; its :meth:`~methods.base.Method.rewrite` sees every batch first.
    """

    def __init__(self, adapter: Adapter, batch_size: int = 8, method: Method | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.adapter = adapter
        self.batch_size = batch_size
        self.method = method
        self._answer_ids: dict[str, int] = {}

    @contextlib.contextmanager
    def prefetching(self) -> Iterator[Callable[[list[Any]], None] | None]:
        """While the engine decodes batches ahead: a callable that runs the image processor on them ahead too.

        The processor's image processor is stood in for until the block ends (:mod:`adapters.prepared_images`);
        ``None`` when the processor has none.
        """
        with preparing(self.adapter.processor) as stand_in:
            yield None if stand_in is None else stand_in.prepare

    def _inputs(self, requests: list[Request]) -> tuple[list[Request], list[str], dict[str, torch.Tensor]]:
        """The batch as the model sees it: ``(requests after the method's rewrite, prompts, inputs)``."""
        if self.method is not None:
            requests = self.method.rewrite(list(requests))
        prompts = [self.adapter.format_prompt(r.text, n_images=len(r.images)) for r in requests]
        return requests, prompts, self.adapter.build_inputs(prompts, [list(r.images) for r in requests])

    def generate(self, requests: Sequence[Request], **gen_kwargs: Any) -> list[Call]:
        """Generate for every request; one :class:`Call` per request, in order.

        ``seconds`` is the wall time of the batch the request ran in divided by the batch's size.
        """
        out: list[Call | None] = [None] * len(requests)
        for idx in batches_by_images([bool(r.images) for r in requests], self.batch_size):
            batch = [requests[i] for i in idx]
            t0 = time.perf_counter()
            batch, prompts, inputs = self._inputs(batch)
            texts = self.adapter.generate(inputs, **gen_kwargs)
            share = (time.perf_counter() - t0) / len(idx)
            for i, req, prompt, text in zip(idx, batch, prompts, texts, strict=True):
                out[i] = Call(prompt=prompt, output=text, n_images=len(req.images), seconds=round(share, 4))
        return [c for c in out if c is not None]

    def answer_token_id(self, answer: str) -> int:
        """The first token of ``answer`` as the model would emit it after the generation prompt (cached)."""
        if answer not in self._answer_ids:
            self._answer_ids[answer] = self.adapter.answer_token_id(answer)
        return self._answer_ids[answer]

    def answer_logprobs(self, requests: Sequence[Request], answers: Sequence[str]) -> list[Scored]:
        """Per request, its prompt and ``{answer: log P(first token of answer)}`` at the first generated position.

        The distribution is the full-vocabulary softmax of the next-token logits after the prompt (as
        ``generate(..., output_scores=True).scores[0]`` would give under greedy decoding), one forward pass per
        batch.
        """
        ids = [self.answer_token_id(a) for a in answers]
        out: list[Scored | None] = [None] * len(requests)
        for idx in batches_by_images([bool(r.images) for r in requests], self.batch_size):
            _, prompts, inputs = self._inputs([requests[i] for i in idx])
            logp = self.adapter.next_token_logprobs(inputs)[:, ids].detach().cpu()  # [batch, n_answers]
            for row, i in enumerate(idx):
                out[i] = Scored(prompts[row], {a: float(logp[row, j]) for j, a in enumerate(answers)})
        return [d for d in out if d is not None]
