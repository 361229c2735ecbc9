"""The vLLM backend up to the engine call, against a fake ``vllm`` that accepts only the keyword names of real vLLM.

vLLM needs CUDA and does not install beside this project, so ``sys.modules["vllm"]`` is a fake built from
``tests/data/vllm/api.json`` (names read from the vLLM 0.11.0 and 0.33.0 wheels, one fake per version): its
``LLM``, ``SamplingParams`` and ``LLM.generate`` raise TypeError on any other keyword, and its outputs have the
fields of vLLM's ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``, filled from ``outputs.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness.calls import AdapterCalls
from harness.config import compose_config, instantiate
from harness.engine import from_config
from integrations.vllm_backend import (
    PLACEHOLDERS,
    VLLM_MISSING,
    VLLMCalls,
    answer_logprobs_of,
    answer_sampling_kwargs,
    check_method,
    engine_args,
    import_vllm,
    needs_hf_model,
    output_text,
    placeholder,
    sampling_kwargs,
    supports_token_id_logprobs,
    vllm_prompt,
    vllm_prompts,
)
from methods.base import METHODS, UnsupportedError
from tasks.base import Request

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "vllm"
API = json.loads((DATA / "api.json").read_text())
OUTPUTS = json.loads((DATA / "outputs.json").read_text())
RECORD = DATA / "llava_pope_requests.json"  # the LLaVA POPE requests as vLLM must receive them
VERSIONS = sorted(API["versions"])
NEWEST = VERSIONS[-1]
YES, NO = 292, 297  # " Yes" / " No" of the shipped tiny LLaVA (outputs.json's score record uses them)


# ----------------------------------------------------------------------------------------------- the fake vllm
def fake_vllm(version: str) -> types.ModuleType:
    """A ``vllm`` module whose API takes exactly the keyword names of that vLLM version (``api.json``)."""
    names = API["versions"][version]["names"]
    allowed = {k: set(v) for k, v in names.items()}
    mod = types.ModuleType("vllm")
    mod.__version__ = version
    mod.engines = []

    def checked(what: str, kwargs: dict, ok: set[str]) -> None:
        if bad := sorted(set(kwargs) - ok):
            raise TypeError(f"vLLM {version}: {what} got unexpected keyword(s) {bad}")

    fields = {key: [(n, Any, None) for n in names[key]] for key in ("logprob", "completion_output")}
    mod.Logprob = dataclasses.make_dataclass("Logprob", fields["logprob"])
    mod.CompletionOutput = dataclasses.make_dataclass("CompletionOutput", fields["completion_output"])

    class RequestOutput:
        def __init__(self, **kw: Any) -> None:
            checked("RequestOutput", kw, allowed["request_output"])
            self.__dict__.update(kw)

    class SamplingParams:
        __struct_fields__ = tuple(names["sampling_params"])  # as on vLLM's msgspec.Struct

        def __init__(self, **kw: Any) -> None:
            checked("SamplingParams", kw, allowed["sampling_params"])
            self.kwargs = kw

    class LLM:
        def __init__(self, model: str, **kw: Any) -> None:
            checked("LLM", kw, allowed["llm_init"] | allowed["engine_args"])
            self.kwargs = {"model": model, **kw}
            self.calls: list[dict[str, Any]] = []
            mod.engines.append(self)

        def generate(self, prompts: list[dict], sampling_params: Any = None, **kw: Any) -> list[RequestOutput]:
            checked("LLM.generate", kw, allowed["llm_generate"])
            for p in prompts:
                checked("a text prompt", p, allowed["text_prompt"] | allowed.get("prompt_options", set()))
                checked("multi_modal_data", p.get("multi_modal_data", {}), allowed["multi_modal_data"])
            self.calls.append({"prompts": prompts, "params": sampling_params, "kwargs": kw})
            return [request_output(mod, respond(p, sampling_params), p["prompt"], i) for i, p in enumerate(prompts)]

    mod.RequestOutput, mod.SamplingParams, mod.LLM = RequestOutput, SamplingParams, LLM
    return mod


def respond(prompt: dict, params: Any) -> dict:
    """The outputs.json record answering a prompt: the score record for scoring calls, else by question."""
    if params.kwargs.get("max_tokens") == 1 and {"logprobs", "logprob_token_ids"} & set(params.kwargs):
        return OUTPUTS["score"]
    return next(r for r in OUTPUTS["generate"] if r["question"] in prompt["prompt"])


def completion(mod: types.ModuleType, record: dict) -> Any:
    steps = record.get("logprobs")
    logprobs = [{int(t): mod.Logprob(**lp) for t, lp in step.items()} for step in steps] if steps else None
    return mod.CompletionOutput(index=0, text=record["text"], token_ids=record["token_ids"], logprobs=logprobs,
                                cumulative_logprob=record.get("cumulative_logprob"),
                                finish_reason=record["finish_reason"], stop_reason=None)  # fmt: skip


def request_output(mod: types.ModuleType, record: dict | None, prompt: str, i: int = 0) -> Any:
    outputs = [] if record is None else [completion(mod, record)]
    return mod.RequestOutput(request_id=str(i), prompt=prompt, prompt_token_ids=None, prompt_logprobs=None,
                             outputs=outputs, finished=True)  # fmt: skip


@pytest.fixture(params=VERSIONS)
def vllm(request, monkeypatch) -> types.ModuleType:
    mod = fake_vllm(request.param)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


# ----------------------------------------------------------------------------------------------- helpers
def image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def adapter_of(family: str = "llava", **overrides: Any) -> Any:
    cfg = compose_config([f"model={family}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return instantiate(cfg.model, drop=("backend", "vllm"))  # the backend keys configure the engine


def method_of(name: str) -> Any:
    return instantiate(compose_config([f"method={name}"]).method, drop=("name",))


@pytest.fixture(scope="module")
def pope(tmp_path_factory) -> tuple[Any, list[Request]]:
    """The POPE task and its first samples (limit=2 per split) as requests, images decoded."""
    task, _, _, _ = from_config(compose_config(["task=pope", "limit=2"]), output_dir=tmp_path_factory.mktemp("run"))
    return task, [Request(s.text, s.images()) for s in task.samples()]


def summary(prompt: dict) -> dict:
    """A prompt dict with each image as its size and mode (what llava_pope_requests.json records)."""
    if "multi_modal_data" not in prompt:
        return prompt
    ims = prompt["multi_modal_data"]["image"]
    desc = [{"size": list(im.size), "mode": im.mode} for im in (ims if isinstance(ims, list) else [ims])]
    return {**prompt, "multi_modal_data": {"image": desc if isinstance(ims, list) else desc[0]}}


def engine_record(engine: Any) -> dict:
    """What the fake engine received: its arguments (repo-relative path), sampling params and prompts."""
    args = {**engine.kwargs, "model": str(Path(engine.kwargs["model"]).relative_to(REPO))}
    params = [c["params"].kwargs for c in engine.calls]
    assert all(p == params[0] for p in params)
    prompts = [summary(p) for c in engine.calls for p in c["prompts"]]
    return {"engine_args": args, "sampling_params": params[0], "prompts": prompts}


# ----------------------------------------------------------------------------------------------- requests
def test_llava_pope_requests_equal_the_recorded_example(vllm, pope):
    task, requests = pope
    calls = VLLMCalls(adapter_of("llava"), method_of("none"), batch_size=4)
    calls.load()
    calls.generate(requests, **task.gen_kwargs)
    (engine,) = vllm.engines
    assert [len(c["prompts"]) for c in engine.calls] == [4, 2]  # one engine call per batch
    assert all(c["kwargs"] == {"use_tqdm": False} for c in engine.calls)
    got = engine_record(engine)
    want = json.loads(RECORD.read_text())
    assert got["prompts"] == want["prompts"]
    assert got["sampling_params"] == want["sampling_params"]
    assert got["engine_args"] == want["engine_args"][vllm.__version__]
    sent = [p["multi_modal_data"]["image"] for c in engine.calls for p in c["prompts"]]
    assert all(im is req.images[0] for im, req in zip(sent, requests, strict=True))  # the sample's own image


def test_prompts_equal_the_hf_backend_prompts(pope, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(NEWEST))
    _, requests = pope
    calls = VLLMCalls(adapter_of("llava"), batch_size=4)
    calls.load()
    got = calls.generate(requests[:3], max_new_tokens=2, do_sample=False)
    hf_adapter = adapter_of("llava")
    hf_adapter.load()
    ref = AdapterCalls(hf_adapter, batch_size=4).generate(requests[:3], max_new_tokens=2, do_sample=False)
    assert [(c.prompt, c.n_images) for c in got] == [(c.prompt, c.n_images) for c in ref]


def test_multi_image_and_text_only_requests(vllm):
    adapter = adapter_of("llava")
    calls = VLLMCalls(adapter, batch_size=8, max_images_per_prompt=2)
    calls.load()
    ims = [image(0), image(1, (48, 80))]
    out = calls.generate([Request("Which picture has more shapes?", ims), Request("What is two plus two?")],
                         max_new_tokens=8, do_sample=False)  # fmt: skip
    (engine,) = vllm.engines
    (multi,), (text,) = (c["prompts"] for c in engine.calls)  # image and text-only requests in separate batches
    assert multi["prompt"] == adapter.format_prompt("Which picture has more shapes?", n_images=2)
    assert multi["prompt"].count("<image>") == 2
    got = multi["multi_modal_data"]["image"]
    assert isinstance(got, list) and len(got) == 2 and all(a is b for a, b in zip(got, ims, strict=True))
    assert text == {"prompt": adapter.format_prompt("What is two plus two?", n_images=0)}
    assert "<image>" not in text["prompt"]
    assert [(c.output, c.n_images) for c in out] == [("The second one.", 2), ("Four.", 0)]
    with pytest.raises(ValueError, match="max_images_per_prompt=1"):
        one = VLLMCalls(adapter, batch_size=8)
        one.load()
        one.generate([Request("Which picture has more shapes?", ims)], max_new_tokens=8)


@pytest.mark.parametrize(("family", "image_token"), [("qwen_vl", "<|image_pad|>"), ("internvl", "<IMG_CONTEXT>")])
def test_qwen_and_internvl_prompts_carry_the_placeholders_vllm_expects(family, image_token):
    adapter = adapter_of(family)
    adapter.load_processor()
    assert adapter.model is None  # prompts need the processor only
    expected = API["placeholders"][family]["placeholder"]
    assert PLACEHOLDERS[family] == expected
    ims = [image(0), image(1)]
    two, none = vllm_prompts(adapter, [Request("Is there a star?", ims), Request("Is there a star?")])
    assert two["prompt"].count(expected) == 2
    assert two["prompt"].count(image_token) == 2  # one unexpanded image token per image: vLLM expands it
    assert adapter.processor.image_token == image_token
    assert two["multi_modal_data"]["image"] == ims
    assert none == {"prompt": adapter.format_prompt("Is there a star?", n_images=0)}
    if family == "internvl":
        assert "<img>" not in two["prompt"]  # vLLM's interns1 processor adds <img> ... </img> itself


def test_family_processor_settings_reach_the_engine():
    qwen = adapter_of("qwen_vl", min_pixels=3136, max_pixels=200704)
    qwen.load_processor()
    assert engine_args(qwen)["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 200704}
    assert "mm_processor_kwargs" not in engine_args(adapter_of("qwen_vl"))  # the checkpoint's own bounds
    internvl = adapter_of("internvl", max_tiles=2)
    internvl.load_processor()
    assert engine_args(internvl)["mm_processor_kwargs"] == {"crop_to_patches": True, "min_patches": 1, "max_patches": 2}
    llava = adapter_of("llava")
    args = engine_args(llava, max_images=3, max_model_len=2048, extra={"enforce_eager": True, "seed": 7})
    assert args == {"model": llava.path, "revision": None, "dtype": "float32", "tensor_parallel_size": 1,
                    "gpu_memory_utilization": 0.9, "seed": 7, "limit_mm_per_prompt": {"image": 3},
                    "trust_remote_code": False, "max_model_len": 2048, "enforce_eager": True}  # fmt: skip


def test_a_wrong_placeholder_or_a_lost_image_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"0 '<image>' placeholder\(s\) for 1 image"):
        vllm_prompt("USER: Is there a star? ASSISTANT:", [image(0)], "<image>")
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) for 0 image"):
        vllm_prompt("USER: <image>\nIs there a star? ASSISTANT:", [], "<image>")
    adapter = adapter_of("llava")
    adapter.load_processor()
    monkeypatch.setitem(PLACEHOLDERS, "llava", "<|vision_start|><|image_pad|><|vision_end|>")  # another family's
    with pytest.raises(ValueError, match="placeholder"):
        vllm_prompts(adapter, [Request("Is there a star?", [image(0)])])
    with pytest.raises(UnsupportedError, match="no verified vLLM prompt format"):
        placeholder(types.SimpleNamespace(family="idefics"))


# ----------------------------------------------------------------------------------------------- outputs
def test_outputs_are_parsed_from_vllm_shaped_records(vllm):
    out = request_output(vllm, next(r for r in OUTPUTS["generate"] if r["question"] == "Describe the image."), "p")
    assert output_text(out) == "A red star and a blue circle."
    score = request_output(vllm, OUTPUTS["score"], "p")
    assert answer_logprobs_of(score, {"Yes": YES, "No": NO}) == {"Yes": -0.1053, "No": -2.3026}
    with pytest.raises(ValueError, match=r"no log-prob for answer token\(s\) \{'Maybe': 4001\}"):
        answer_logprobs_of(score, {"Yes": YES, "Maybe": 4001})
    with pytest.raises(ValueError, match="no sample log-probs"):
        answer_logprobs_of(out, {"Yes": YES})
    empty = request_output(vllm, None, "p")
    for parse in (output_text, lambda o: answer_logprobs_of(o, {"Yes": YES})):
        with pytest.raises(ValueError, match="no completion"):
            parse(empty)


def test_gen_kwargs_map_to_sampling_params(vllm):
    greedy = sampling_kwargs({"max_new_tokens": 16, "do_sample": False})
    assert greedy == {"max_tokens": 16, "repetition_penalty": 1.0, "skip_special_tokens": True, "temperature": 0.0}
    assert sampling_kwargs({"max_new_tokens": 16}) == greedy  # do_sample absent: greedy
    assert sampling_kwargs({"max_new_tokens": 16, "temperature": 0.7}) == greedy
    qwen_like = {"repetition_penalty": 1.05, "temperature": 0.01, "top_p": 0.001, "top_k": 1}  # Qwen2-VL's config
    assert sampling_kwargs({"max_new_tokens": 16, "do_sample": False}, qwen_like)["repetition_penalty"] == 1.05
    sampled = sampling_kwargs({"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "seed": 3}, qwen_like)
    assert sampled == {"max_tokens": 8, "repetition_penalty": 1.05, "skip_special_tokens": True, "temperature": 0.7,
                       "top_p": 0.001, "top_k": 1, "seed": 3}  # fmt: skip
    assert sampling_kwargs({"max_new_tokens": 8, "do_sample": True})["top_k"] == 50  # HF's default, not vLLM's 0
    with pytest.raises(ValueError, match=re.escape("['num_beams', 'output_scores']")):
        sampling_kwargs({"max_new_tokens": 8, "num_beams": 2, "output_scores": True})
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_kwargs({"do_sample": False})
    by_id = supports_token_id_logprobs(vllm)
    assert by_id == {"0.11.0": False, "0.33.0": True}[vllm.__version__]
    for kw in (greedy, sampled, answer_sampling_kwargs([YES, NO], by_id)):
        vllm.SamplingParams(**kw)  # every name exists in this version
    if not by_id:
        with pytest.raises(TypeError, match="logprob_token_ids"):  # the fake is as strict as vLLM 0.11
            vllm.SamplingParams(**answer_sampling_kwargs([YES, NO], True))


# ----------------------------------------------------------------------------------------------- methods, import
@pytest.mark.parametrize("name", ["fastv", "var"])
def test_methods_that_hook_the_forward_are_refused_before_loading(name):
    method = method_of(name)
    with pytest.raises(UnsupportedError) as err:
        check_method(method)
    msg = str(err.value)
    assert f"method {name!r} needs the model's attention/hidden states" in msg
    assert "model.backend=hf" in msg and "Methods that run on vLLM: carve, none" in msg
    adapter = adapter_of("llava")
    with pytest.raises(UnsupportedError):
        VLLMCalls(adapter, method)
    assert adapter.processor is None and adapter.model is None


def test_input_only_methods_run():
    assert {n for n in METHODS.names() if METHODS.get(n).input_only} == {"carve", "none"}
    for name in ("none", "carve"):
        check_method(method_of(name))
    assert not needs_hf_model(method_of("none")) and needs_hf_model(method_of("carve"))


def test_missing_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    with pytest.raises(ImportError, match=re.escape(VLLM_MISSING)):
        import_vllm()
    adapter = adapter_of("llava")
    calls = VLLMCalls(adapter, method_of("carve"))  # constructing needs no vllm
    with pytest.raises(ImportError, match=re.escape("pip install '.[vllm]'")):
        calls.load()
    assert adapter.processor is None and adapter.model is None  # nothing loaded before the import failed


# ----------------------------------------------------------------------------------------------- end to end
def test_generate_returns_the_recorded_texts_in_request_order(vllm):
    adapter = adapter_of("llava")
    calls = VLLMCalls(adapter, method_of("none"), batch_size=2)
    calls.load()
    questions = ["Is there a star in the image?", "What is two plus two?", "Is there a cross in the image?",
                 "Describe the image.", "Name a colour."]  # fmt: skip
    requests = [Request(q, [] if i in (1, 4) else [image(i)]) for i, q in enumerate(questions)]
    out = calls.generate(requests, max_new_tokens=16, do_sample=False)
    texts = {r["question"]: r["text"].strip() for r in OUTPUTS["generate"]}
    assert [c.output for c in out] == [texts[q] for q in questions]
    assert [c.n_images for c in out] == [1, 0, 1, 1, 0]
    assert [c.prompt for c in out] == [adapter.format_prompt(r.text, len(r.images)) for r in requests]
    assert all(c.seconds >= 0 for c in out)
    (engine,) = vllm.engines
    assert [len(c["prompts"]) for c in engine.calls] == [2, 1, 2]  # images: 2 + 1, then text-only: 2
    by_id = vllm.__version__ != "0.11.0"
    assert engine.kwargs == engine_args(adapter, full_vocab_logprobs=not by_id)
    assert adapter.model is None  # method none: the HF weights never load
    info = calls.describe()
    assert info["backend"] == "vllm" and info["vllm_version"] == vllm.__version__
    assert info["engine_args"] == engine.kwargs
    assert info["answer_logprobs"] == ("logprob_token_ids" if by_id else "logprobs=-1")


def test_answer_logprobs_through_the_engine(vllm):
    calls = VLLMCalls(adapter_of("llava"), batch_size=2)
    calls.load()
    assert (calls.answer_token_id("Yes"), calls.answer_token_id("No")) == (YES, NO)
    requests = [Request("Is there a star in the image?", [image(0)]), Request("Yes or no?"),
                Request("Is there a cross in the image?", [image(1)])]  # fmt: skip
    scored = calls.answer_logprobs(requests, ["Yes", "No"])
    assert [s.logprobs for s in scored] == [{"Yes": -0.1053, "No": -2.3026}] * 3
    assert [s.prompt for s in scored] == [calls.adapter.format_prompt(r.text, len(r.images)) for r in requests]
    (engine,) = vllm.engines
    params = engine.calls[0]["params"].kwargs
    if supports_token_id_logprobs(vllm):
        assert params == {"max_tokens": 1, "temperature": 0.0, "detokenize": False, "logprob_token_ids": [YES, NO]}
        assert "max_logprobs" not in engine.kwargs
    else:  # vLLM 0.11: the full vocabulary, allowed by the engine
        assert params == {"max_tokens": 1, "temperature": 0.0, "detokenize": False, "logprobs": -1}
        assert engine.kwargs["max_logprobs"] == -1


def test_carve_hands_its_refined_images_to_vllm(pope, monkeypatch):
    mod = fake_vllm(NEWEST)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    _, requests = pope
    requests = requests[:2]
    method, adapter = method_of("carve"), adapter_of("llava")
    calls = VLLMCalls(adapter, method, batch_size=2)
    calls.load()
    assert adapter.model is not None  # CARVE's attention passes run on the HF model
    with method.bind(adapter):
        out = calls.generate(requests, max_new_tokens=8, do_sample=False)
        expected = method.rewrite(list(requests))  # deterministic: the same passes give the same refined images
    (engine,) = mod.engines
    sent = [p["multi_modal_data"]["image"] for c in engine.calls for p in c["prompts"]]
    for got, want, original in zip(sent, expected, requests, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want.images[0]))
        assert not np.array_equal(np.asarray(got), np.asarray(original.images[0]))
    assert [c.prompt for c in out] == [adapter.format_prompt(r.text, 1) for r in requests]


# ----------------------------------------------------------------------------------------------- through run.py's path
def test_a_run_with_backend_vllm_scores_the_engine_answers(tmp_path, monkeypatch):
    """``model.backend=vllm`` end to end through the engine: records hold the engine's texts, the HF weights never
    load, results.json says which backend and engine arguments produced them."""
    from harness.engine import evaluate

    mod = fake_vllm(NEWEST)
    monkeypatch.setitem(sys.modules, "vllm", mod)

    def answer(prompt: dict, params: Any) -> dict:  # a deterministic answer per prompt, "Yes" or "No"
        text = " Yes" if zlib.crc32(prompt["prompt"].encode()) % 3 else "No "
        return {"text": text, "token_ids": [1], "finish_reason": "stop"}

    monkeypatch.setitem(globals(), "respond", answer)
    cfg = compose_config(["model.backend=vllm", "model.vllm.tensor_parallel_size=2", "limit=2", "progress=false"])
    task, adapter, method, settings = from_config(cfg, output_dir=tmp_path)
    settings.report = False
    res = evaluate(task, adapter, method, settings)
    records = [json.loads(x) for x in (tmp_path / res["samples_file"]).read_text().splitlines()]
    assert len(records) == 6 and adapter.model is None
    assert [r["raw_output"] for r in records] == [answer(r, None)["text"].strip() for r in records]
    assert {r["raw_output"] for r in records} == {"Yes", "No"}
    assert res["results"] == task.aggregate(records, seed=0)
    assert res["model"]["backend"] == "vllm"
    assert res["model"]["engine"]["engine_args"]["tensor_parallel_size"] == 2
    (engine,) = mod.engines
    assert engine.kwargs["tensor_parallel_size"] == 2 and engine.kwargs["model"] == adapter.path


def test_a_run_with_backend_vllm_refuses_a_hooking_method_before_anything_loads(tmp_path, monkeypatch):
    from harness.engine import evaluate

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(NEWEST))
    cfg = compose_config(["model.backend=vllm", "method=fastv", "limit=1"])
    task, adapter, method, settings = from_config(cfg, output_dir=tmp_path)
    with pytest.raises(UnsupportedError, match=r"model\.backend=hf"):
        evaluate(task, adapter, method, settings)
    assert adapter.model is None and adapter.processor is None and not sys.modules["vllm"].engines


def test_backend_vllm_is_refused_under_data_parallel_ranks(tmp_path, monkeypatch):
    from harness.distributed import Ranks
    from harness.engine import check_backend

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(NEWEST))
    _, _, method, settings = from_config(compose_config(["model.backend=vllm", "limit=1"]), output_dir=tmp_path)
    check_backend(method, settings)  # one process: fine
    settings.ranks = Ranks(rank=1, world=2, local_rank=1)
    with pytest.raises(UnsupportedError, match="tensor_parallel_size"):
        check_backend(method, settings)
