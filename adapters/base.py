"""The adapter interface: one model family each, behind one uniform *anatomy*.

An adapter knows its family: checkpoint loading, the processor and prompt template, image-token spans, the
visual-token grid, position ids and where the decoder layers and attention modules live. Methods talk to a
model only through this interface, so they never ask "which model is this?".

Intervention sites share one grammar (resolved by :meth:`Adapter.site`)::

    lm.embed                     token embedding module
    lm.layers.{l}                decoder layer l          (forward pre-hook input = resid_pre [batch, seq, d])
    lm.layers.{l}.attn           its self-attention       (output = attn_out [batch, seq, d])
    lm.layers.{l}.mlp            its MLP                  (output = mlp_out [batch, seq, d])
    lm.norm                      final norm
    vision                       the vision tower (encoder)
    vision.layers.{l}            vision-encoder layer l
    vision.layers.{l}.attn       its self-attention
    vision.layers.{l}.mlp        its MLP
    projector                    multimodal projector     (output = projector.out, the visual tokens; family-shaped)

Tensor-valued sites inside attention (``lm.layers.{l}.attn.scores`` / ``.probs``) are reached through the
attention-function switch (:meth:`Adapter.lm_attention`), never by patching modeling files. The LM's position ids
(``inputs.position_ids``) are read with :meth:`Adapter.position_ids` and replaced with :meth:`Adapter.positions`.

The uniform anatomy every adapter provides (so methods never special-case a family unless their paper does):

* decoder layers / attention / MLP modules (:meth:`site`), :meth:`num_layers`, :attr:`num_heads`,
  :attr:`num_kv_heads`, :attr:`head_dim`; the LM-only attention switch (:meth:`lm_attention`);
* the vision tower and :attr:`vision_has_cls`; projector input (:meth:`vision_features`) and the projected visual
  tokens in LM order (:meth:`image_features`);
* per-sample image-token spans (:meth:`image_spans`, :meth:`tile_spans`) and each visual token's
  ``(image, tile, row, col)`` (:meth:`visual_token_map`);
* the position-id builder (:meth:`position_ids`) and its replacement (:meth:`positions`).
"""

from __future__ import annotations

import abc
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, LogitsProcessorList
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from core.registry import Registry

#: the vision tower's attention function while [CLS] scores are read (:meth:`Adapter._vision_cls_probs`)
VISION_CLS = "harness_vision_cls"


def _vision_cls_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """SDPA, and at the module carrying a ``_harness_cls_sink`` list, its [CLS] row's probabilities appended."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    sink = getattr(module, "_harness_cls_sink", None)
    if sink is not None:
        logits = query[:, :, :1].float() @ key.float().transpose(-1, -2) * scaling  # [n, heads, 1, k]
        if attention_mask is not None:  # the towers here pass none; an additive or boolean one would apply here
            logits = logits.masked_fill(~attention_mask, -torch.inf) if attention_mask.dtype == torch.bool else (
                logits + attention_mask[..., :1, :].float())  # fmt: skip
        sink.append(logits.softmax(-1))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)  # fmt: skip


AttentionInterface.register(VISION_CLS, _vision_cls_attention)
AttentionMaskInterface.register(VISION_CLS, sdpa_mask)

ADAPTERS: Registry[type[Adapter]] = Registry("adapter")

#: ChatML fallback prompt (Qwen-VL, InternVL) and its system block, for checkpoints without a chat template
CHATML = "{system}<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"

#: inputs entries starting with this are for methods (source images, their sizes) and never reach the model
HARNESS_PREFIX = "harness_"

#: a rectangle ``(x0, y0, x1, y1)`` in an ORIGINAL image's pixel coordinates (x right, y down)
Box = tuple[float, float, float, float]

#: ``fn(default_position_ids, inputs) -> new_position_ids`` (same shape), see :meth:`Adapter.positions`
PositionFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

#: ``fn(inputs) -> inputs`` of ``k·batch`` rows whose first ``batch`` rows are ``inputs`` (see :meth:`Adapter.views`)
ViewFn = Callable[[dict[str, Any]], dict[str, Any]]

_SITE = re.compile(r"^(lm|vision)\.layers\.(\d+)(?:\.(attn|mlp))?$")


def model_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``inputs`` without the harness-only entries, i.e. what the model's ``forward``/``generate`` accepts."""
    return {k: v for k, v in inputs.items() if not k.startswith(HARNESS_PREFIX)}


@dataclass(frozen=True)
class TileFrame:
    """Where one tile's visual-token grid lies in its source image (see :meth:`Adapter.tile_frames`).

    Attributes:
        image: The sample's image index (prompt order).
        tile: The image's tile index (0 for untiled families).
        rows: Token-grid rows.
        cols: Token-grid columns.
        box: The rectangle of the original image the grid covers; it extends beyond the image where the
            processor padded it (letterbox) and lies inside it for centre crops and tiles.
        size: The original image's ``(height, width)``.
    """

    image: int
    tile: int
    rows: int
    cols: int
    box: Box
    size: tuple[int, int]


def box_overlap(cells: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Fraction of each cell ``[n, 4]`` inside ``region`` (``[4]`` or ``[n, 4]``), both ``(x0, y0, x1, y1)``; ``[n]``.

    A NaN cell (no grid cell) gives NaN.
    """
    x0, y0 = torch.maximum(cells[:, 0], region[..., 0]), torch.maximum(cells[:, 1], region[..., 1])
    x1, y1 = torch.minimum(cells[:, 2], region[..., 2]), torch.minimum(cells[:, 3], region[..., 3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    return inter / ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]))


class _ViewTie:
    """Keeps the extra views of a batch on the batch's own text during :meth:`Adapter.generate_ids`.

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


class SiteError(LookupError):
    """An intervention site name that does not resolve on this model."""


class Adapter(abc.ABC):
    """Base class of model-family adapters.

    Construction is cheap and never touches weights, so method/adapter compatibility can be checked before the
    model loads; :meth:`load` does the expensive part.

    Args:
        name: Short model name used in run directories and reports.
        path: Local directory or hub id handed to ``from_pretrained``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's own dtype).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
        attn_implementation: Attention kernel for both towers at load time (``"sdpa"`` or ``"eager"``).
        revision: Hub revision (ignored for local directories).
        prompt_template: ``"auto"`` (processor chat template when present, else the family default),
            ``"chat"`` (require the chat template) or a family template name.
        system_prompt: Optional system text put before the user turn.
    """

    family: ClassVar[str]
    #: attribute paths from the top-level model to the anatomy's containers
    paths: ClassVar[dict[str, str]]
    #: names of the attention / MLP sub-modules inside an LM layer and a vision layer
    layer_parts: ClassVar[dict[str, dict[str, str]]]
    #: whether the vision tower prepends a [CLS] token (dropped or kept before the projector)
    vision_has_cls: ClassVar[bool]
    #: fallback prompt templates (``{images}``, ``{text}``, ``{system}``) when the processor has no chat template
    templates: ClassVar[dict[str, str]]
    #: the per-image placeholder inserted into ``{images}`` by fallback templates
    image_placeholder: ClassVar[str]
    #: how a fallback template's ``{system}`` renders a system prompt (empty when there is none)
    system_format: ClassVar[str] = "{} "

    def __init__(
        self,
        *,
        name: str,
        path: str,
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        prompt_template: str = "auto",
        system_prompt: str | None = None,
    ) -> None:
        self.name = name
        self.path = str(path)
        self.dtype_name = dtype
        self.device_name = device
        self.attn_implementation = attn_implementation
        self.revision = revision
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.model: nn.Module | None = None
        self.processor: Any = None
        self.load_seconds: float | None = None
        self._position_fn: PositionFn | None = None
        self._input_observers: list[Callable[[dict[str, torch.Tensor] | None], None]] = []
        self._turn_suffix: list[int] | None = None
        self._logits_processors: list[Any] = []
        self._view_fn: ViewFn | None = None

    # ------------------------------------------------------------------ loading
    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device_name)

    @property
    def torch_dtype(self) -> torch.dtype | str:
        """``torch.dtype`` for ``from_pretrained`` (or ``"auto"``)."""
        if self.dtype_name == "auto":
            return "auto"
        try:
            return getattr(torch, self.dtype_name)
        except AttributeError:
            raise ValueError(f"unknown dtype {self.dtype_name!r}; use float32, bfloat16, float16 or auto") from None

    def load(self) -> None:
        """Load processor and weights (idempotent); records ``load_seconds``."""
        if self.model is not None:
            return
        t0 = time.perf_counter()
        self.load_processor()
        self.model = self._load_model()
        self.model.eval()
        self.load_seconds = time.perf_counter() - t0

    def load_processor(self) -> Any:
        """Load the processor only (idempotent), never the weights; returns it.

        Enough for :meth:`format_prompt` and :meth:`answer_token_id`, e.g. to format prompts for another engine.
        """
        if self.processor is None:
            self.processor = self._load_processor()
        return self.processor

    @abc.abstractmethod
    def _load_processor(self) -> Any:
        """Return the processor loaded with ``from_pretrained`` and set up as the family needs (left padding)."""

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every ``from_pretrained`` call of this checkpoint takes (the hub revision, if any)."""
        return {"revision": self.revision} if self.revision else {}

    @abc.abstractmethod
    def _model_class(self) -> type[nn.Module]:
        """The transformers class of the checkpoint (called after :meth:`load_processor`)."""

    def _load_model(self) -> nn.Module:
        """The model from ``from_pretrained`` (safetensors only) on :attr:`device`."""
        return (
            self._model_class()
            .from_pretrained(
                self.path,
                dtype=self.torch_dtype,
                attn_implementation=self.attn_implementation,
                use_safetensors=True,
                **self.hub_kwargs,
            )
            .to(self.device)
        )

    def _require_loaded(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"adapter {self.name!r} is not loaded; call load() first")
        return self.model

    # ------------------------------------------------------------------ prompting and generation
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

    def build_inputs(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Tokenise a batch with LEFT padding and preprocess its images (in order); tensors on the model's device.

        Every row must carry as many images as its prompt has placeholders; the images of all rows are flattened
        in row order, as the processors expect. Four entries are for methods only and are stripped before the model
        call (:data:`HARNESS_KEYS`): ``harness_images`` (the PIL images, flattened) and ``harness_image_sizes``
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

    @contextlib.contextmanager
    def _call(self, inputs: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The model call's inputs (active position replacement applied), observers notified around the call.

        Every input observer gets the inputs before the call and ``None`` when it is over.
        """
        inputs = self._with_positions(inputs)
        try:
            for observe in self._input_observers:
                observe(inputs)
            yield model_inputs(inputs)
        finally:
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

    def forward(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """One forward pass over the prompt (active position replacement applied); the model's output object."""
        with self._call(inputs) as prepared:
            return self._require_loaded()(**prepared, **kwargs)

    # ------------------------------------------------------------------ anatomy
    @property
    @abc.abstractmethod
    def image_token_id(self) -> int:
        """Token id of the image placeholder in ``input_ids``."""

    def image_token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean mask of visual-token positions in the LM sequence, ``[batch, seq]``."""
        return inputs["input_ids"] == self.image_token_id

    def image_spans(self, inputs: dict[str, torch.Tensor]) -> list[list[tuple[int, int]]]:
        """Per sample, the ``[start, end)`` runs of visual tokens in the (padded) LM sequence, in order."""
        mask = self.image_token_mask(inputs).to(torch.int8)  # [batch, seq]
        edges = torch.diff(
            mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1)
        )
        spans = []
        for row in edges.tolist():  # one copy to the host for the batch, then plain Python (no per-row sync)
            starts = [i for i, e in enumerate(row) if e == 1]
            ends = [i for i, e in enumerate(row) if e == -1]
            spans.append(list(zip(starts, ends, strict=True)))
        return spans

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

    def instruction_spans(self, inputs: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        r"""Per sample, ``[start, end)`` of the instruction: after the LAST visual token, up to the turn suffix.

        The span ends at the first :meth:`turn_suffix_ids` occurrence after the last visual token.

        With a single-turn prompt that is the user's question plus any template tokens between the image and
        it (Qwen's ``<|vision_end|>``, InternVL's ``</img>\n``); the end-of-turn marker and the assistant
        header are excluded. In multi-turn sequences it is the first question after the image. A row without
        visual tokens (a text-only call) has no instruction after an image: its span is empty, ``(0, 0)``.

        Raises:
            ValueError: a row with visual tokens but without the turn suffix after them.
        """
        suffix = torch.tensor(self.turn_suffix_ids(), device=inputs["input_ids"].device)
        ids = inputs["input_ids"]  # [batch, seq]
        hits = (ids.unfold(1, len(suffix), 1) == suffix).all(-1)  # [batch, seq - k + 1]: suffix starts here
        spans = []
        for b, (vis, hit) in enumerate(zip(self.image_token_mask(inputs), hits, strict=True)):
            if not vis.any():
                spans.append((0, 0))
                continue
            start = int(vis.nonzero().max()) + 1
            after = hit[start:].nonzero()
            if len(after) == 0:
                raise ValueError(f"row {b}: no assistant turn ({self.turn_suffix_ids()}) after the image")
            spans.append((start, start + int(after[0])))
        return spans

    def tile_spans(self, inputs: dict[str, torch.Tensor]) -> list[list[tuple[int, int, int, int]]]:
        """Per sample, ``(image, tile, start, end)`` of each tile's run of visual tokens, in sequence order.

        Untiled families have one tile per image; InternVL has one per crop plus the thumbnail.
        """
        out = []
        for mask, vmap in zip(self.image_token_mask(inputs), self.visual_token_map(inputs), strict=True):
            pos = mask.nonzero().flatten().tolist()
            runs: list[tuple[int, int, int, int]] = []
            for p, (img, tile) in zip(pos, vmap[:, :2].tolist(), strict=True):
                if runs and runs[-1][:2] == (img, tile) and runs[-1][3] == p:
                    runs[-1] = (img, tile, runs[-1][2], p + 1)
                else:
                    runs.append((img, tile, p, p + 1))
            out.append(runs)
        return out

    @abc.abstractmethod
    def image_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Vision-tower inputs (``pixel_values`` etc.) for a list of images, on the model's device."""

    def pixel_rows(self, inputs: dict[str, Any]) -> list[int]:
        """How many rows of ``pixel_values`` each image of the batch fills, in order (one per image by default).

        Qwen-VL fills one row per ViT patch, InternVL one per tile; the processor's order is the images' order.
        """
        n_images, rows = len(inputs["harness_image_sizes"]), inputs["pixel_values"].shape[0]
        if rows != n_images:
            raise NotImplementedError(f"{self.family}: {rows} pixel rows for {n_images} images")
        return [1] * n_images

    def pixel_noise(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise shaped like one image's ``pixel_values`` rows (float32, on their device).

        One draw per element of the normalised image the processor produced; families that repeat an image inside
        their pixel tensor (Qwen-VL's temporal copies) repeat the draw too.
        """
        return torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=torch.float32)

    @abc.abstractmethod
    def vision_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projector's input for these images (family-shaped; ``site("projector")`` consumes it)."""

    def image_features(self, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected visual tokens, in the order they fill the LM's image placeholders, ``[n_visual_total, d]``."""
        projected = self.site("projector")(self.vision_features(image_inputs))
        return projected.reshape(-1, projected.shape[-1])

    @abc.abstractmethod
    def visual_token_map(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, ``(image, tile, row, col)`` of every visual token, in sequence order.

        ``image`` counts the sample's images from 0 in prompt order; ``tile`` counts an image's tiles (0 for
        untiled families); ``(row, col)`` is the token's cell in its tile's token grid. Rows of ``-1`` in row/col
        mark tokens without a grid cell (e.g. a kept [CLS]).

        Returns:
            One ``LongTensor [n_visual_tokens, 4]`` per sample.
        """

    def visual_grid(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the ``(row, col)`` of every visual token (:meth:`visual_token_map` columns 2–3)."""
        return [m[:, 2:] for m in self.visual_token_map(inputs)]

    def tile_frames(self, inputs: dict[str, torch.Tensor]) -> list[list[TileFrame]]:
        """Per sample, each (image, tile)'s token grid and the original-image rectangle it covers, in sequence order.

        Needs ``harness_image_sizes`` (inputs from :meth:`build_inputs`); the rectangles come from
        :meth:`tile_boxes`, the family's preprocessing geometry.
        """
        if "harness_image_sizes" not in inputs:
            raise ValueError("tile geometry needs the original image sizes (inputs from adapter.build_inputs)")
        sizes = inputs["harness_image_sizes"].tolist()
        out, first = [], 0
        for vmap in self.visual_token_map(inputs):
            cells = vmap[vmap[:, 2] >= 0]  # [n, 4] tokens with a grid cell
            tiles: dict[tuple[int, int], tuple[int, int]] = {}
            for image, tile, row, col in cells.tolist():
                r, c = tiles.get((image, tile), (0, 0))
                tiles[(image, tile)] = (max(r, row + 1), max(c, col + 1))
            n_images = int(vmap[:, 0].max()) + 1 if len(vmap) else 0
            per_image = [sum(1 for i, _t in tiles if i == image) for image in range(n_images)]
            size = [tuple(sizes[first + i]) for i in range(n_images)]  # (height, width) per image
            boxes = [self.tile_boxes(size[i], n) for i, n in enumerate(per_image)]
            out.append([TileFrame(i, t, r, c, boxes[i][t], size[i]) for (i, t), (r, c) in tiles.items()])
            first += n_images
        if first != len(sizes):
            raise ValueError(f"{len(sizes)} image sizes for {first} images in the prompts")
        return out

    def tile_boxes(self, size: tuple[int, int], n_tiles: int) -> list[Box]:
        """The rectangles of an image of ``size = (height, width)`` that its ``n_tiles`` tiles' grids cover.

        Default: one tile whose grid covers the whole image (the image is resized, never cropped or padded).
        """
        if n_tiles != 1:
            raise NotImplementedError(f"{self.family}: no tile geometry for {n_tiles} tiles per image")
        h, w = size
        return [(0.0, 0.0, float(w), float(h))]

    def token_cells(self, inputs: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample, each visual token's cell and its image's rectangle in original pixels (float64).

        Returns:
            ``(cells [n, 4], images [n, 4])`` per sample, ``(x0, y0, x1, y1)``, from :meth:`tile_frames`; a token
            without a grid cell (a kept [CLS]) has a NaN cell.
        """
        out = []
        for vmap, frames in zip(self.visual_token_map(inputs), self.tile_frames(inputs), strict=True):
            by_tile = {(f.image, f.tile): f for f in frames}
            sizes = {f.image: f.size for f in frames}
            cells, images = [], []
            for image, tile, r, c in vmap.tolist():
                h, w = sizes[image]
                images.append((0.0, 0.0, float(w), float(h)))
                if r < 0:
                    cells.append((float("nan"),) * 4)
                    continue
                f = by_tile[(image, tile)]
                cw, ch = (f.box[2] - f.box[0]) / f.cols, (f.box[3] - f.box[1]) / f.rows
                cells.append((f.box[0] + c * cw, f.box[1] + r * ch, f.box[0] + (c + 1) * cw, f.box[1] + (r + 1) * ch))
            as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64, device="cpu").reshape(-1, 4)  # noqa: E731
            out.append((as_tensor(cells), as_tensor(images)))
        return out

    def visual_content(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the fraction of each visual token's patch covered by the image rather than padding, ``[n]``.

        From the preprocessing geometry (:meth:`token_cells`): below 1 only where the processor letterboxes
        (LLaVA's ``do_pad``); tokens without a grid cell (a kept [CLS]) count as content.
        """
        return [box_overlap(cells, images).nan_to_num(nan=1.0).float() for cells, images in self.token_cells(inputs)]

    def vision_cls_attention(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the vision tower's head-mean [CLS]→patch attention for each visual token, ``[n]``.

        Read at the layer whose output feeds the projector (site ``vision.layers.{l}.attn.probs``, CLS query row),
        pooled to the LM's visual tokens where patches are merged. Families without a [CLS] token raise.
        """
        raise NotImplementedError(
            f"the {self.family} vision tower has no [CLS] token, so there is no [CLS]→patch attention to read"
        )

    @contextlib.contextmanager
    def vision_attention(self, implementation: str) -> Iterator[None]:
        """Switch the VISION tower's attention function (e.g. to ``"eager"`` to read probabilities); restore on exit."""
        model = self._require_loaded()
        vcfg = model.config.vision_config
        previous = vcfg._attn_implementation
        model.set_attn_implementation({"vision_config": implementation})
        try:
            yield
        finally:
            model.set_attn_implementation({"vision_config": previous})

    def _per_row(self, inputs: dict[str, torch.Tensor], units: torch.Tensor, per_unit: int) -> list[torch.Tensor]:
        """Split per-image (or per-tile) token scores ``[n_units, tokens_per_unit]`` into the batch's rows."""
        out, start = [], 0
        for n in self.image_token_mask(inputs).sum(-1).tolist():
            k, rest = divmod(int(n), per_unit)
            if rest:
                raise ValueError(f"{n} visual tokens is not a multiple of {per_unit}")
            out.append(units[start : start + k].reshape(-1))
            start += k
        if start != units.shape[0]:
            raise ValueError(f"{units.shape[0]} images/tiles for {start} in the prompts")
        return out

    def _vision_cls_probs(self, pixel_kwargs: dict[str, torch.Tensor], feature_layer: int) -> torch.Tensor:
        """[CLS]-query attention of the layer whose output is ``hidden_states[feature_layer]``, ``[n, heads, 1+P]``.

        One tower pass with its fused kernel: the attention function of :data:`VISION_CLS` computes the [CLS] row's
        softmax (float32) at that layer only, instead of an eager pass that materialises every layer's ``P²``
        probabilities (what ``output_attentions=True`` costs).
        """
        if not isinstance(feature_layer, int) or feature_layer == 0:
            raise ValueError(f"vision_feature_layer {feature_layer!r} has no single attention layer")
        n = self.num_layers("vision")
        attn = self.site(f"vision.layers.{feature_layer % n if feature_layer < 0 else feature_layer - 1}.attn")
        sink: list[torch.Tensor] = []
        attn._harness_cls_sink = sink
        try:
            with self.vision_attention(VISION_CLS):
                self._require_loaded().model.vision_tower(**pixel_kwargs)
        finally:
            del attn._harness_cls_sink
        if len(sink) != 1:
            raise RuntimeError(f"the vision tower called layer {feature_layer}'s attention {len(sink)} times, not once")
        return sink[0][:, :, 0]  # [n, heads, 1 + P]

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids the LM uses in prefill, as ``generate`` builds them.

        ``[batch, seq]`` for 1-D RoPE (``cumsum(attention_mask) - 1``, so left padding is skipped); families with
        M-RoPE override this.
        """
        mask = inputs["attention_mask"].long()
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

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

    def site(self, name: str) -> nn.Module:
        """Resolve an intervention site of the grammar in the module docstring to its module.

        Raises:
            SiteError: when the name is malformed, the layer index is out of range or the part is missing.
        """
        model = self._require_loaded()
        if name in self.paths:
            return self._get(model, self.paths[name], name)
        m = _SITE.match(name)
        if not m:
            raise SiteError(
                f"site {name!r} does not follow the grammar; known roots: {sorted(self.paths)}, "
                "lm.layers.{l}[.attn|.mlp], vision.layers.{l}[.attn|.mlp]"
            )
        tower, idx, part = m.group(1), int(m.group(2)), m.group(3)
        layers = self._get(model, self.paths[f"{tower}.layers"], name)
        if idx >= len(layers):
            raise SiteError(f"site {name!r}: {tower} has {len(layers)} layers (0..{len(layers) - 1})")
        layer = layers[idx]
        return layer if part is None else self._get(layer, self.layer_parts[tower][part], name)

    @staticmethod
    def _get(root: nn.Module, dotted: str, site: str) -> Any:
        obj = root
        for attr in dotted.split("."):
            if not hasattr(obj, attr):
                raise SiteError(f"site {site!r}: {type(obj).__name__} has no attribute {attr!r} (path {dotted})")
            obj = getattr(obj, attr)
        return obj

    def num_layers(self, tower: str = "lm") -> int:
        """Number of decoder (``"lm"``) or vision-encoder (``"vision"``) layers."""
        return len(self.site(f"{tower}.layers"))

    @property
    def num_heads(self) -> int:
        """Query heads per LM attention layer."""
        return int(self._require_loaded().config.get_text_config().num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per LM attention layer (fewer than :attr:`num_heads` under GQA)."""
        cfg = self._require_loaded().config.get_text_config()
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def head_dim(self) -> int:
        """Per-head dimension of the LM attention."""
        cfg = self._require_loaded().config.get_text_config()
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @contextlib.contextmanager
    def lm_attention(self, implementation: str) -> Iterator[None]:
        """Switch the LANGUAGE MODEL's attention function (not the vision tower's); restore on exit.

        ``implementation`` is a name registered with ``transformers.AttentionInterface`` (and, for custom
        functions, with ``AttentionMaskInterface`` under the same name so masks are materialised).
        """
        model = self._require_loaded()
        text_cfg = model.config.get_text_config()
        previous = text_cfg._attn_implementation
        model.set_attn_implementation({"text_config": implementation})
        try:
            yield
        finally:
            model.set_attn_implementation({"text_config": previous})

    def describe(self) -> dict[str, Any]:
        """Model metadata for the results file."""
        info: dict[str, Any] = {
            "name": self.name,
            "family": self.family,
            "path": self.path,
            "revision": self.revision,
            "dtype": self.dtype_name,
            "device": str(self.device),
            "prompt_template": self.prompt_template,
            "system_prompt": self.system_prompt,
        }
        if self.model is not None:
            cfg = self.model.config
            info.update(
                model_class=type(self.model).__name__,
                commit_hash=getattr(cfg, "_commit_hash", None),
                attn_implementation={
                    "text": cfg.get_text_config()._attn_implementation,
                    "vision": getattr(getattr(cfg, "vision_config", None), "_attn_implementation", None),
                },
                n_parameters=sum(p.numel() for p in self.model.parameters()),
                lm_layers=self.num_layers("lm"),
                heads=self.num_heads,
                kv_heads=self.num_kv_heads,
                vision_layers=self.num_layers("vision"),
                vision_has_cls=self.vision_has_cls,
            )
        return info
