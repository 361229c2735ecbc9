"""EmbedLens on a real (tiny) LLaVA: planted projector outputs, dropping, maps, the report, refusals."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from methods.base import UnsupportedError
from methods.calibrate.embedlens import calibrate
from methods.embedlens import EmbedLens
from methods.embedlens_probe import GROUPS, nearest_vocab

GEN = {"max_new_tokens": 3, "do_sample": False}


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture
def planted(llava):
    """The projector's output forced to one vocabulary row (weights restored afterwards)."""
    proj = llava.site("projector").linear_2
    saved = (proj.weight.detach().clone(), proj.bias.detach().clone())

    def plant(token_id: int) -> None:
        with torch.no_grad():
            proj.weight.zero_()
            proj.bias.copy_(llava.site("lm.embed").weight[token_id] * 3.0)  # cosine is scale-free

    yield plant
    with torch.no_grad():
        proj.weight.copy_(saved[0])
        proj.bias.copy_(saved[1])


def _inputs(llava):
    prompts = [llava.format_prompt("Is there a star in the image?"), llava.format_prompt("What?", n_images=2)]
    return llava.build_inputs(prompts, [[_img(1)], [_img(2), _img(3)]])


def test_planted_vocabulary_rows_are_classified_and_dropped(llava, planted, tmp_path):
    """Visual tokens equal to the dead marker's row are all dead; drop mode removes every one of them."""
    planted(17)
    method = EmbedLens(mode="drop", markers={"vit_sink": 40, "llm_sink": 41, "dead": 17})
    method.output_dir = tmp_path
    method.check(llava)
    inputs = _inputs(llava)
    with torch.inference_mode(), method.bind(llava):
        codes = method.categories(inputs)
        out = llava.generate_ids(inputs, **GEN)
        layout = llava._intervention.surgery.layouts[0]
    assert all((c == GROUPS.index("dead")).all() for c in codes)
    assert (layout.valid.sum(1) == (~llava.image_token_mask(inputs) & inputs["attention_mask"].bool()).sum(1)).all()
    assert out.shape == (2, 3)
    report = method.report()
    assert report["images"] == 3 and report["fractions"]["dead"] == 1.0 and report["dropped_fraction"] == 1.0
    maps = sorted((tmp_path / "embedlens" / "maps").glob("*.png"))
    assert len(maps) == 3 and all(cv2.imread(str(p)) is not None for p in maps)


def test_real_categories_match_the_probe_and_report_is_deduplicated(llava, tmp_path):
    """Markers taken from the real projector outputs: categories = the probe's rule; repeated images counted once."""
    inputs = _inputs(llava)
    feats = llava.image_features(inputs)
    ids, _ = nearest_vocab(feats, llava.site("lm.embed").weight, 3)
    dead = int(torch.mode(ids[:, 0]).values)  # the commonest nearest id: a planted "dead" marker
    expected_dead = (ids == dead).any(1)
    method = EmbedLens(mode="probe", markers={"dead": dead})
    method.output_dir = tmp_path
    method.check(llava)
    with torch.inference_mode(), method.bind(llava):
        base = llava.generate_ids(inputs, **GEN)
        codes = torch.cat(method.categories(inputs))
        llava.generate_ids(inputs, **GEN)  # the same images again: no new lines
    assert torch.equal(codes == GROUPS.index("dead"), expected_dead)
    with torch.inference_mode():
        assert torch.equal(base, llava.generate_ids(inputs, **GEN)), "probe mode leaves the model untouched"
    lines = (tmp_path / "embedlens" / "tokens.jsonl").read_text().splitlines()
    assert len(lines) == 3
    report = method.report()
    assert report["fractions"]["dead"] == pytest.approx(float(expected_dead.float().mean()), abs=1e-4)
    assert sum(json.loads(line)["counts"]["dead"] for line in lines) == int(expected_dead.sum())


def test_inject_mode_delays_alive_tokens(llava, tmp_path):
    method = EmbedLens(mode="inject", markers={})
    method.output_dir = tmp_path
    method.check(llava)
    inputs = _inputs(llava)
    with torch.inference_mode(), method.bind(llava):
        llava.generate_ids(inputs, **GEN)
        layouts = llava._intervention.surgery.layouts
    entry = llava.num_layers() // 2
    vis = llava.image_token_mask(inputs)
    assert layouts[0] is not None and not layouts[0].present[vis].any()  # no visual token before entry
    assert layouts[entry].present[vis].all()  # every (alive) visual token from entry on
    assert method.report()["entry_layer"] == entry


def test_markers_missing_fail_before_loading_and_calibration_runs(llava, tmp_path):
    from adapters.llava import LlavaAdapter

    with pytest.raises(UnsupportedError, match=r"python -m methods\.calibrate embedlens"):
        EmbedLens().check(LlavaAdapter(name="x", path=str(tmp_path)))
    with pytest.raises(ValueError, match="droppable"):
        EmbedLens(drop=["alive"])
    result = calibrate(llava, [_img(i) for i in range(4)] + [Image.new("RGB", (64, 64), (9, 9, 9))])
    assert set(result["markers"]) == {"vit_sink", "llm_sink", "dead"}
    assert result["stats"]["dead"]["n_reference"] >= 64, "a blank image's patches are all flat"
