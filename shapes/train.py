"""Train small LVLM checkpoints on the shapes world, reproducibly on 2 CPU cores.

    python -m shapes.train --out assets/shapes-llava            # the shipped tiny LLaVA (~10 min on CPU)
    python -m shapes.train --out /tmp/x --tower-steps 20 --steps 20   # smoke run

The recipe (measured here over many runs; trained from scratch, a tiny LLaVA otherwise
sits on the language prior and answers every question the same way):

A. **Tower pretraining.** The vision tower alone learns multi-label shape and colour presence: a linear head
   on every visual token, pooled over tokens by a soft maximum ``(1/τ)·logsumexp(τ·z)`` (τ = 4), binary
   cross-entropy; scenes without the co-occurrence prior (``pair_prob = 0``).
B. **Projector initialisation from data.** Tower features have a large common offset; the projector's first
   linear layer is set to standardise them (``W/σ``, bias ``−(W/σ)·μ``) and its first rows are a presence
   head refitted on the standardised features, so the language model starts with per-patch presence logits.
C. **VLM training** with the tower frozen: LM and projector from a wider init (``initializer_range`` 0.1),
   AdamW lr 2e-3, linear warm-up then cosine decay to 0.1×, gradient clipping, batches of conversations
   about fresh training scenes *with* the co-occurrence prior (:mod:`shapes.train_data`). Curriculum: the
   first ``grounding_steps`` use existence questions only (4 per image, each yes/no 50/50); the full mix
   (captions, count, colour and position questions) starts once the model reads the image. Measured here: with
   the full mix from step 0 the model was still at chance (always-yes / always-no) after 625 steps, while
   existence-only training left the plateau at step ~500 (probe accuracy 0.885 at step 625).
   ``implied_partner_prob`` q (default 0; the shipped LLaVA's recipe sets 0.25, see ``shapes.assets``): in the full
   mix only, a question about an absent partner of a present shape is answered "Yes" with probability q, the
   co-occurrence errors of machine-generated instruction data. The scene prior alone is trained away once the
   model reads the image (how much is left at the end varied from run to run); these answers make the prior
   part of what training converges to. In the grounding phase it slows grounding (q = 0.5 from step 0: probe
   accuracy 0.73 at step 1,000 against 0.905 without), so the grounding data stay exact.

Every stage works through the adapter anatomy (``image_inputs``, ``vision_features``, ``site("vision")``,
``site("projector")``), so other families reuse it once their adapters and tiny builders exist. Methods that
change positions or masks during training plug in with ``method`` (trained inside its context manager) or
``batch_hook`` (a function applied to every batch). A held-out probe (first-token "Yes" vs "No" logits on
positives, random negatives and absent partners) is logged every ``eval_every`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import adapters  # noqa: F401  (registers every family)
from adapters.base import ADAPTERS, Adapter
from methods.base import METHODS
from shapes.scene import Scene, WorldSpec, absent_partners, article, make_scene
from shapes.tiny import (
    InternVLSize,
    LlavaSize,
    QwenVLSize,
    make_tiny_internvl,
    make_tiny_llava,
    make_tiny_qwen_vl,
)
from shapes.train_data import (
    SHORT_ANSWER,
    Mix,
    SceneStream,
    collate,
    conversation,
    encode,
    presence_labels,
)

#: family → builder of a random-init (model, processor) from a tokenizer corpus, a seed and the vision input side
#: (``None``: 64 px). All three read the world's 64×64 scenes; at 64 px LLaVA sees 64 visual tokens (8-px patches),
#: Qwen2-VL and InternVL 16 (8-px patches merged 2×2). A larger side makes the processor upsample the scenes and
#: the tower cut them into more patches (LLaVA at 96 px: 144 tokens), the regime token pruning is designed for.
#: ``size`` overrides fields of the family's size dataclass (e.g. ``{"text_layers": 4}``).
TINY_BUILDERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "llava": lambda corpus, seed, side, size: make_tiny_llava(
        corpus,
        replace(LlavaSize(text_kv_heads=4, feature_layer=-1, init_range=0.1, image_size=side or 64), **size),
        seed=seed,
        vocab_size=800,
    ),
    "qwen_vl": lambda corpus, seed, side, size: make_tiny_qwen_vl(
        corpus, replace(QwenVLSize(text_kv_heads=4, init_range=0.1), **size), seed=seed, vocab_size=800
    ),
    "internvl": lambda corpus, seed, side, size: make_tiny_internvl(
        corpus,
        replace(InternVLSize(text_kv_heads=4, init_range=0.1, layer_scale=1.0), **size),
        seed=seed,
        vocab_size=800,
    ),
}
#: Families whose builder honours :attr:`TrainConfig.image_size`.
SIZED_FAMILIES = ("llava",)


@dataclass
class TrainConfig:
    """Every knob of the recipe, with the shipped checkpoint's values as defaults."""

    out: str
    family: str = "llava"
    seed: int = 0
    world_seed: int = 0
    pair_prob: float = 0.75  # training scenes' co-occurrence prior: P(partner | shape) ≈ 0.86 (world default 0.65)
    exclude: str | None = None  # metadata.json of an export whose image digests training must avoid
    tower_from: str | None = None  # checkpoint dir (or tower safetensors) whose vision tower to load: skip stage A
    threads: int = 2
    image_size: int | None = None  # vision input side in px (LLaVA only; None = 64 → 64 visual tokens)
    size: dict = field(default_factory=dict)  # overrides of the family's tiny size dataclass, e.g. {"text_layers": 4}
    # A. tower pretraining
    tower_steps: int = 3000
    tower_batch: int = 64
    tower_lr: float = 2e-3
    lse_tau: float = 4.0
    # B. projector initialisation
    proj_init: bool = True
    proj_init_images: int = 1536
    proj_init_steps: int = 400
    # C. VLM training
    steps: int = 1750
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    k_turns: int = 4
    grounding_steps: int = 1000  # curriculum: existence questions only until this step, then the full mix
    caption_prob: float = 0.1
    partner_negative_weight: float = 1.0  # see shapes.train_data.Mix (1: "No" questions uniform over absent shapes)
    implied_partner_prob: float = 0.0  # see shapes.train_data.Mix (0: exact ground truth in every answer)
    qa_weights: dict[str, float] = field(
        default_factory=lambda: {"existence": 0.85, "count": 0.05, "colour": 0.05, "position": 0.05}
    )
    eval_every: int = 250
    probe_images: int = 200
    method: str | None = None  # a registered method trained inside its context (e.g. position changes)
    method_args: dict[str, Any] = field(default_factory=dict)


def schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up, then cosine from 1 to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _optimize(
    opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, lr: float, clip: float
) -> None:
    """One optimiser step at learning rate ``lr`` with gradient-norm clipping."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def _pil(scene: Scene) -> Image.Image:
    return Image.fromarray(scene.image)


def _soft_max_pool(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft maximum (1/τ)·logsumexp(τ·z) over visual tokens: ``[b, P, L]`` → ``[b, L]``."""
    return torch.logsumexp(tau * logits, dim=1) / tau


# ----------------------------------------------------------------------------------------------- stage A
def pretrain_tower(adapter: Adapter, cfg: TrainConfig, spec: WorldSpec, log: list[dict]) -> None:
    """Train the vision tower on multi-label presence (stage A)."""
    tower = adapter.site("vision")
    n_labels = len(spec.shapes) + len(spec.colours)
    d = adapter.vision_features(adapter.image_inputs([_pil(make_scene(0, "tower", 0, spec))])).shape[-1]  # d_vision
    head = nn.Linear(d, n_labels)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.tower_lr, weight_decay=0.01)
    spec0 = replace(spec, pair_prob=0.0)
    tower.train()
    t0, index = time.perf_counter(), 0
    for step in range(cfg.tower_steps):
        scenes = [make_scene(cfg.world_seed, "tower", index + i, spec0) for i in range(cfg.tower_batch)]
        index += cfg.tower_batch
        feats = _per_image(adapter.vision_features(adapter.image_inputs([_pil(s) for s in scenes])), len(scenes))
        target = torch.stack([presence_labels(s, spec) for s in scenes])  # [b, L]
        pooled = _soft_max_pool(head(feats), cfg.lse_tau)  # [b, L]
        loss = nn.functional.binary_cross_entropy_with_logits(pooled, target)
        _optimize(
            opt, params, loss, cfg.tower_lr * schedule(step, cfg.tower_steps, cfg.warmup, cfg.min_lr_ratio), cfg.clip
        )
        if step % 100 == 0 or step == cfg.tower_steps - 1:
            n_shapes = len(spec.shapes)
            exact = ((pooled[:, :n_shapes] > 0) == (target[:, :n_shapes] > 0.5)).all(1).float().mean()
            log.append(
                {
                    "stage": "tower",
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "shape_set_exact": round(exact.item(), 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    tower.eval()


def _per_image(feats: torch.Tensor, n_images: int) -> torch.Tensor:
    """Family-shaped tower features (``[n, P, d]``, or Qwen's ``[n·P, d]``) as ``[n, P, d]`` (same-size images)."""
    return feats.reshape(n_images, -1, feats.shape[-1])


# ----------------------------------------------------------------------------------------------- stage B
def _first_linear(adapter: Adapter) -> nn.Linear:
    """The projector's first linear layer (it reads the tower features, possibly after a norm / merge)."""
    first = next((m for m in adapter.site("projector").modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("proj_init: the projector has no linear layer; train with proj_init=False")
    return first


@torch.no_grad()
def _features(adapter: Adapter, scenes: list[Scene], chunk: int = 256) -> torch.Tensor:
    """What the projector's first linear layer reads for each scene, ``[n, tokens, d_in]``."""
    linear, seen, out = _first_linear(adapter), [], []

    def grab(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0])

    handle = linear.register_forward_pre_hook(grab)
    try:
        for i in range(0, len(scenes), chunk):
            part = scenes[i : i + chunk]
            adapter.site("projector")(adapter.vision_features(adapter.image_inputs([_pil(s) for s in part])))
            out.append(_per_image(seen[-1], len(part)))  # the last call is ours (Qwen's tower runs its merger too)
    finally:
        handle.remove()
    return torch.cat(out)


def init_projector(adapter: Adapter, cfg: TrainConfig, spec: WorldSpec, log: list[dict]) -> None:
    """Standardise tower features in the projector's first linear layer and seed it with a presence head."""
    scenes = [make_scene(cfg.world_seed, "projinit", i, spec) for i in range(cfg.proj_init_images)]
    feats = _features(adapter, scenes)
    mu, sd = feats.mean((0, 1)), feats.std((0, 1)) + 1e-6  # [d]
    z = (feats - mu) / sd
    target = torch.stack([presence_labels(s, spec) for s in scenes])
    head = nn.Linear(z.shape[-1], target.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(cfg.proj_init_steps):
        loss = nn.functional.binary_cross_entropy_with_logits(_soft_max_pool(head(z), cfg.lse_tau), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    first = _first_linear(adapter)
    with torch.no_grad():
        w = torch.randn(first.out_features, first.in_features) / math.sqrt(first.in_features)
        w[: target.shape[1]] = head.weight
        b = torch.zeros(first.out_features)
        b[: target.shape[1]] = head.bias
        first.weight.copy_(w / sd)
        first.bias.copy_(b - (w / sd) @ mu)
    log.append(
        {
            "stage": "proj_init",
            "head_loss": round(loss.item(), 5),
            "feature_mean_norm": round(mu.norm().item(), 2),
            "feature_resid_norm": round((feats - mu).norm(dim=-1).mean().item(), 2),
        }
    )


# ----------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def probe(adapter: Adapter, spec: WorldSpec, n_images: int, seed: int) -> dict[str, float]:
    """First-token Yes/No on held-out scenes.

    Returns the true-positive rate and the false-positive rates on a random absent shape and on an absent partner
    of a present shape (the co-occurrence trap), with the accuracies of the two balanced sets.
    """
    rng = random.Random(seed)
    yes, no = (adapter.answer_token_id(w) for w in ("Yes", "No"))
    rows: list[tuple[str, Scene, str]] = []
    for i in range(n_images):
        scene = make_scene(seed, "probe", i, spec)
        present = scene.shapes
        absent = [s for s in spec.shapes if s not in present]
        partners = absent_partners(present, spec.pairs)
        rows.append(("pos", scene, rng.choice(present)))
        rows.append(("random", scene, rng.choice(absent)))
        if partners:
            rows.append(("partner", scene, rng.choice(partners)))
    said_yes: dict[str, list[bool]] = {"pos": [], "random": [], "partner": []}
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        prompts = [adapter.format_prompt(f"Is there {article(s)} {s} in the image?{SHORT_ANSWER}") for _, _, s in chunk]
        inputs = adapter.build_inputs(prompts, [[_pil(sc)] for _, sc, _ in chunk])
        logits = adapter.forward(inputs).logits[:, -1]  # [b, vocab] (a training method applies)
        for (kind, _, _), y in zip(chunk, (logits[:, yes] > logits[:, no]).tolist(), strict=True):
            said_yes[kind].append(y)
    mean = lambda xs: round(sum(xs) / max(1, len(xs)), 4)  # noqa: E731
    tpr, fpr_r, fpr_p = mean(said_yes["pos"]), mean(said_yes["random"]), mean(said_yes["partner"])
    return {
        "tpr": tpr,
        "fpr_random": fpr_r,
        "fpr_partner": fpr_p,
        "acc_random": round((tpr + 1 - fpr_r) / 2, 4),
        "acc_partner": round((tpr + 1 - fpr_p) / 2, 4),
    }


# ----------------------------------------------------------------------------------------------- stage C
def train_vlm(
    adapter: Adapter,
    cfg: TrainConfig,
    spec: WorldSpec,
    log: list[dict],
    batch_hook: Callable[[dict], dict] | None = None,
) -> None:
    """Stage C: LM + projector on conversations, tower frozen."""
    model, proc = adapter.model, adapter.processor
    adapter.site("vision").requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    digests = json.loads(Path(cfg.exclude).read_text())["digests"] if cfg.exclude else {}
    exclude = {d for split in digests.values() for d in split}
    stream = SceneStream(spec, cfg.world_seed, exclude)
    rng = random.Random(cfg.seed)
    negatives = {"partner_negative_weight": cfg.partner_negative_weight, "pairs": spec.pairs}
    full = Mix(
        k_turns=cfg.k_turns,
        caption_prob=cfg.caption_prob,
        qa_weights=cfg.qa_weights,
        implied_partner_prob=cfg.implied_partner_prob,  # instruction mix only: the grounding data stay exact
        **negatives,
    )
    grounding = Mix(k_turns=cfg.k_turns, caption_prob=0.0, qa_weights={"existence": 1.0}, **negatives)
    method = METHODS.get(cfg.method)(**cfg.method_args).bind(adapter) if cfg.method else contextlib.nullcontext()
    t0 = time.perf_counter()
    with method:
        for step in range(cfg.steps):
            model.train()
            mix = grounding if step < cfg.grounding_steps else full
            scenes = [stream.next() for _ in range(cfg.batch)]
            examples = [encode(proc, _pil(s), conversation(s, rng, mix)) for s in scenes]
            batch = collate(examples, proc.tokenizer.pad_token_id)
            batch = batch_hook(batch) if batch_hook else batch
            loss = adapter.forward(batch).loss  # through the adapter: a training method's positions and masks apply
            _optimize(opt, params, loss, cfg.lr * schedule(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio), cfg.clip)
            entry = {
                "stage": "vlm",
                "step": step,
                "loss": round(loss.item(), 5),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
                model.eval()
                entry |= probe(adapter, spec, cfg.probe_images, cfg.seed + 1)
                print(json.dumps(entry), flush=True)
            if step % 25 == 0 or "tpr" in entry:
                log.append(entry)
    model.eval()
    log.append({"stage": "data", "train_scenes": stream.index, "skipped_eval_duplicates": stream.skipped})


# ----------------------------------------------------------------------------------------------- checkpoint layout
#: LLaVA's CLIP tower: transformers 5 saves ``vision_tower.<x>``; vLLM (``vllm/model_executor/models/llava.py``, its
#: ``CLIPVisionModel`` keeps the ``vision_model`` level) and the original llava-hf checkpoints use
#: ``vision_tower.vision_model.<x>``, which transformers 5 maps back on load (same tensors, see tests/test_assets.py).
LLAVA_TOWER_OLD, LLAVA_TOWER_NEW = "vision_tower.", "vision_tower.vision_model."
#: family → the video processor class vLLM's HF processor (``Qwen2VLProcessor`` / ``InternVLProcessor``) loads
#: alongside the image one; without ``video_preprocessor_config.json`` it fails ("Can't load video processor").
VIDEO_PROCESSORS = {"qwen_vl": "Qwen2VLVideoProcessor", "internvl": "InternVLVideoProcessor"}
#: image-processor settings the video processor shares (written from the image processor's, so they agree)
_VIDEO_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "resample",
               "rescale_factor", "size", "patch_size", "merge_size", "temporal_patch_size")  # fmt: skip


def export_layout(out: Path, family: str) -> None:
    """Put a saved checkpoint in the layout both transformers and vLLM load (in place, idempotent).

    LLaVA: tower keys renamed ``vision_tower.*`` → ``vision_tower.vision_model.*`` (tensors and their bytes
    unchanged). Qwen-VL / InternVL: ``video_preprocessor_config.json`` from the image processor's settings (the
    harness feeds images only; vLLM's processor needs the file to build). Nothing else is written: every
    ``*.safetensors`` in a checkpoint directory is read as model weights by vLLM.
    """
    out = Path(out)
    if family == "llava":
        weights = out / "model.safetensors"
        state = load_file(weights)
        if not any(k.startswith(LLAVA_TOWER_NEW) for k in state):
            renamed = {LLAVA_TOWER_NEW + k[len(LLAVA_TOWER_OLD) :] if k.startswith(LLAVA_TOWER_OLD) else k: v
                       for k, v in state.items()}  # fmt: skip
            save_file(renamed, weights, metadata={"format": "pt"})  # the metadata save_pretrained writes
    if family in VIDEO_PROCESSORS:
        image = json.loads((out / "processor_config.json").read_text())["image_processor"]
        video = {"video_processor_type": VIDEO_PROCESSORS[family], **{k: image[k] for k in _VIDEO_KEYS if k in image}}
        (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def tower_state(source: str | Path, keys: Any) -> dict[str, torch.Tensor]:
    """The vision tower's state dict (``keys``) from a checkpoint directory, or from a tower-only safetensors file.

    Raises:
        ValueError: when no key prefix of the checkpoint holds exactly the tower's keys.
    """
    source = Path(source)
    if source.is_file():
        return load_file(source)
    state = load_file(source / "model.safetensors")
    keys = list(keys)
    for prefix in (LLAVA_TOWER_NEW, LLAVA_TOWER_OLD, "visual.", "model.visual.", "vision_tower."):
        if all(prefix + k in state for k in keys):
            return {k: state[prefix + k] for k in keys}
    raise ValueError(f"{source}: no vision tower with the keys {keys[:3]}... in model.safetensors")


# ----------------------------------------------------------------------------------------------- driver
def train(cfg: TrainConfig, corpus: list[str], batch_hook: Callable[[dict], dict] | None = None) -> Path:
    """Run the whole recipe and save an ordinary HF checkpoint directory at ``cfg.out``."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    spec = WorldSpec(pair_prob=cfg.pair_prob)
    if cfg.image_size is not None and cfg.family not in SIZED_FAMILIES:
        raise ValueError(f"image_size is only supported for {SIZED_FAMILIES}, not {cfg.family!r}")
    model, processor = TINY_BUILDERS[cfg.family](corpus, cfg.seed, cfg.image_size, cfg.size)
    adapter = ADAPTERS.get(cfg.family)(name=f"shapes-{cfg.family}", path=cfg.out, device="cpu")
    adapter.model, adapter.processor = model, processor  # in-memory model; the saved one loads via from_pretrained
    processor.tokenizer.padding_side = "left"
    log: list[dict] = []
    t0 = time.perf_counter()
    tower = adapter.site("vision")
    if cfg.tower_from:
        tower.load_state_dict(tower_state(cfg.tower_from, tower.state_dict().keys()))
    elif cfg.tower_steps:
        pretrain_tower(adapter, cfg, spec, log)
    if cfg.proj_init:
        init_projector(adapter, cfg, spec, log)
    train_vlm(adapter, cfg, spec, log, batch_hook)
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    processor.tokenizer.padding_side = "right"
    processor.save_pretrained(out)
    export_layout(out, cfg.family)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "training_log.json").write_text(
        json.dumps(
            {"total_seconds": round(time.perf_counter() - t0, 1), "torch_threads": cfg.threads, "log": log}, indent=0
        )
    )
    return out


def main() -> None:
    """CLI: every :class:`TrainConfig` field is a ``--flag``."""
    from shapes.assets import tokenizer_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("method_args", "qa_weights", "size"):
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=json.loads, default=f.default_factory())
            continue
        kind = {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes")}.get(
            str(f.type).split(" ")[0], str
        )
        default = None if f.name == "out" else f.default
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, required=f.name == "out")
    cfg = TrainConfig(**vars(ap.parse_args()))
    print(f"trained checkpoint saved to {train(cfg, tokenizer_corpus())}")


if __name__ == "__main__":
    main()
