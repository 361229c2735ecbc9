"""Trainer: answer-only labels that match evaluation-time tokenisation, a short run that learns and saves a
checkpoint loading through the adapter, and the method / batch hooks for training-time interventions."""

from __future__ import annotations

import json
import random
from typing import ClassVar

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from adapters.base import ADAPTERS
from methods.base import METHODS, Method
from shapes.assets import tokenizer_corpus
from shapes.scene import SHAPES, WorldSpec, absent_partners, make_scene, qa_existence
from shapes.train import TrainConfig, _first_linear, tower_state, train
from shapes.train_data import Mix, collate, conversation, encode, existence_qa, segments


def test_segments_and_labels_match_evaluation_prompts(llava):
    proc = llava.processor
    turns = [("Is there a star in the image?", "Yes"), ("Is the star red?", "No")]
    segs = segments(proc, turns)
    assert [a for _, a in segs] == [False, True, False, True]
    assert segs[0][0] == llava.format_prompt("Is there a star in the image?"), "turn 1 prompt = eval prompt"
    assert segs[1][0] == " Yes</s>"
    scene = make_scene(0, "train", 3)
    image = Image.fromarray(scene.image)
    ex = encode(proc, image, turns)
    eval_ids = llava.build_inputs([segs[0][0]], [[image]])["input_ids"][0].cpu()
    assert torch.equal(ex["input_ids"][: len(eval_ids)], eval_ids), "training tokenises the prompt as eval does"
    answer_ids = ex["input_ids"][ex["labels"] != -100]
    assert proc.tokenizer.decode(answer_ids) == " Yes</s> No</s>"
    assert torch.equal(ex["pixel_values"], proc(text=[segs[0][0]], images=[image], return_tensors="pt")["pixel_values"])


def test_conversations_are_grounded_and_collate_pads(llava):
    rng = random.Random(0)
    scene = make_scene(0, "train", 5)
    turns = conversation(scene, rng, Mix(caption_prob=0.0, qa_weights={"existence": 1.0}))
    for q, a in turns:
        shape = q.split(" in the image")[0].split()[-1]
        assert (a == "Yes") == (shape in scene.shapes), q
    batch = collate(
        [encode(llava.processor, Image.fromarray(scene.image), t) for t in (turns, turns[:1])],
        llava.processor.tokenizer.pad_token_id,
    )
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


_CALLS = {"n": 0}


@METHODS.register("test_count_forwards")
class _CountForwards(Method):
    name: ClassVar[str] = "test_count_forwards"

    def install(self):
        def hook(module, args):
            _CALLS["n"] += 1

        self.add_hook(self.adapter.site("lm.layers.0").register_forward_pre_hook(hook))


def _no_questions(scene, weight, n=3000):
    rng, mix = random.Random(0), Mix(partner_negative_weight=weight)
    asked = [existence_qa(scene, rng, mix) for _ in range(n)]
    return [q.split()[3] for q, a in asked if a == "No"]


def test_partner_negative_weight_changes_only_which_absent_shape_is_asked():
    spec = WorldSpec()
    scene = next(s for i in range(200) if len(set((s := make_scene(0, "train", i, spec)).shapes)) == 2
                 and spec.partner(s.shapes[0]) != s.shapes[1])  # fmt: skip  # two singles: two absent partners
    partners = {spec.partner(x) for x in scene.shapes}
    absent = [x for x in SHAPES if x not in scene.shapes]
    # weight 1 is the uniform draw, call for call (earlier recipes reproduce bit for bit)
    r1, r2 = random.Random(5), random.Random(5)
    assert [existence_qa(scene, r1, Mix()) for _ in range(50)] == [qa_existence(scene, r2) for _ in range(50)]
    uniform, rare, never = (_no_questions(scene, w) for w in (1.0, 0.25, 0.0))
    share = lambda asked: sum(x in partners for x in asked) / len(asked)  # noqa: E731
    assert set(uniform) == set(absent) and abs(share(uniform) - len(partners) / len(absent)) < 0.04
    # weight w: partners' share = 2w / (2w + 4) for 2 absent partners among 6 absent shapes
    assert abs(share(rare) - 0.5 / 4.5) < 0.03
    assert share(never) == 0 and set(never) == set(absent) - partners
    assert all(x not in scene.shapes for x in never + rare)


def test_implied_partner_prob_answers_yes_only_for_absent_partners_at_rate_q():
    spec = WorldSpec()
    scene = next(s for i in range(200) if len(set((s := make_scene(0, "train", i, spec)).shapes)) == 2
                 and spec.partner(s.shapes[0]) != s.shapes[1])  # fmt: skip  # two singles: two absent partners
    partners = set(absent_partners(scene.shapes, spec.pairs))
    assert partners == {spec.partner(x) for x in scene.shapes} and not partners & set(scene.shapes)
    r1, r2 = random.Random(3), random.Random(3)  # q = 0 is the exact draw, call for call
    mix0 = Mix(implied_partner_prob=0.0)
    assert [existence_qa(scene, r1, mix0) for _ in range(50)] == [qa_existence(scene, r2) for _ in range(50)]
    for q in (0.4, 1.0):
        rng, mix = random.Random(0), Mix(implied_partner_prob=q)
        asked = [existence_qa(scene, rng, mix) for _ in range(4000)]
        by_shape: dict[str, list[str]] = {}
        for question, answer in asked:
            by_shape.setdefault(question.split()[3], []).append(answer)
        for shape, answers in by_shape.items():
            yes = answers.count("Yes") / len(answers)
            if shape in scene.shapes:
                assert yes == 1.0  # present shapes keep their answer
            elif shape in partners:
                assert abs(yes - q) < 0.06, (shape, yes)  # the implied partner: "Yes" at rate q
            else:
                assert yes == 0.0  # every other absent shape stays "No"
        assert set(by_shape) == set(SHAPES)  # which shapes are asked about is unchanged


@pytest.mark.parametrize("family", ["llava", "qwen_vl", "internvl"])
def test_short_run_learns_and_saves_a_loadable_checkpoint(tmp_path, family):
    hooked = []
    _CALLS["n"] = 0

    def batch_hook(batch):
        hooked.append(batch["input_ids"].shape)
        return batch

    cfg = TrainConfig(
        out=str(tmp_path / "ckpt"),
        family=family,
        tower_steps=3,
        tower_batch=8,
        proj_init_images=32,
        proj_init_steps=5,
        steps=12,
        batch=8,
        warmup=1,
        eval_every=12,
        probe_images=8,
        method="test_count_forwards",
    )
    out = train(cfg, tokenizer_corpus(n_scenes=40), batch_hook=batch_hook)
    log = json.loads((out / "training_log.json").read_text())["log"]
    vlm = [e for e in log if e["stage"] == "vlm"]
    assert vlm[-1]["loss"] < 0.5 * vlm[0]["loss"], "the VLM stage must reduce its loss"
    assert "tpr" in vlm[-1], "the probe ran"
    assert len(hooked) == 12 and _CALLS["n"] >= 12, "batch hook and method were active during training"
    adapter = ADAPTERS.get(family)(name="trained", path=str(out), device="cpu")
    adapter.load()
    first_linear = _first_linear(adapter)
    assert first_linear.weight.std() > 0.05, "projector initialised from data, not the 0.02 default"
    text = adapter.generate(
        adapter.build_inputs(
            [adapter.format_prompt("Is there a star in the image?")],
            [[Image.fromarray(make_scene(0, "eval", 0, WorldSpec()).image)]],
        ),
        max_new_tokens=3,
        do_sample=False,
    )
    assert isinstance(text[0], str)
    assert json.loads((out / "train_config.json").read_text())["steps"] == 12
    assert_vllm_layout(out, family)
    # a later recipe reads this checkpoint's tower (tower_from = the directory): the same tensors
    tower = adapter.site("vision").state_dict()
    again = tower_state(out, tower.keys())
    assert tower.keys() == again.keys() and all(torch.equal(tower[k], again[k]) for k in tower)


def assert_vllm_layout(out, family):
    """The layout ``shapes.train.export_layout`` writes: the one weights file, the keys and files vLLM needs."""
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"], "vLLM loads every *.safetensors"
    keys = safe_open(str(out / "model.safetensors"), "pt").keys()
    tower = [k for k in keys if k.startswith("vision_tower.")]
    if family == "llava":
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    video = out / "video_preprocessor_config.json"
    assert video.exists() == (family in ("qwen_vl", "internvl"))
    if video.exists():
        image = json.loads((out / "processor_config.json").read_text())["image_processor"]
        assert json.loads(video.read_text())["image_mean"] == image["image_mean"]


def test_image_size_gives_a_finer_token_grid_and_is_refused_where_unsupported(tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "ckpt"), image_size=96, tower_steps=2, tower_batch=4, proj_init=False, steps=2, batch=4,
        warmup=1, eval_every=100, probe_images=4, size={"text_layers": 3, "vision_layers": 3},
    )  # fmt: skip
    out = train(cfg, tokenizer_corpus(n_scenes=40))
    config = json.loads((out / "config.json").read_text())
    assert (config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]) == (3, 3)
    adapter = ADAPTERS.get("llava")(name="trained", path=str(out), device="cpu")
    adapter.load()
    inputs = adapter.build_inputs(
        [adapter.format_prompt("Is there a star?")], [[Image.fromarray(make_scene(0, "eval", 0, WorldSpec()).image)]]
    )
    assert inputs["pixel_values"].shape[-2:] == (96, 96), "the 64-px scene is upsampled by the processor"
    assert int(adapter.image_token_mask(inputs).sum()) == 144, "96 px in 8-px patches: 12 x 12 visual tokens"
    with pytest.raises(ValueError, match="image_size is only supported"):
        train(TrainConfig(out=str(tmp_path / "q"), family="qwen_vl", image_size=96), tokenizer_corpus(n_scenes=5))


def test_qwen_examples_keep_token_type_ids_aligned(tmp_path):
    from adapters.qwen_vl import QwenVLAdapter
    from shapes.tiny import build_tiny

    path = build_tiny("qwen_vl", tmp_path / "q", tokenizer_corpus(40))
    qwen = QwenVLAdapter(name="q", path=str(path), device="cpu")
    qwen.load()
    image = Image.fromarray(make_scene(0, "train", 3).image)
    turns = [("Is there a star in the image?", "Yes"), ("Is the star red?", "No")]
    ex = encode(qwen.processor, image, turns)
    assert ex["mm_token_type_ids"].shape == ex["input_ids"].shape
    assert torch.equal(ex["mm_token_type_ids"] == 1, ex["input_ids"] == qwen.image_token_id)
    eval_ids = qwen.build_inputs([qwen.format_prompt(turns[0][0])], [[image]])["input_ids"][0]
    assert torch.equal(ex["input_ids"][: len(eval_ids)], eval_ids), "training tokenises the prompt as eval does"
    batch = collate([ex, encode(qwen.processor, image, turns[:1])], qwen.processor.tokenizer.pad_token_id)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    loss = qwen.model(**batch).loss
    assert torch.isfinite(loss)


def test_answer_token_is_what_the_chat_template_puts_after_the_prompt(llava, tmp_path):
    from adapters.qwen_vl import QwenVLAdapter
    from shapes.tiny import build_tiny

    tok = llava.processor.tokenizer
    assert tok.decode([llava.answer_token_id("Yes")]) == " Yes"
    qwen = QwenVLAdapter(name="q", path=str(build_tiny("qwen_vl", tmp_path / "q", tokenizer_corpus(40))))
    qwen.load()
    assert qwen.processor.tokenizer.decode([qwen.answer_token_id("Yes")]) == "Yes"
    assert qwen.processor.tokenizer.decode([qwen.answer_token_id("No")]) == "No"
