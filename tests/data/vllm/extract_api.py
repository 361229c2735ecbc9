"""Read the keyword names the vLLM backend relies on out of an unpacked vLLM wheel (static: vLLM is not imported).

Usage (writes one entry of ``api.json``)::

    pip download vllm==0.33.0 --no-deps -d /tmp/w && unzip -q /tmp/w/vllm-*.whl 'vllm/*' -d /tmp/w/src
    python tests/data/vllm/extract_api.py /tmp/w/src

The names are parsed with :mod:`ast` from the files listed in ``FILES``: the explicit parameters of ``LLM.__init__``
plus the ``EngineArgs`` fields its ``**kwargs`` go to, the ``SamplingParams`` struct fields, the keyword parameters
of ``LLM.generate``, the keys of a text prompt and of its ``multi_modal_data``, and the fields of ``RequestOutput``,
``CompletionOutput`` and ``Logprob``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

#: what is read → (file candidates in the wheel, newest layout first, class name, "fields" | method name)
FILES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "llm_init": (("vllm/entrypoints/llm.py",), "LLM", "__init__"),
    "engine_args": (("vllm/engine/arg_utils.py",), "EngineArgs", "fields"),
    "llm_generate": (("vllm/entrypoints/llm.py",), "LLM", "generate"),
    "sampling_params": (("vllm/sampling_params.py",), "SamplingParams", "fields"),
    "text_prompt": (("vllm/inputs/llm.py", "vllm/inputs/data.py"), "TextPrompt", "fields"),
    "prompt_options": (("vllm/inputs/llm.py",), "_PromptOptions", "fields"),
    "multi_modal_data": (("vllm/inputs/llm.py", "vllm/multimodal/inputs.py"), "MultiModalDataBuiltins", "fields"),
    "request_output": (("vllm/outputs.py",), "RequestOutput", "__init__"),
    "completion_output": (("vllm/outputs.py",), "CompletionOutput", "fields"),
    "logprob": (("vllm/logprobs.py", "vllm/sequence.py"), "Logprob", "fields"),
}


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _names(cls: ast.ClassDef, what: str) -> list[str]:
    if what == "fields":  # annotated class attributes, private ones (set in __post_init__) left out
        return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                and not n.target.id.startswith("_")]  # fmt: skip
    defs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == what]
    args = defs[-1].args  # the implementation comes after any @overload stubs
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg != "self"]


def extract(root: Path) -> dict:
    """The name lists of the vLLM source tree ``root`` (the directory holding ``vllm/``)."""
    version = re.search(r"__version__ = version = '([^']+)'", (root / "vllm/_version.py").read_text()).group(1)
    commit = re.search(r"commit_id = '([^']+)'", (root / "vllm/_version.py").read_text()).group(1)
    out: dict = {"version": version, "commit": commit.removeprefix("g"), "sources": {}, "names": {}}
    for key, (paths, cls_name, what) in FILES.items():
        for path in paths:
            if (root / path).is_file() and (cls := _class(ast.parse((root / path).read_text()), cls_name)):
                out["sources"][key] = f"{path}::{cls_name}.{what}"
                out["names"][key] = _names(cls, what)
                break
    return out


if __name__ == "__main__":
    print(json.dumps(extract(Path(sys.argv[1])), indent=1))
