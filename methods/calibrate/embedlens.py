"""Calibrate EmbedLens' marker token ids for a model: ``python -m methods.calibrate embedlens --model llava``.

The published marker ids (ViT-sink 1141, LLM-sink 26673, dead 30296) belong to LLaVA-1.5-7B's vocabulary. For any
other LLaVA-family model the markers are found from three independent reference criteria over calibration images
(fresh shapes-world scenes, or ``--images DIR``), each a property the group's name promises:

* **ViT sink**: the visual token's vision-tower feature (the projector's input) has a massive norm, more than
  ``--norm-ratio`` (3) × the median visual token's;
* **LLM sink**: its LM hidden state entering some layer ≥ 1 has a norm above ``--norm-ratio`` × that layer's
  median visual-token norm (massive activation);
* **dead**: its patch is flat, every channel's pixel standard deviation over the patch (normalised pixel values)
  below ``--flat-std`` (1e-3): it carries no visual information.

A group's marker is the vocabulary id most frequent among its reference tokens' ``top_k`` nearest ids, accepted
when at least ``--min-hit`` (0.5) of the reference tokens hit it and its hit rate is at least ``--min-lift`` (2) ×
its rate among the other tokens (:func:`methods.embedlens_probe.calibrate_markers`); otherwise the group gets no
marker and is never assigned. Writes ``embedlens_markers.json`` beside the checkpoint (or ``--out``).
"""

from __future__ import annotations

import json

import torch

from adapters.base import Adapter
from adapters.generation import model_inputs
from methods.calibrate import parser
from methods.calibrate.debias import QUESTIONS, calibration_images
from methods.embedlens import MARKER_FILE
from methods.embedlens_probe import calibrate_markers, nearest_vocab


def references(adapter: Adapter, inputs: dict[str, torch.Tensor], norm_ratio: float, flat_std: float) -> dict:
    """Reference masks over the batch's visual tokens (LM order) for the three groups."""
    model = adapter.model
    visual = adapter.image_token_mask(inputs)  # [batch, seq]
    feats = adapter.vision_features(inputs)  # [n_images, P, d_vision]
    norms = feats.norm(dim=-1).reshape(-1)  # [n_visual]
    out = model(**model_inputs(inputs), output_hidden_states=True)
    lm = torch.stack([h[visual].norm(dim=-1) for h in out.hidden_states[1:-1]])  # [layers, n_visual]
    pix = inputs["pixel_values"]  # [n_images, 3, S, S]
    p = model.config.vision_config.patch_size
    patches = pix.unfold(2, p, p).unfold(3, p, p)  # [n, 3, rows, cols, p, p]
    spread = patches.flatten(-2).std(-1).amax(1)  # [n, rows, cols]: largest per-channel std over the patch
    flat = spread.reshape(-1)
    return {
        "vit_sink": norms > norm_ratio * norms.median(),
        "llm_sink": (lm > norm_ratio * lm.median(dim=1, keepdim=True).values).any(0),
        "dead": flat < flat_std,
    }


def calibrate(adapter: Adapter, images: list, k: int = 3, norm_ratio: float = 3.0, flat_std: float = 1e-3,
              min_hit: float = 0.5, min_lift: float = 2.0, batch_size: int = 8) -> dict:  # fmt: skip
    """Marker ids and their statistics for a loaded LLaVA-family adapter."""
    if adapter.family != "llava":
        raise ValueError("the dead-token reference reads LLaVA's square patch grid; calibrate a LLaVA-family model")
    if adapter.model.config.vision_feature_select_strategy != "default":
        raise ValueError("calibration expects vision_feature_select_strategy='default' (no [CLS] token)")
    ids, refs = [], {"vit_sink": [], "llm_sink": [], "dead": []}
    table = adapter.site("lm.embed").weight
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            prompts = [adapter.format_prompt(QUESTIONS[(start + i) % len(QUESTIONS)]) for i in range(len(chunk))]
            inputs = adapter.build_inputs(prompts, [[im] for im in chunk])
            ids.append(nearest_vocab(adapter.image_features(inputs), table, k)[0])
            for group, mask in references(adapter, inputs, norm_ratio, flat_std).items():
                refs[group].append(mask)
    top = torch.cat(ids)
    stats = calibrate_markers(top, {g: torch.cat(m) for g, m in refs.items()}, min_hit=min_hit, min_lift=min_lift)
    tok = adapter.processor.tokenizer
    for s in stats.values():
        s["token"] = tok.convert_ids_to_tokens(s["id"]) if s["id"] is not None else None
    return {
        "markers": {g: s["id"] for g, s in stats.items()},
        "stats": stats,
        "criteria": {"top_k": k, "norm_ratio": norm_ratio, "flat_std": flat_std, "min_hit": min_hit,
                     "min_lift": min_lift, "images": len(images), "visual_tokens": int(top.shape[0])},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    import adapters  # noqa: F401  (registers adapters)
    from harness.config import calibration_target

    ap = parser(
        "embedlens", "Calibrate EmbedLens marker token ids", MARKER_FILE, model_help="conf/model option (LLaVA family)"
    )
    ap.add_argument("--images", default=None, help="folder of calibration images (default: fresh shapes scenes)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=3, help="nearest ids per token (use the same as method.top_k)")
    ap.add_argument("--norm-ratio", type=float, default=3.0)
    ap.add_argument("--flat-std", type=float, default=1e-3)
    args = ap.parse_args(argv)
    adapter, out = calibration_target(args.model, args.path, args.out, MARKER_FILE, "markers_file")
    adapter.load()
    images = calibration_images(args.n, args.images, seed=1)
    result = calibrate(adapter, images, k=args.top_k, norm_ratio=args.norm_ratio, flat_std=args.flat_std)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
