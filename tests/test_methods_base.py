"""Method base: binding, hook removal on exit (also on error), compatibility check before load."""

from __future__ import annotations

from typing import ClassVar

import pytest
from PIL import Image

from adapters.base import model_inputs
from adapters.llava import LlavaAdapter
from methods.base import METHODS, Method, UnsupportedError


class _CountingMethod(Method):
    name: ClassVar[str] = "counting"

    def install(self) -> None:
        self.calls = 0

        def hook(module, args):
            self.calls += 1

        self.add_hook(self.adapter.site("lm.layers.0").register_forward_pre_hook(hook))
        self.enter_context(self.adapter.lm_attention("eager"))


class _OnlyQwen(Method):
    name: ClassVar[str] = "only_qwen"
    families: ClassVar[tuple[str, ...]] = ("qwen2_vl",)


def _n_hooks(adapter):
    return len(adapter.site("lm.layers.0")._forward_pre_hooks)


def test_hooks_installed_inside_and_removed_after(llava):
    m = _CountingMethod()
    before = _n_hooks(llava)
    with m.bind(llava):
        assert _n_hooks(llava) == before + 1
        assert llava.model.config.get_text_config()._attn_implementation == "eager"
        inputs = llava.build_inputs([llava.format_prompt("hi")], [[Image.new("RGB", (64, 64))]])
        llava.model(**model_inputs(inputs))
        assert m.calls == 1
    assert _n_hooks(llava) == before
    assert llava.model.config.get_text_config()._attn_implementation == "sdpa"


def test_hooks_removed_on_error(llava):
    before = _n_hooks(llava)
    with pytest.raises(ZeroDivisionError), _CountingMethod().bind(llava):
        1 / 0  # noqa: B018
    assert _n_hooks(llava) == before


def test_unresolvable_site_raises_and_leaves_nothing_behind(llava):
    class Bad(Method):
        name: ClassVar[str] = "bad"

        def install(self):
            self.add_hook(self.adapter.site("lm.layers.0").register_forward_pre_hook(lambda m, a: None))
            self.adapter.site("lm.layers.99.attn")

    before = _n_hooks(llava)
    with pytest.raises(LookupError, match=r"lm\.layers\.99"), Bad().bind(llava):
        pass
    assert _n_hooks(llava) == before


def test_unsupported_family_fails_before_load(tiny_llava_dir):
    adapter = LlavaAdapter(name="llava", path=str(tiny_llava_dir))
    with pytest.raises(UnsupportedError, match="supports: qwen2_vl"):
        _OnlyQwen().check(adapter)
    assert adapter.model is None


def test_registry_did_you_mean():
    import methods  # noqa: F401

    assert METHODS.get("none").name == "none"
    with pytest.raises(KeyError, match="did you mean 'none'"):
        METHODS.get("nome")
