"""The lmms-eval bridge (integrations/lmms_eval_model.py) on the shipped tiny LLaVA and POPE samples.

Needs lmms-eval installed without its dependencies and this project installed for its entry point:
``pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3``.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

try:
    from lmms_eval.api.instance import Instance
except ImportError as exc:  # a failure, not a skip: `make test` installs it
    raise ImportError(
        "tests/test_lmms_eval_bridge.py needs lmms-eval: "
        "pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3"
    ) from exc

from integrations.lmms_eval_model import HarnessLMM, generation_kwargs, hydra_overrides, truncate

DESCRIBE = "Please describe this image in detail."
CLI = {"batch_size": 1, "max_batch_size": None, "device": None}  # what lmms-eval's CLI passes by default


class RecordingHook:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_partial(self, attr, req, res) -> None:
        self.calls.append((attr, req, res))


@pytest.fixture(scope="module")
def docs():
    """Four POPE samples about four different images, as an lmms-eval task split ``{doc_id: doc}``."""
    from harness.config import compose_config
    from harness.engine import from_config

    cfg = compose_config(["task=pope", "limit=24", "task.splits=[random]"])
    task, *_ = from_config(cfg, output_dir=tempfile.mkdtemp())
    first: dict = {}
    for s in task.samples():
        first.setdefault(s.image_id, s)
    samples = list(first.values())[:4]
    assert len(samples) == 4
    return {s.sample_id: s for s in samples}


def to_visual(doc):
    return doc.images()


def gen(context, gen_kwargs, doc_id, visual=to_visual):
    return Instance("generate_until", (context, gen_kwargs, visual, doc_id, "pope", "test"), idx=0,
                    metadata={"task": "pope", "doc_id": doc_id, "repeats": 1})  # fmt: skip


def ll(context, continuation, doc_id, visual=to_visual):
    return Instance("loglikelihood", (context, continuation, visual, doc_id, "pope", "test"), idx=0,
                    metadata={"task": "pope", "doc_id": doc_id, "repeats": 1})  # fmt: skip


def attach(bridge, docs):
    bridge.task_dict = {"pope": {"test": docs}}
    return bridge


@pytest.fixture(scope="module")
def plain(docs):
    """``--model harness --model_args model=llava,method=none,batch_size=2`` as lmms-eval's CLI builds it."""
    return attach(HarnessLMM.create_from_arg_string("model=llava,method=none,batch_size=2", dict(CLI)), docs)


@pytest.fixture(scope="module")
def fastv(docs):
    """FastV keeping one visual token per row (changes the captions); batch size from the CLI (a string)."""
    args = "model=llava,method=fastv,overrides=method.keep=1;method.rule=last"
    return attach(HarnessLMM.create_from_arg_string(args, {**CLI, "batch_size": "2"}), docs)


def harness_outputs(adapter, method, texts_images, batch_size, **gen_kwargs):
    """The harness's own outputs: AdapterCalls under the method, as the engine runs it."""
    from harness.calls import AdapterCalls
    from tasks.base import Request

    reqs = [Request(text, images) for text, images in texts_images]
    with torch.inference_mode(), method.bind(adapter):
        return [c.output for c in AdapterCalls(adapter, batch_size, method).generate(reqs, **gen_kwargs)]


def hooks_left(adapter) -> int:
    """Hooks and observers of ours on the adapter (transformers' own output-capturing hooks are permanent)."""
    ours = [h for m in adapter.model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
            if not getattr(h, "__module__", "").startswith("transformers.")]  # fmt: skip
    return len(ours) + len(adapter._input_observers) + len(adapter._logits_processors)


# ------------------------------------------------------------------------------------------ registration, args


def test_entry_point_resolves_to_the_bridge():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    assert "harness" in MODEL_REGISTRY_V2.list_model_names(), (
        "the lmms_eval.models entry point is not registered: run `pip install -e . --no-deps`"
    )
    assert get_model("harness") is HarnessLMM
    assert MODEL_REGISTRY_V2.resolve("harness").model_type == "simple"


def test_model_args_become_hydra_overrides(monkeypatch):
    from lmms_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(
        "model=qwen_vl,method=fastv,method.ratio=0.75,method.debias=false,"
        "overrides=model.dtype=bfloat16;task.splits=[random,popular]"
    )
    dotted = {k: v for k, v in args.items() if "." in k}
    assert hydra_overrides(args["model"], args["method"], args["overrides"], dotted, "cuda:1") == [
        "model=qwen_vl",
        "method=fastv",
        "model.dtype=bfloat16",
        "task.splits=[random,popular]",
        "method.ratio=0.75",
        "method.debias=false",
        "model.device=cuda:1",
    ]
    # model_args win over the CLI's settings (lmms-eval's default would pass batch_size twice)
    seen = {}
    monkeypatch.setattr(HarnessLMM, "__init__", lambda self, **kw: seen.update(kw))
    HarnessLMM.create_from_arg_string("model=llava,batch_size=4", {"batch_size": 1, "device": "cpu", "x": None})
    assert seen == {"model": "llava", "batch_size": 4, "device": "cpu"}


def test_unknown_model_arg_is_refused():
    with pytest.raises(TypeError, match="unknown model_args"):
        HarnessLMM(model="llava", pretrained="llava-hf/llava-1.5-7b-hf")


def test_generation_kwargs_mapping():
    until, kw, ignored = generation_kwargs(
        {"until": "\n", "temperature": 0, "do_sample": True, "image_aspect_ratio": 1}
    )
    assert until == ["\n"] and ignored == ["image_aspect_ratio"]
    assert kw == {"max_new_tokens": 1024, "num_beams": 1, "do_sample": False}
    until, kw, _ = generation_kwargs({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5, "top_k": 3})
    assert until == [] and kw == {"max_new_tokens": 5, "num_beams": 1, "do_sample": True, "temperature": 0.7,
                                  "top_p": 0.9, "top_k": 3}  # fmt: skip
    with pytest.raises(ValueError, match="until"):
        generation_kwargs({"until": 3})
    assert truncate("a, b. c", [",", ""]) == "a" and truncate("a b", ["."]) == "a b"


def test_unsupported_method_raises_before_any_weight_loads(monkeypatch):
    from adapters.base import Adapter
    from methods.base import UnsupportedError

    def no_load(self):
        raise AssertionError(f"{self.name} weights loaded")

    monkeypatch.setattr(Adapter, "load", no_load)
    for method in ("fastervlm", "embedlens"):
        with pytest.raises(UnsupportedError, match=f"method '{method}' .*qwen_vl"):
            HarnessLMM(model="qwen_vl", method=method)
    with pytest.raises(ValueError, match="backend"):  # the vLLM engine cannot run the teacher-forced scoring
        HarnessLMM(model="llava", **{"model.backend": "vllm"})
    with pytest.raises(AssertionError, match="weights loaded"):  # control: a supported pair does reach load()
        HarnessLMM(model="qwen_vl", method="none")


# ------------------------------------------------------------------------------------------ generate_until


def test_generate_until_equals_harness_outputs_in_request_order(plain, docs):
    ids = list(docs)
    short = {"max_new_tokens": 6, "temperature": 0, "until": []}
    cut = {"max_new_tokens": 12, "until": [","]}
    reqs = [
        gen(DESCRIBE, short, ids[0]),
        gen(docs[ids[1]].text, cut, ids[1]),
        gen(docs[ids[2]].text, short, ids[2]),
        gen(DESCRIBE, cut, ids[3]),
        gen(DESCRIBE, short, ids[3]),
        gen(DESCRIBE, cut, ids[1]),
    ]
    before = copy.deepcopy([r.args[1] for r in reqs])
    plain.cache_hook = hook = RecordingHook()
    out = plain.generate_until(reqs)

    # the harness on the same texts and images, the same groups, batches of 2 (group `short` splits in two)
    def group(indices, **kw):
        pairs = [(reqs[i].args[0], docs[reqs[i].args[3]].images()) for i in indices]
        return dict(zip(indices, harness_outputs(plain.adapter, plain.method, pairs, 2, **kw), strict=True))

    a = group([0, 2, 4], max_new_tokens=6, do_sample=False, num_beams=1)
    b = group([1, 3, 5], max_new_tokens=12, do_sample=False, num_beams=1)
    assert any("," in b[i] for i in (3, 5)), "the `until` check needs a caption with a comma"
    expected = [a[0], b[1].split(",")[0], a[2], b[3].split(",")[0], a[4], b[5].split(",")[0]]
    assert out == expected
    assert out[0] != out[3] and out[2] in ("Yes", "No")  # different groups really differ
    assert [r.args[1] for r in reqs] == before  # gen_kwargs untouched
    order = [0, 2, 4, 1, 3, 5]  # group by group, request order inside a group
    assert [(c[0], *c[1], c[2]) for c in hook.calls] == [("generate_until", *reqs[i].args[:2], out[i]) for i in order]


def test_generate_until_llava_marker_and_non_image_visuals(plain, docs):
    doc_id = next(iter(docs))
    text = docs[doc_id].text
    assert plain.generate_until([gen("<image>\n" + text, {"max_new_tokens": 4}, doc_id)]) == plain.generate_until(
        [gen(text, {"max_new_tokens": 4}, doc_id)]
    )
    with pytest.raises(TypeError, match="video"):
        plain.generate_until([gen(text, {}, doc_id, visual=lambda d: ["/data/clip.mp4"])])
    with pytest.raises(TypeError, match="audio"):
        plain.generate_until([gen(text, {}, doc_id, visual=lambda d: [{"array": [0.0], "sampling_rate": 16000}])])
    with pytest.raises(NotImplementedError, match="multi_round"):
        plain.generate_until_multi_round([])


def test_method_runs_inside_the_bridge_and_its_hooks_are_removed(plain, fastv, docs):
    from harness.config import instantiate

    ids = list(docs)
    kw = {"max_new_tokens": 10}
    reqs = [gen(DESCRIBE, kw, i) for i in ids[:3]]
    pairs = [(DESCRIBE, docs[i].images()) for i in ids[:3]]
    baseline = plain.generate_until(reqs)
    out = fastv.generate_until(reqs)
    assert fastv.batch_size == 2 and fastv.method.keep == 1
    report = fastv.method.report()
    assert report["rows"] == 3 and report["kept_visual_tokens_per_row"] == 1.0
    assert out != baseline  # one visual token left changes the captions
    # the harness under a fresh FastV of the same config gives the same outputs
    same = instantiate(fastv.config.method, drop=("name",))
    assert out == harness_outputs(fastv.adapter, same, pairs, 2, max_new_tokens=10, do_sample=False, num_beams=1)
    with torch.inference_mode(), same.bind(fastv.adapter):
        assert hooks_left(fastv.adapter) > 0  # control: the count sees FastV's hooks
    # outside the bridge the adapter is the plain model again: no hooks, no FastV
    assert hooks_left(fastv.adapter) == 0
    assert fastv.adapter.model.config.get_text_config()._attn_implementation == "sdpa"
    with torch.inference_mode():
        inputs = fastv.adapter.build_inputs([fastv.adapter.format_prompt(DESCRIBE, 1)] * 3, [p[1] for p in pairs])
        assert fastv.adapter.generate(inputs, max_new_tokens=10, do_sample=False) == baseline


# ------------------------------------------------------------------------------------------ loglikelihood


def reference_loglikelihood(adapter, context, continuation, images):
    """A plain unbatched forward of the HF model on prompt + continuation, log_softmax summed over the continuation."""
    tok = adapter.processor.tokenizer
    prompt = adapter.format_prompt(context, n_images=len(images))
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    whole = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(head), len(whole)) and head[k] == whole[k]:
        k += 1
    target = torch.tensor(whole[k:])
    inputs = adapter.processor(text=[prompt + continuation], images=images or None, return_tensors="pt")
    with torch.no_grad():
        logits = adapter.model(**inputs).logits[0].float()  # [seq, vocab]
    assert inputs["input_ids"][0, -len(target) :].tolist() == target.tolist()
    steps = logits[-len(target) - 1 : -1]
    return float(torch.log_softmax(steps, -1)[torch.arange(len(target)), target].sum())


def test_loglikelihood_equals_an_independent_forward(plain, docs):
    ids = list(docs)
    question = docs[ids[0]].text
    answer = harness_outputs(plain.adapter, plain.method, [(question, docs[ids[0]].images())], 1, max_new_tokens=8)[0]
    caption = harness_outputs(plain.adapter, plain.method, [(DESCRIBE, docs[ids[1]].images())], 1, max_new_tokens=6)[0]
    other = " No" if answer == "Yes" else " Yes"
    wrong = " Here" + caption[len(caption.split()[0]) :]
    assert caption.split()[0] != "Here"
    # batches of 2 pair a short and a long prompt, so rows are left-padded; then a text-only row
    cases = [(question, " " + answer, ids[0]), (DESCRIBE, " " + caption, ids[1]), (question, other, ids[0]),
             (DESCRIBE, wrong, ids[1])]  # fmt: skip
    reqs = [ll(c, t, i) for c, t, i in cases]
    reqs.append(Instance("loglikelihood", ("Is the sky blue?", " Yes"), idx=0, metadata={"task": "pope", "doc_id": 0,
                                                                                        "repeats": 1}))  # fmt: skip
    out = plain.loglikelihood(reqs)
    refs = [reference_loglikelihood(plain.adapter, c, t, docs[i].images()) for c, t, i in cases]
    refs.append(reference_loglikelihood(plain.adapter, "Is the sky blue?", " Yes", []))
    assert [lp for lp, _ in out] == pytest.approx(refs, abs=1e-4)
    assert [g for _, g in out[:4]] == [True, True, False, False]
    assert all(lp < 0 for lp, _ in out) and out[0][0] > out[2][0] and out[1][0] > out[3][0]


def test_loglikelihood_runs_under_the_method(plain, fastv, docs):
    doc_id = list(docs)[1]
    req = [ll(DESCRIBE, " There is a white circle", doc_id)]
    assert fastv.loglikelihood(req)[0][0] != pytest.approx(plain.loglikelihood(req)[0][0], abs=1e-3)
    # decoding-logit methods (site dec_logits) act on every scored position
    tok = plain.adapter.processor.tokenizer
    boost = tok(" No", add_special_tokens=False)["input_ids"][-1]

    def prefer_no(input_ids, scores):
        scores = scores.clone()
        scores[:, boost] += 100.0
        return scores

    question = docs[doc_id].text
    raw = plain.loglikelihood([ll(question, " No", doc_id)])[0]
    with plain.adapter.decoding_logits(prefer_no):
        pushed = plain.loglikelihood([ll(question, " No", doc_id)])[0]
    assert pushed[0] > -1e-3 and pushed[1] is True
    assert raw[0] < pushed[0] - 1e-3  # without the processor " No" is less likely
    assert plain.loglikelihood([ll(question, " No", doc_id)])[0] == pytest.approx(raw)
