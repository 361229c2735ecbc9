r"""lmms-eval bridge: run lmms-eval tasks on any harness adapter under any harness mitigation method.

Targets lmms-eval **0.7.3** (``lmms_eval.api.model.lmms``, the ``lmms_eval.models`` entry-point group of
``lmms_eval/models/registry_v2.py``). :class:`HarnessLMM` is a *simple* lmms-eval model (``is_simple = True``:
text contexts plus ``doc_to_visual``); it is registered as ``harness`` by the entry point
``harness = "integrations.lmms_eval_manifest:manifest"`` in ``pyproject.toml`` (a separate, import-cheap module,
because lmms-eval loads every entry point on each ``import lmms_eval.models``).

Usage (from an editable install of this repository, so that ``conf/`` and ``assets/`` are found)::

    lmms-eval --model harness \
        --model_args "model=llava,method=fastv,method.ratio=0.75,overrides=model.dtype=bfloat16;model.device=cuda" \
        --tasks pope --batch_size 8 --output_path outputs/lmms_eval

(add ``;model.path=llava-hf/llava-1.5-7b-hf`` for a real checkpoint; the default is the shipped tiny LLaVA).

``--model_args`` (lmms-eval splits it at commas outside quotes and brackets, then at the first ``=``):

* ``model=<conf/model option>`` (default ``llava``) and ``method=<conf/method option>`` (default ``none``);
* ``<group>.<key>=<value>``: one Hydra override each, e.g. ``method.ratio=0.75`` (lmms-eval has already turned
  the value into a bool/int/float; it is written back for Hydra, booleans as ``true``/``false``);
* ``overrides=<o1>;<o2>;...``: any Hydra overrides verbatim, separated by ``;`` (the comma is taken by lmms-eval;
  quote the whole ``--model_args`` in a shell because of the ``;``). Bracketed lists survive the comma split:
  ``method.layer=[1,2]`` works in either form;
* ``batch_size=N`` (else lmms-eval's ``--batch_size``; ``auto`` is not supported), ``device=...`` (same as
  ``model.device=...``), ``output_dir=PATH`` (where methods that write files put them, e.g. CARVE's masks).
  ``model.backend`` must stay ``hf`` (the vLLM engine is refused).

What it does: the config is composed exactly as ``run.py`` would (:func:`harness.config.compose_config`), the
method's :meth:`~methods.base.Method.check` runs *before* any weight is loaded (an unsupported model/method pair
raises :class:`~methods.base.UnsupportedError`), then the adapter loads. Every lmms-eval call
(``generate_until``, ``loglikelihood``) runs inside ``torch.inference_mode()`` and ``method.bind(adapter)``,
entered per call, so the method's hooks are installed for the call and removed after it:

* ``generate_until``: requests are grouped by their ``gen_kwargs`` (first-appearance order), each group is cut
  into batches of ``batch_size`` in request order and answered by :class:`harness.calls.AdapterCalls` (the
  method's ``rewrite``, the adapter's prompt template with image placeholders before the text, left padding),
  so the outputs are the harness's own. Greedy unless ``temperature > 0`` (then sampling with ``temperature`` and
  ``top_p``); ``max_new_tokens`` defaults to 1024 and ``num_beams`` to 1 as in lmms-eval's ``llava_hf``; the
  (stripped) output is cut at the first occurrence of each ``until`` string. Results come back in request order.
* ``loglikelihood``: ``sum log P(continuation tokens | context)`` and whether greedy decoding would emit exactly
  them, from ONE teacher-forced forward pass over ``prompt(context) + continuation`` under the method (as
  lmms-eval's own models score). The continuation's tokens are those of ``tokenize(prompt + continuation)``
  past its common prefix with ``tokenize(prompt)``, so a token merging across the boundary is scored as part of
  the continuation. Decoding-logit methods (site ``dec_logits``) are applied at every continuation position.
  Caveat: a method that reads the prompt's *last* token (FastV ``rule=last``) sees the continuation's last token
  here, not the generation prompt's.
* ``generate_until_multi_round``: not supported (``NotImplementedError``).

Visuals must be PIL images (flattened from ``doc_to_visual``; ``None`` entries skipped); video paths, audio dicts
and other objects raise ``TypeError``. A literal ``<image>`` in a context (some llava-style task prompts carry
one) is removed: the adapter puts its own placeholders before the text. Single process only (``rank`` 0 of 1).

Install (lmms-eval's full requirements would replace the pinned CPU torch, pin ``wandb==0.25.0`` against this
project's ``wandb>=0.31`` and pull datasets/accelerate/...; the bridge's import path needs only loguru and pytz)::

    pip install -e '.[lmms]'                 # loguru, pytz; registers the lmms_eval.models entry point
    pip install --no-deps lmms-eval==0.7.3

Exercised here (``tests/test_lmms_eval_bridge.py``): the entry point through ``lmms_eval.models.get_model``,
``create_from_arg_string``, and the model API on hand-built ``lmms_eval.api.instance.Instance`` objects over
POPE samples with the shipped tiny checkpoints; and (``tests/test_lmms_eval_e2e.py``, with the ``lmms-run`` extra)
the ``lmms-eval`` CLI end to end on lmms-eval's own ``pope`` task over a local ``save_to_disk`` copy of shapes-world
POPE (``dataset_kwargs: {load_from_disk: true}``). Not exercised: tasks that download from the hub (offline here).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

#: lmms-eval's llava_hf default for ``max_new_tokens``
DEFAULT_MAX_NEW_TOKENS = 1024
#: ``gen_kwargs`` keys passed through to ``generate`` unchanged (besides the ones mapped explicitly)
PASSTHROUGH_GEN_KEYS = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
#: ``gen_kwargs`` keys that are consumed here (mapped or deliberately ignored)
MAPPED_GEN_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")
#: the llava-style image marker some lmms-eval prompts carry (the adapter adds its own placeholders)
IMAGE_MARKER = "<image>"
#: separator of Hydra overrides inside ``overrides=`` (commas separate lmms-eval's model args)
OVERRIDE_SEPARATOR = ";"


def hydra_overrides(
    model: str,
    method: str,
    overrides: str | None = None,
    dotted: dict[str, Any] | None = None,
    device: str | None = None,
) -> list[str]:
    """The Hydra overrides for ``compose_config`` from the parsed ``--model_args``.

    Args:
        model: ``conf/model`` option.
        method: ``conf/method`` option.
        overrides: ``;``-separated Hydra overrides, verbatim (surrounding quotes removed).
        dotted: ``{"group.key": value}`` model args; values as lmms-eval parsed them (bool/int/float/str).
        device: ``model.device`` when given.
    """
    out = [f"model={model}", f"method={method}"]
    text = str(overrides or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    out += [o.strip() for o in text.split(OVERRIDE_SEPARATOR) if o.strip()]
    for key, value in (dotted or {}).items():
        rendered = ("true" if value else "false") if isinstance(value, bool) else "null" if value is None else value
        out.append(f"{key}={rendered}")
    if device:
        out.append(f"model.device={device}")
    return out


def flatten_images(visuals: Any) -> list[Image.Image]:
    """PIL images of a ``doc_to_visual`` result (nested lists flattened, ``None`` skipped), converted to RGB.

    Raises:
        TypeError: for anything that is not an image (a video path, an audio dict, ...): the harness's adapters
            take images only.
    """
    out: list[Image.Image] = []
    stack = [visuals]
    while stack:
        item = stack.pop(0)
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            stack[:0] = list(item)
        elif isinstance(item, Image.Image):
            out.append(item if item.mode == "RGB" else item.convert("RGB"))
        else:
            kind = "a video/file path" if isinstance(item, str) else "audio" if isinstance(item, dict) else "an object"
            raise TypeError(
                f"the harness bridge takes images only (PIL.Image), but doc_to_visual gave {kind} of type "
                f"{type(item).__name__}: video and audio tasks are not supported"
            )
    return out


def truncate(text: str, until: Sequence[str]) -> str:
    """``text`` cut before the first occurrence of each (non-empty) stop string, in turn."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generation_kwargs(gen_kwargs: dict[str, Any] | None) -> tuple[list[str], dict[str, Any], list[str]]:
    """``(until, generate kwargs, ignored keys)`` from an lmms-eval request's ``gen_kwargs`` (not modified).

    Greedy unless ``temperature > 0``; ``max_new_tokens`` defaults to 1024 and ``num_beams`` to 1 (lmms-eval's
    llava_hf); ``do_sample`` is ignored (``temperature`` decides, as in llava_hf).
    """
    gen = dict(gen_kwargs or {})
    until = gen.get("until")
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
    temperature = float(gen.get("temperature") or 0.0)
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "num_beams": int(gen.get("num_beams") or 1),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs["temperature"] = temperature
        if gen.get("top_p") is not None:
            kwargs["top_p"] = float(gen["top_p"])
    kwargs.update({k: gen[k] for k in PASSTHROUGH_GEN_KEYS if k in gen})
    ignored = sorted(k for k in gen if k not in MAPPED_GEN_KEYS and k not in PASSTHROUGH_GEN_KEYS)
    return list(until), kwargs, ignored


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class HarnessLMM(lmms):
    """A harness adapter under a harness method, as an lmms-eval simple model (see the module docstring).

    Args:
        model: ``conf/model`` option (``llava``, ``qwen_vl``, ``internvl``, ...).
        method: ``conf/method`` option (``none``, ``fastv``, ...).
        overrides: Hydra overrides separated by ``;`` (e.g. ``"method.ratio=0.75;model.dtype=bfloat16"``).
        batch_size: Requests per model call (int or digit string); default: the config's ``batch_size``.
        device: ``model.device`` override (lmms-eval's ``--device``).
        output_dir: Directory for methods that write files (the engine's run directory); default none.
        max_batch_size: Accepted from lmms-eval's CLI and ignored.
        **dotted: ``group.key=value`` Hydra overrides (e.g. ``method.ratio=0.75``).

    Raises:
        methods.base.UnsupportedError: the method cannot run on the model's family (before weights load).
        TypeError: an unknown model argument.
        ValueError: ``model.backend`` other than ``hf`` (vLLM has no teacher-forced forward for the method's hooks).
    """

    is_simple = True

    def __init__(
        self,
        model: str = "llava",
        method: str = "none",
        overrides: str | None = None,
        batch_size: int | str | None = None,
        device: str | None = None,
        output_dir: str | None = None,
        max_batch_size: int | None = None,
        **dotted: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(k for k in dotted if "." not in k)
        if unknown:
            raise TypeError(
                f"unknown model_args {unknown} for --model harness; use model=, method=, overrides=a=1;b=2, "
                "group.key=value (a Hydra override), batch_size=, device=, output_dir="
            )
        from harness.calls import AdapterCalls
        from harness.config import build_adapter, compose_config, instantiate

        self.overrides = hydra_overrides(str(model), str(method), overrides, dotted, device)
        self.config = compose_config(self.overrides)
        backend = self.config.model.get("backend", "hf")
        if backend != "hf":
            raise ValueError(f"--model harness runs the transformers adapter only (model.backend=hf), got {backend!r}")
        self.adapter = build_adapter(self.config.model)
        self.method = instantiate(self.config.method, drop=("name",))
        self.method.check(self.adapter)  # unsupported combinations fail before any weight is loaded
        if output_dir is not None:
            self.method.output_dir = Path(output_dir)
        size = self.config.batch_size if batch_size is None else batch_size
        if isinstance(size, str) and not size.strip().isdigit():
            raise ValueError(f"batch_size must be a positive integer for --model harness, got {size!r}")
        self._batch_size = int(size)
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self._batch_size}")
        self.adapter.load()
        self.calls = AdapterCalls(self.adapter, self._batch_size, self.method)
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> HarnessLMM:
        """Build from ``--model_args``; its values win over lmms-eval's CLI settings (``--batch_size`` etc.).

        lmms-eval's default passes both (``cls(**args, **cli)``), which fails on a ``batch_size`` given twice.
        """
        args = lmms_utils.simple_parse_args_string(arg_string)
        cli = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **cli)

    # ------------------------------------------------------------------ lmms-eval properties
    @property
    def batch_size(self) -> int:
        """Requests per model call."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        """The adapter's device."""
        return self.adapter.device

    @property
    def tokenizer(self) -> Any:
        """The adapter's tokenizer."""
        return self.adapter.processor.tokenizer

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _under_method(self) -> Iterator[None]:
        """``torch.inference_mode()`` and the method's hooks for one lmms-eval call (removed on exit)."""
        with torch.inference_mode(), self.method.bind(self.adapter):
            yield

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _request(self, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Any:
        """The harness request: context text (llava ``<image>`` markers removed) and the doc's images."""
        from tasks.base import Request

        images = flatten_images(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual is not None else []
        if IMAGE_MARKER in context:
            context = context.replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "")
        return Request(text=context, images=images)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            eval_logger.warning(message)

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Generated text per request (``until``-truncated), in request order; see the module docstring."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            groups.setdefault(json.dumps(a[1] or {}, sort_keys=True, default=repr), []).append(i)
        out: list[str | None] = [None] * len(requests)
        n_batches = sum(-(-len(idx) // self.batch_size) for idx in groups.values())
        bar = tqdm(total=n_batches, disable=self.rank != 0, desc=f"harness/{self.method.name}")
        with self._under_method():
            for idx in groups.values():
                until, kwargs, ignored = generation_kwargs(args[idx[0]][1])
                if ignored:
                    self._warn_once(f"harness bridge: gen_kwargs {ignored} are not passed to generate")
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start : start + self.batch_size]
                    batch = [self._request(args[i][0], *args[i][2:6]) for i in chunk]
                    for i, call in zip(chunk, self.calls.generate(batch, **kwargs), strict=True):
                        text = truncate(call.output, until)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
                    bar.update(1)
        bar.close()
        return [t for t in out if t is not None]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(sum log P(continuation | context), is_greedy)`` per request, in order; see the module docstring."""
        from harness.calls import batches_by_images

        items = []
        for req in requests:
            if len(req.args) == 2:  # lmms-eval's unconditional (mutual-information) requests: text only
                context, continuation = req.args
                items.append((self._request(context, None, 0, "", ""), continuation))
                continue
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            continuation = (
                doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self._doc(task, split, doc_id))
            )
            items.append((self._request(context, doc_to_visual, doc_id, task, split), str(continuation)))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        batches = batches_by_images([bool(r.images) for r, _ in items], self.batch_size)
        bar = tqdm(total=len(batches), disable=self.rank != 0, desc=f"harness/{self.method.name} loglikelihood")
        with self._under_method():
            for idx in batches:
                for i, score in zip(idx, self._score([items[i] for i in idx]), strict=True):
                    out[i] = score
                    self.cache_hook.add_partial("loglikelihood", (requests[i].args[0], items[i][1]), score)
                bar.update(1)
        bar.close()
        return [s for s in out if s is not None]

    def _score(self, batch: list[tuple[Any, str]]) -> list[tuple[float, bool]]:
        """One left-padded teacher-forced forward over prompt + continuation (inside the method's context)."""
        requests = self.method.rewrite([r for r, _ in batch])
        tok = self.tokenizer
        texts, targets = [], []
        for req, (_, continuation) in zip(requests, batch, strict=True):
            prompt = self.adapter.format_prompt(req.text, n_images=len(req.images))
            head = tok(prompt, add_special_tokens=False)["input_ids"]
            whole = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
            texts.append(prompt + continuation)
            targets.append(whole[common_prefix(head, whole) :])
        longest = max(len(t) for t in targets)
        if longest == 0:
            return [(0.0, True)] * len(batch)
        inputs = self.adapter.build_inputs(texts, [list(r.images) for r in requests])
        ids = inputs["input_ids"]  # [batch, seq], left-padded: every continuation ends its row
        logits = self.adapter.forward(inputs, logits_to_keep=longest + 1).logits  # [batch, longest + 1, vocab]
        # decoding-logit methods (site dec_logits) act on every next-token distribution, as in generate
        processors = list(getattr(self.adapter, "_logits_processors", []))
        out = []
        for row, target in enumerate(targets):
            n = len(target)
            if n == 0:
                out.append((0.0, True))
                continue
            if ids[row, -n:].tolist() != target:
                raise RuntimeError(
                    "the processor tokenised the continuation differently from the tokenizer "
                    f"({ids[row, -n:].tolist()} vs {target}); cannot locate it in the sequence"
                )
            steps = logits[row, -n - 1 : -1].float()  # [n, vocab]: position t predicts continuation token t
            if processors:
                seq = ids.shape[1]
                rows = []
                for t in range(n):
                    scores = steps[t : t + 1]
                    for processor in processors:
                        scores = processor(ids[row : row + 1, : seq - n + t], scores)
                    rows.append(scores)
                steps = torch.cat(rows).float()
            want = torch.tensor(target, device=steps.device)
            logp = torch.log_softmax(steps, dim=-1).gather(1, want[:, None]).sum()
            out.append((float(logp), bool((steps.argmax(-1) == want).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported by the harness bridge."""
        raise NotImplementedError(
            "--model harness does not implement generate_until_multi_round (multi-round tasks); "
            "use generate_until / loglikelihood tasks"
        )
