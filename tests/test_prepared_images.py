"""Image-processor outputs prepared ahead (on the prefetch thread) are served to the processor unchanged.

Every family's processor must build exactly the inputs it builds in line (same tensors, same token expansion) from
per-image outputs prepared ahead, for a padded batch of differently sized images (InternVL: several tiles); the
engine must run the image processor on the worker thread; a processor whose batch is not its per-image outputs
joined must be caught and answered in line.
"""

from __future__ import annotations

import gc
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.prepared_images import PreparedImages, preparing
from harness.calls import AdapterCalls
from harness.engine import RunSettings, evaluate
from methods.none import NoMethod

FAMILIES = ("llava", "qwen_vl", "qwen2_5_vl", "internvl")


@pytest.fixture(scope="module")
def loaded(four_layer):
    """``loaded(key)``: the 4-layer random model of ``key`` (conftest), one per family and module."""
    return four_layer(seed=2)


def _batch(adapter):
    """Three prompts and images of three sizes (a wide one: several tiles on InternVL), so rows pad."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (128, 64) if adapter.family != "llava" else (96, 64), (64, 48)]
    texts = ["Is there a star?", "Is there a big red star in the middle of the image?", "Describe it."]
    images = [[Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))] for w, h in sizes]
    return [adapter.format_prompt(t) for t in texts], images


def _same_inputs(a, b):
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert tensors and set(tensors) == {k for k, v in b.items() if isinstance(v, torch.Tensor)}
    return all(torch.equal(a[k], b[k]) for k in tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_outputs_build_the_in_line_inputs(family, loaded):
    adapter = loaded(family)
    prompts, images = _batch(adapter)
    in_line = adapter.build_inputs(prompts, images)
    with preparing(adapter.processor) as stand_in:
        adapter.build_inputs(prompts, images)  # the processor's first call: its keyword arguments are recorded
        stand_in.prepare([im for row in images for im in row])
        served = adapter.build_inputs(prompts, images)
        assert stand_in.served == 1 and stand_in.disabled is None
        assert _same_inputs(served, in_line)
        again = adapter.build_inputs(prompts, images)  # verified once: served without the real batched call
        assert stand_in.served == 2 and _same_inputs(again, in_line)
    assert not isinstance(adapter.processor.image_processor, PreparedImages)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_not_prepared_gets_its_own_output(family, loaded):
    adapter = loaded(family)
    prompts, images = _batch(adapter)
    with preparing(adapter.processor) as stand_in:
        adapter.build_inputs(prompts, images)
        stand_in.prepare([im for row in images for im in row])
        copy = images[1][0].copy()  # a method's copy: another object, never matched to the original's output
        other = [[images[0][0]], [copy], [images[2][0]]]
        assert _same_inputs(adapter.build_inputs(prompts, other), adapter.build_inputs(prompts, images))
        assert stand_in.served == 2 and stand_in._lookup(copy) is not stand_in._lookup(images[1][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_images_nobody_prepared_are_processed_one_per_host_thread(family, loaded):
    """A method's new images (CARVE's refined ones) reach the processor unprepared: each is processed on a host
    thread and the outputs joined, which equals the in-line batched call."""
    adapter = loaded(family)
    prompts, images = _batch(adapter)
    in_line = adapter.build_inputs(prompts, images)
    real = adapter.processor.image_processor
    threads = _Threads(real)
    adapter.processor.image_processor = threads
    try:
        with preparing(adapter.processor) as stand_in:
            adapter.build_inputs(prompts, images)  # the first call: its keyword arguments are recorded
            threads.calls.clear()
            new = [[im.copy()] for row in images for im in row]
            assert _same_inputs(adapter.build_inputs(prompts, new), in_line) and stand_in.served == 1
    finally:
        adapter.processor.image_processor = real
    per_image = [(name, n) for name, n in threads.calls if n == 1]
    assert len(per_image) == 3 and all(name.startswith("harness-host") for name, _ in per_image)


def test_prepared_outputs_go_with_their_images(loaded):
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    with preparing(adapter.processor) as stand_in:
        adapter.build_inputs(prompts, images)
        stand_in.prepare([im for row in images for im in row])
        assert len(stand_in._outputs) == 3
        stand_in.prepare([])
        assert len(stand_in._outputs) == 3  # their images are alive
        del images, prompts
        gc.collect()
        stand_in.prepare([])
        assert not stand_in._outputs


def test_a_setting_changed_meanwhile_reaches_the_real_processor_and_drops_what_was_prepared(loaded):
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    real = adapter.processor.image_processor
    was = real.do_normalize
    try:
        with preparing(adapter.processor) as stand_in:
            adapter.build_inputs(prompts, images)
            stand_in.prepare([im for row in images for im in row])
            adapter.processor.image_processor.do_normalize = not was
            assert real.do_normalize is (not was) and not stand_in._outputs
            changed = adapter.build_inputs(prompts, images)
            assert stand_in.served == 1  # processed anew per image, under the new setting (compared below)
        assert _same_inputs(changed, adapter.build_inputs(prompts, images))
    finally:
        real.do_normalize = was


class _ChangesASetting:
    """An image processor during whose per-image call a setting is changed (as another thread could)."""

    def __init__(self, real, processor):
        self.real, self.processor = real, processor

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, images, **kwargs):
        if len(images) == 1:  # the worker's per-image call
            self.processor.image_processor.do_normalize = self.real.do_normalize
        return self.real(images, **kwargs)


def test_an_output_computed_across_a_setting_change_is_not_kept(loaded):
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    real = adapter.processor.image_processor
    adapter.processor.image_processor = _ChangesASetting(real, adapter.processor)
    try:
        with preparing(adapter.processor) as stand_in:
            adapter.build_inputs(prompts, images)
            stand_in.prepare([im for row in images for im in row])
            assert not stand_in._outputs
    finally:
        adapter.processor.image_processor = real


class _BatchDependent:
    """An image processor whose output for an image depends on the rest of the batch (as padding would)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, images, **kwargs):
        out = self.real(images, **kwargs)
        out["pixel_values"] = out["pixel_values"] + len(images)
        return out


def test_a_batch_that_is_not_the_join_of_its_images_is_caught(loaded, caplog):
    adapter = loaded("llava")
    prompts, images = _batch(adapter)
    real = adapter.processor.image_processor
    adapter.processor.image_processor = _BatchDependent(real)
    try:
        in_line = adapter.build_inputs(prompts, images)
        with preparing(adapter.processor) as stand_in:
            adapter.build_inputs(prompts, images)
            stand_in.prepare([im for row in images for im in row])
            with caplog.at_level("WARNING"):
                got = adapter.build_inputs(prompts, images)
            assert stand_in.disabled and stand_in.served == 0 and "processed in line" in caplog.text
            assert _same_inputs(got, in_line)
            stand_in.prepare([im for row in images for im in row])  # no longer prepares anything
            assert _same_inputs(adapter.build_inputs(prompts, images), in_line) and stand_in.served == 0
    finally:
        adapter.processor.image_processor = real


class _Threads:
    """Records on which thread, and with how many images, the real image processor ran."""

    def __init__(self, real):
        self.real = real
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, images, **kwargs):
        self.calls.append((threading.current_thread().name, len(images)))
        return self.real(images, **kwargs)


def test_the_engine_runs_the_image_processor_on_the_worker(llava, pope_dir, tmp_path, make_task):
    recs = {}
    threads = _Threads(llava.processor.image_processor)
    llava.processor.image_processor = threads
    try:
        for p in (0, 1):
            settings = RunSettings(output_dir=tmp_path / f"p{p}", config_hash="h", progress=False, report=False,
                                   batch_size=3, prefetch=p)  # fmt: skip
            evaluate(make_task(pope_dir, limit=6), llava, NoMethod(), settings)
            lines = (tmp_path / f"p{p}" / "samples_pope.jsonl").read_text().splitlines()
            recs[p] = [{k: v for k, v in json.loads(x).items() if k != "wall_s"} for x in lines]
            if p == 0:
                assert {t for t, _ in threads.calls} == {threading.main_thread().name}
                threads.calls.clear()
    finally:
        llava.processor.image_processor = threads.real
    assert recs[1] == recs[0]
    main = [n for t, n in threads.calls if t == threading.main_thread().name]
    # the worker's prepare and the unprepared batch 1 run one image per call, on the prefetch or host threads
    worker = [n for t, n in threads.calls if t.startswith(("harness-media", "harness-host"))]
    n_batches = len(recs[1]) // 3
    assert len(worker) >= 3 * (n_batches - 1) and set(worker) == {1}  # batches 1.. at least
    assert len(main) <= 2  # batch 0 (before the arguments were known) and the one verification
    assert AdapterCalls(llava, 3).prefetching  # the engine's hook


@pytest.mark.parametrize("family", FAMILIES)
def test_the_results_name_the_real_image_processor_and_its_backend(family, loaded):
    """transformers picks the torchvision backend where torchvision imports, else PIL: the results file says which,
    also while the stand-in is installed."""
    adapter = loaded(family)
    plain = adapter.describe()["image_processor"]
    assert plain["backend"] in ("pil", "torchvision") and plain["class"].endswith("Pil") == (plain["backend"] == "pil")
    with preparing(adapter.processor) as stand_in:
        assert adapter.processor.image_processor is stand_in
        assert adapter.describe()["image_processor"] == plain


def test_the_backend_check_fails_on_the_other_backend():
    """``make test-torchvision`` starts with this check, so its tests cannot pass on the PIL path by accident."""
    from checks.image_backend import backends, main

    used = {info["backend"] for info in backends().values()}
    assert len(used) == 1 and used <= {"pil", "torchvision"}, used
    (backend,) = used
    assert main(["--expect", backend]) == 0
    assert main(["--expect", "pil" if backend == "torchvision" else "torchvision"]) == 1
