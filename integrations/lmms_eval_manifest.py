"""lmms-eval's entry point for the harness bridge: the model manifest only, cheap to import.

lmms-eval loads every ``lmms_eval.models`` entry point whenever ``lmms_eval.models`` is imported, so this module
imports nothing beyond lmms-eval's (stdlib-only) registry; the model class in
:mod:`integrations.lmms_eval_model` (torch, transformers, the harness) is imported only when ``--model harness``
is resolved.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "harness"
CLASS_PATH = "integrations.lmms_eval_model.HarnessLMM"


def manifest() -> ModelManifest:
    """The ``harness`` model: a simple (not chat) lmms-eval model, :class:`~integrations.lmms_eval_model.HarnessLMM`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
