"""Prompts in, tokens out: the prompt format, model inputs, every model call and decoding.

The :class:`Generation` mixin of :class:`adapters.base.Adapter`. Every model call goes through one place
(:meth:`Generation._call`), which applies an active position-id replacement (:meth:`Generation.positions`), tells
the input observers (:meth:`Generation.on_inputs`) and strips the harness-only entries (:func:`model_inputs`).
Decoding may run several views of a batch as one batch (:meth:`Generation.views`) and take extra logits
processors (:meth:`Generation.decoding_logits`, site ``dec_logits``).

Here also: the ChatML fallback template (:data:`CHATML`), the harness-only input prefix (:data:`HARNESS_PREFIX`)
and the callback types :data:`PositionFn` and :data:`ViewFn`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessorList

from adapters.hf_compat import encoded_images

#: ChatML fallback prompt (Qwen-VL, InternVL) and its system block, for checkpoints without a chat template
CHATML = "{system}<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"

#: inputs entries starting with this are for methods (source images, their sizes) and never reach the model
HARNESS_PREFIX = "harness_"

#: ``fn(default_position_ids, inputs) -> new_position_ids`` (same shape), see :meth:`Generation.positions`
PositionFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

#: ``fn(inputs) -> inputs`` of ``k·batch`` rows whose first ``batch`` rows are ``inputs`` (see :meth:`Generation.views`)
ViewFn = Callable[[dict[str, Any]], dict[str, Any]]


def model_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``inputs`` without the harness-only entries, i.e. what the model's ``forward``/``generate`` accepts."""
    return {k: v for k, v in inputs.items() if not k.startswith(HARNESS_PREFIX)}


class _ViewTie:
    """Keeps the extra views of a batch on the batch's own text during :meth:`Generation.generate_ids`.

    As the last logits processor, it makes rows ``rows..`` emit an end-of-sequence token at the first step (so they
    count as finished and never hold generation open); :meth:`feed` overwrites their token at every cached decoding
    step with the token of their row ``b mod rows``, so every view's KV cache continues the same text.
    """

    def __init__(self, rows: int, stop_ids: list[int]) -> None:
        self.rows, self.stop = rows, stop_ids[0] if stop_ids else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.stop is not None:
            scores[self.rows :] = float("-inf")
            scores[self.rows :, self.stop] = 0.0
        return scores

    @contextlib.contextmanager
    def feed(self, embed: nn.Module) -> Iterator[None]:
        """A pre-hook on the token embedding: at a cached decoding step, every view gets row ``b``'s token."""

        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            ids = args[0]  # [views · batch, q]
            if ids.shape[1] != 1:
                return None  # the prefill: each view's own prompt
            k = ids.shape[0] // self.rows
            return (ids[: self.rows].repeat(k, 1), *args[1:])

        handle = embed.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()


class Generation:
    """Mixin of :class:`adapters.base.Adapter`: the prompt format, the model's inputs, its calls and decoding.

    A family sets the fallback templates below and, where its processor needs them, :meth:`image_kwargs` and
    :meth:`_model_position_ids`. The state the methods keep (processor, model, the active replacement, view
    function, observers and logits processors) is set up by :meth:`adapters.base.Adapter.__init__` and
    :meth:`adapters.base.Adapter.load`.
    """

    #: the family's name in :data:`adapters.base.ADAPTERS` (set on each adapter class)
    family: ClassVar[str]
    #: fallback prompt templates (``{images}``, ``{text}``, ``{system}``) when the processor has no chat template
    templates: ClassVar[dict[str, str]]
    #: the per-image placeholder inserted into ``{images}`` by fallback templates
    image_placeholder: ClassVar[str]
    #: how a fallback template's ``{system}`` renders a system prompt (empty when there is none)
    system_format: ClassVar[str] = "{} "

    # set by adapters.base.Adapter (its constructor arguments, load() and load_processor())
    path: str
    prompt_template: str
    system_prompt: str | None
    model: nn.Module | None
    processor: Any
    _position_fn: PositionFn | None
    _input_observers: list[Callable[[dict[str, torch.Tensor] | None], None]]
    _turn_suffix: list[int] | None
    _logits_processors: list[Any]
    _view_fn: ViewFn | None

    if TYPE_CHECKING:  # provided by adapters.base.Adapter and the other mixins

        @property
        def device(self) -> torch.device:
            """Device the model runs on (:attr:`adapters.base.Adapter.device`)."""

        def _require_loaded(self) -> nn.Module: ...

        def site(self, name: str) -> nn.Module:
            """A module by site name (:meth:`adapters.anatomy.Anatomy.site`)."""

        def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            """The LM's default position ids (:meth:`adapters.geometry.Geometry.position_ids`)."""

    # ------------------------------------------------------------------ prompting
    def format_prompt(self, text: str, n_images: int = 1) -> str:
        """Wrap the user text and ``n_images`` image placeholders (in order, before the text) in the prompt format.

        ``prompt_template="auto"`` uses the processor's chat template when it has one, else the family's first
        fallback template; ``"chat"`` requires the chat template; any other value names a fallback template.
        """
        template = self.prompt_template
        has_chat = getattr(self.processor, "chat_template", None) is not None
        if template == "chat" or (template == "auto" and has_chat):
            if not has_chat:
                raise ValueError(f"prompt_template='chat' but {self.path} has no chat template")
            messages = []
            if self.system_prompt:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        name = next(iter(self.templates)) if template == "auto" else template
        if name not in self.templates:
            raise ValueError(
                f"unknown prompt_template {template!r} for {self.family}; use auto, chat or {sorted(self.templates)}"
            )
        system = self.system_format.format(self.system_prompt) if self.system_prompt else ""
        return self.templates[name].format(images=self.image_placeholder * n_images, text=text, system=system)

    def answer_token_id(self, answer: str) -> int:
        """Id of the first token the model emits when its answer is ``answer`` (scored by first-token tasks).

        Read off the prompt format itself: the text a reply adds after the generation prompt (with the chat
        template, the assistant turn rendered after ``add_generation_prompt``; with a fallback template, the answer
        after a space unless the prompt already ends in whitespace) is tokenised after the prompt, and the first
        token past their common prefix is returned. So it is ``" Yes"`` for LLaVA-1.5 (``ASSISTANT: Yes``) but
        ``"Yes"`` for ChatML (``<|im_start|>assistant`` + newline).
        """
        prompt = self.format_prompt("Q?", n_images=0)
        if getattr(self.processor, "chat_template", None) is not None and self.prompt_template in ("auto", "chat"):
            messages = [{"role": "user", "content": [{"type": "text", "text": "Q?"}]}]
            full = self.processor.apply_chat_template(
                [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            )
            head = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            if not full.startswith(head):
                raise ValueError("the chat template does not render the assistant turn after the generation prompt")
            reply = full[len(head) :]
        else:
            reply = answer if prompt[-1:].isspace() else " " + answer
        tok = self.processor.tokenizer
        base = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + reply, add_special_tokens=False)["input_ids"]
        k = next((i for i, (a, b) in enumerate(zip(base, ids, strict=False)) if a != b), len(base))
        if k >= len(ids):
            raise ValueError(f"answer {answer!r} adds no token after the prompt")
        return ids[k]

    def turn_suffix_ids(self) -> list[int]:
        r"""Token ids that close the user turn and open the assistant's: the prompts' common token suffix.

        E.g. ``" ASSISTANT:"`` or ChatML's ``<|im_end|>\n<|im_start|>assistant\n``; found as the common token
        suffix of prompts with different user texts.
        """
        if self._turn_suffix is None:
            tok = getattr(self.processor, "tokenizer", self.processor)
            texts = ("alpha beta", "gamma delta?", "x 7")
            probes = [tok(self.format_prompt(t, n_images=0))["input_ids"] for t in texts]
            n = 0
            while n < min(map(len, probes)) and len({p[-1 - n] for p in probes}) == 1:
                n += 1
            if n == 0:
                raise ValueError(f"{self.family}: prompts have no common suffix, so the assistant turn cannot be found")
            self._turn_suffix = probes[0][len(probes[0]) - n :]
        return self._turn_suffix

    # ------------------------------------------------------------------ inputs
    def build_inputs(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Tokenise a batch with LEFT padding and preprocess its images (in order); tensors on the model's device.

        Every row must carry as many images as its prompt has placeholders; the images of all rows are flattened
        in row order, as the processors expect. Four entries are for methods only and are stripped before the model
        call (:data:`HARNESS_PREFIX`): ``harness_images`` (the PIL images, flattened) and ``harness_image_sizes``
        (``[n_images, 2]`` original height and width); ``harness_images_per_row`` (how many of them each row
        has) and ``harness_prompts`` (the prompt texts).
        """
        flat = [im for row in images for im in row]
        kwargs = self.image_kwargs() if flat else {}
        batch = self.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt", **kwargs)
        out = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in out and self.model is not None:
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        # harness-only entries (never passed to the model): the source images and their (height, width)
        out["harness_images"] = flat  # type: ignore[assignment]
        out["harness_image_sizes"] = torch.tensor([[im.height, im.width] for im in flat], dtype=torch.long)
        out["harness_images_per_row"] = [len(row) for row in images]  # type: ignore[assignment]
        out["harness_prompts"] = list(prompts)  # type: ignore[assignment]
        return out

    def image_kwargs(self) -> dict[str, Any]:
        """Image-processor settings passed on every call (none by default; InternVL passes its tiling)."""
        return {}

    # ------------------------------------------------------------------ model calls
    @contextlib.contextmanager
    def _call(self, inputs: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The model call's inputs (active position replacement applied), observers notified around the call.

        Every input observer gets the inputs before the call and ``None`` when it is over. Images a method has
        already encoded for this call (the [CLS] scoring pass, :meth:`Anatomy._vision_cls_probs`) are not encoded
        again (:func:`adapters.hf_compat.encoded_images`).
        """
        self._encoded = None  # what an earlier call left (one that failed before its model call)
        inputs = self._with_positions(inputs)
        try:
            for observe in self._input_observers:
                observe(inputs)
            encoded, self._encoded = self._encoded, None
            with encoded_images(self._require_loaded(), model_inputs(inputs), encoded) as prepared:
                yield prepared
        finally:
            self._encoded = None
            for observe in self._input_observers:
                observe(None)

    @contextlib.contextmanager
    def on_inputs(self, fn: Callable[[dict[str, torch.Tensor] | None], None]) -> Iterator[None]:
        """Call ``fn(inputs)`` before every :meth:`generate_ids` / :meth:`forward` call and ``fn(None)`` after it.

        ``inputs`` are the prompt tensors the model is about to receive (``position_ids`` included when a
        replacement is active); methods build their per-batch state from them. Observers run in registration
        order and are removed on exit.
        """
        self._input_observers.append(fn)
        try:
            yield
        finally:
            self._input_observers.remove(fn)

    @contextlib.contextmanager
    def positions(self, fn: PositionFn) -> Iterator[None]:
        """Replace the LM's position ids (site ``inputs.position_ids``) in :meth:`generate` and :meth:`forward`.

        ``fn(default, inputs)`` receives :meth:`position_ids` (``[batch, seq]``, or ``[3, batch, seq]`` for
        M-RoPE) and returns a tensor of the same shape. Decoding continues from each row's last prompt position
        + 1. Only one replacement may be active.
        """
        if self._position_fn is not None:
            raise RuntimeError("a position-id replacement is already active on this adapter")
        self._position_fn = fn
        try:
            yield
        finally:
            self._position_fn = None

    def _with_positions(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` plus explicit ``position_ids`` when a replacement is active (see :meth:`positions`)."""
        if self._position_fn is None or "position_ids" in inputs:
            return inputs
        default = self.position_ids(inputs)
        new = self._position_fn(default.clone(), inputs)
        if new.shape != default.shape:
            raise ValueError(f"position replacement returned shape {tuple(new.shape)}, expected {tuple(default.shape)}")
        return {**inputs, "position_ids": self._model_position_ids(new.to(default.device, default.dtype), inputs)}

    def _model_position_ids(self, positions: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Convert :meth:`position_ids`-shaped positions to what ``forward``/``generate`` accept (identity for 1-D)."""
        return positions

    def forward(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """One forward pass over the prompt (active position replacement applied); the model's output object."""
        with self._call(inputs) as prepared:
            return self._require_loaded()(**prepared, **kwargs)

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def generate_ids(self, inputs: dict[str, torch.Tensor], **gen_kwargs: Any) -> torch.Tensor:
        """Generate continuations (active position replacement applied); the new token ids, ``[batch, new]``."""
        rows = inputs["input_ids"].shape[0]
        inputs = self._views(inputs)
        tie = _ViewTie(rows, self._stop_ids()) if inputs["input_ids"].shape[0] != rows else None
        processors = [*self._logits_processors, *([tie] if tie else [])]
        if processors:
            extra = list(gen_kwargs.pop("logits_processor", None) or [])
            gen_kwargs["logits_processor"] = LogitsProcessorList([*extra, *processors])
        with contextlib.ExitStack() as stack:
            if tie is not None:
                if gen_kwargs.get("num_beams", 1) > 1:
                    raise ValueError("several views of a batch cannot be decoded with beam search (num_beams > 1)")
                stack.enter_context(tie.feed(self.site("lm.embed")))
            prepared = stack.enter_context(self._call(inputs))
            out = self._require_loaded().generate(**prepared, **gen_kwargs)  # [views · batch, prompt + new]
        return out[:rows, inputs["input_ids"].shape[1] :]

    def _stop_ids(self) -> list[int]:
        """The generation config's end-of-sequence ids (empty when it has none)."""
        eos = self._require_loaded().generation_config.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    @contextlib.contextmanager
    def views(self, fn: ViewFn) -> Iterator[None]:
        """Run every :meth:`generate_ids` / :meth:`next_token_logprobs` call on several views of the batch at once.

        ``fn(inputs)`` returns the inputs of ``k·batch`` rows, the first ``batch`` of them ``inputs`` itself (e.g.
        the same prompts with a distorted image: contrastive decoding). They run as ONE batched forward per step,
        each view's rows with their own KV-cache rows. Decoding stays one text per sample: decoding-logit
        processors (:meth:`decoding_logits`) see all ``k·batch`` rows' scores and choose from rows ``0..batch-1``;
        the other views' rows are then fed the same token as their row ``b mod batch`` at every cached step (the
        token embedding's input is overwritten, site ``lm.embed``) and are marked finished from the first step,
        so generation stops with the batch's own rows. Only the first ``batch`` rows are returned. ``fn`` may
        also run passes of its own and return ``inputs`` unchanged (``k = 1``). One view function at a time.
        """
        if self._view_fn is not None:
            raise RuntimeError("a view function is already active on this adapter")
        self._view_fn = fn
        try:
            yield
        finally:
            self._view_fn = None

    def _views(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs the model call runs on: ``inputs`` itself, or the active view function's ``k·batch`` rows."""
        if self._view_fn is None:
            return inputs
        rows = inputs["input_ids"].shape[0]
        out = self._view_fn(inputs)
        n = out["input_ids"].shape[0]
        if n % rows or out["input_ids"].shape[1:] != inputs["input_ids"].shape[1:]:
            raise ValueError(
                f"a view function must return k x {rows} rows of the batch's length "
                f"{inputs['input_ids'].shape[1]}, got {tuple(out['input_ids'].shape)}"
            )
        return out

    @contextlib.contextmanager
    def decoding_logits(self, processor: Any) -> Iterator[None]:
        """Add a ``transformers.LogitsProcessor`` to every :meth:`generate_ids` call (site ``dec_logits``).

        ``processor(input_ids [batch, seq], scores [batch, vocab]) -> scores`` sees each step's next-token scores
        after the caller's own processors; removed on exit.
        """
        self._logits_processors.append(processor)
        try:
            yield
        finally:
            self._logits_processors.remove(processor)

    def generate(self, inputs: dict[str, torch.Tensor], **gen_kwargs: Any) -> list[str]:
        """Generate continuations and return only the new text of each row, decoded without special tokens."""
        new = self.generate_ids(inputs, **gen_kwargs)
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def answer_lengths(self, new_ids: torch.Tensor) -> list[int]:
        """Per row of :meth:`generate_ids` output ``[batch, new]``, the tokens before its first EOS or padding."""
        cfg = self._require_loaded().generation_config
        stops = {cfg.pad_token_id, *(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])}
        stop = torch.isin(new_ids, torch.tensor([s for s in stops if s is not None], device=new_ids.device))
        ended = stop.any(-1)
        first = stop.int().argmax(-1)  # [batch] index of the first stop (0 when none)
        return torch.where(ended, first, torch.full_like(first, new_ids.shape[1])).tolist()

    def next_token_logprobs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probabilities of the first generated token, ``[batch, vocab]`` (float32).

        One forward pass over the (left-padded) prompts through :meth:`forward`, so an active method applies
        exactly as in the first step of :meth:`generate_ids`; the last position of every row is its real last
        token because padding is on the left.
        """
        rows = inputs["input_ids"].shape[0]
        inputs = self._views(inputs)
        logits = self.forward(inputs, logits_to_keep=1).logits[:, -1, :]  # [views · batch, vocab]
        for processor in self._logits_processors:  # decoding-logit methods act on this step too
            logits = processor(inputs["input_ids"], logits)
        return torch.log_softmax(logits[:rows].float(), dim=-1)
