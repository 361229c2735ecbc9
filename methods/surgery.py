r"""Sequence surgery: prompt tokens leaving or entering the LM's sequence between decoder layers.

Site ``lm.layers.{l}.tokens``: which prompt tokens are present in the sequence entering decoder layer ``l``.
Token pruning (FastV, FasterVLM, EmbedLens) and late entry (EmbedLens' mid-layer injection) are all one
operation here: a per-layer *presence* mask over the prompt, ``[batch, prompt_len]``. Wherever presence differs
from "every unpadded token", the layer runs on a compacted *layout*: the present tokens in their original order,
each row left-padded to the batch's longest row, so rows keeping different numbers of tokens batch together.

What a layer under a layout receives (forward pre-hook on the decoder layer, no forked modeling code):

* hidden states gathered into the layout (a token that was absent from the previous layer's layout but is present
  now is filled with its LM input embedding, i.e. the raw projector output for a visual token);
* position embeddings (RoPE cos/sin, ``[batch, seq, head_dim]``, M-RoPE already folded in) gathered from the full
  prompt's, so a kept token keeps the position it had in the unpruned prompt, unless the method renumbered the
  prompt before the call (``renumber=True``: positions contiguous over the tokens present at layer 0);
* a boolean mask ``[batch, 1, q, k]``: causal over the layout, padding slots masked (a padding query row sees
  only itself, so no row is empty).

KV cache: each layer caches exactly the tokens of its layout, so per-layer cache lengths differ (a
``DynamicCache`` keeps them apart). In cached decoding a new token's mask at a layer is the layout's padding
mask followed by every generated key. Its position continues from the UNPRUNED prompt length (or from the
renumbered one): whenever layer 0 already runs on a layout, whose cache length no longer tells the prompt length,
the prompt's position ids are passed explicitly and ``generate`` continues at each row's last position + 1.

Selections are made once per prompt, in prefill (the official FastV KV-cache implementation's static subset);
every decoded token sees the same subset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.hf_compat import layer_cache

#: ``fn(inputs) -> keep [batch, prompt_len] bool``: decided from the prompt tensors before the model call
InputSelect = Callable[[dict[str, torch.Tensor]], torch.Tensor]
#: ``fn(batch) -> keep [batch, prompt_len] bool``: decided in prefill when the layer is reached
LayerSelect = Callable[[Any], torch.Tensor]


@dataclass
class Layout:
    """Present tokens of each row, compacted and left-padded.

    Attributes:
        present: Presence over the full prompt ``[batch, prompt_len]``.
        index: Full-prompt position of each slot ``[batch, n]`` (padding slots: 0).
        valid: Slot holds a token ``[batch, n]``.
        full: Every slot holds a token (no row is padded): the masks are plain causal and left to SDPA's causal
            kernel (``None``), as the unmodified model's are when no row is padded.
    """

    present: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    full: bool = False

    @classmethod
    def of(cls, present: torch.Tensor) -> Layout:
        """Compact ``present [batch, prompt_len]`` into left-padded slots."""
        counts = present.sum(1)  # [batch]
        n, least = torch.stack([counts.max(), counts.min()]).tolist()  # the one host sync: width, and any padding
        slot = torch.arange(n, device=present.device)[None, :]  # [1, n]
        valid = slot >= (n - counts)[:, None]  # [batch, n]
        # a stable sort puts each row's absent positions first and its present ones last, both in order: the
        # last n columns are the row's present tokens right-aligned (no nonzero / boolean indexing: no sync)
        order = torch.sort(present.to(torch.uint8), dim=1, stable=True).indices[:, -n:]  # [batch, n]
        index = torch.where(valid, order, torch.zeros_like(order))
        return cls(present, index, valid, full=least == n)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Take the layout's slots from a full-prompt tensor ``[batch, prompt_len, ...]`` (batch may broadcast)."""
        x = x.expand(self.index.shape[0], *x.shape[1:])
        idx = self.index.reshape(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)

    def prefill_mask(self) -> torch.Tensor | None:
        """Causal mask over the slots with padding keys masked, ``[batch, 1, n, n]`` (True = attend).

        ``None`` (SDPA's causal kernel) when no slot is padding.
        """
        if self.full:
            return None
        n = self.index.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.index.device).tril()
        mask = causal[None] & self.valid[:, None, :]  # [batch, n, n]
        mask |= torch.eye(n, dtype=torch.bool, device=mask.device)[None]  # padding rows see themselves
        return mask[:, None]

    def decode_mask(self, q_len: int, kv_len: int) -> torch.Tensor | None:
        """Mask of ``q_len`` generated queries over the layout's keys and every generated key, ``[b, 1, q, kv]``.

        ``None`` when no slot is padding and one query sees every key (SDPA's ``is_causal`` is aligned top-left, so
        several queries over a longer cache keep the explicit mask).
        """
        if self.full and q_len == 1:
            return None
        generated = torch.ones(self.valid.shape[0], kv_len - self.valid.shape[1], dtype=torch.bool,
                               device=self.valid.device)  # fmt: skip
        keys = torch.cat([self.valid, generated], 1)  # [batch, kv]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=keys.device).tril(kv_len - q_len)
        return (keys[:, None, :] & causal[None])[:, None]


class Surgery:
    """Per-adapter token-presence plan and the decoder-layer pre-hooks that carry it out.

    Args:
        num_layers: Decoder layers of the LM.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.input_select: tuple[InputSelect, bool] | None = None  # (fn, renumber)
        self.entries: list[tuple[int, InputSelect]] = []
        self.drops: list[tuple[int, LayerSelect]] = []
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (present at layer 0, entering later)
        self._entering: list[tuple[int, torch.Tensor]] = []  # (layer, tokens entering there [batch, prompt])
        self.batch: Any = None
        self.layouts: list[Layout | None] = []
        self.late: torch.Tensor | None = None  # [batch, prompt] tokens entering after layer 0
        self.embeds: torch.Tensor | None = None  # LM input embeddings of the prompt, when a token enters late
        self.decoding = False
        self._memo: tuple | None = None  # (key, tensors...): the last layer's mask (and RoPE), reused while equal

    @property
    def before_call(self) -> bool:
        """Whether layer 0 may run on a layout (so explicit prompt positions are needed)."""
        return self.input_select is not None or bool(self.entries)

    # ------------------------------------------------------------------ before the call
    def plan_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Decide the input-time selections; returns renumbered 1-D positions when asked for, else ``None``."""
        valid = inputs["attention_mask"].bool()  # [batch, prompt]
        present = valid.clone()
        renumber = False
        if self.input_select is not None:
            fn, renumber = self.input_select
            present &= _checked(fn(inputs), valid, "input selection")
        self._entering = [(layer, _checked(fn(inputs), valid, "late entry") & present) for layer, fn in self.entries]
        late = torch.zeros_like(valid)
        for _layer, mask in self._entering:
            late |= mask
        self._pending = (present, late)
        if not renumber:
            return None
        positions = (present & ~late).long().cumsum(-1) - 1  # contiguous over what layer 0 sees
        return positions.clamp(min=0)

    def start(self, batch: Any) -> None:
        """A new prompt: reset per-batch state (``batch`` is the intervention's Batch)."""
        self.batch = batch
        self.layouts, self.embeds, self.decoding, self._memo = [], None, False, None
        valid = ~batch.padding
        if self._pending is None:
            if self.before_call:
                raise RuntimeError("input-time token selections were not planned for this call")
            self._pending = (valid, torch.zeros_like(valid))
        present, self.late = self._pending
        self._pending = None
        self._present0 = present

    # ------------------------------------------------------------------ the layer hook
    def hook(self, layer: int) -> Callable:
        """Forward pre-hook for decoder layer ``layer``."""

        def pre(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, d]
            if self.batch is None:
                raise RuntimeError("token surgery hook called outside adapter.generate / adapter.forward")
            if layer == 0:
                self.decoding = hidden.shape[1] != self.batch.prompt_len or bool(self.layouts)
            if self.decoding:
                new_hidden, kwargs = hidden, self._decode_kwargs(layer, hidden.shape[1], kwargs)
            else:
                new_hidden, kwargs = self._prefill(layer, hidden, kwargs)
            if args:
                return (new_hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new_hidden}

        return pre

    def _presence(self, layer: int, previous: torch.Tensor) -> torch.Tensor:
        present = previous.clone()
        if layer == 0:
            present = self._present0 & ~self.late
        for at, mask in self._entering:
            if at == layer:
                present |= mask
        for at, fn in self.drops:
            if at == layer:
                present &= _checked(fn(self.batch), ~self.batch.padding, f"layer {layer} selection")
        last = present[:, -1]
        if not bool(last.all()):
            raise ValueError(f"layer {layer}: a selection removed the last prompt token, whose logits are the output")
        return present

    def _prefill(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
        if layer == 0 and self.entries:
            self.embeds = hidden  # [batch, prompt, d]: what late tokens enter with
        before = self.layouts[-1] if self.layouts else None
        if layer not in self._events():  # nothing enters or leaves here: the previous layout, no host sync
            self.layouts.append(before)
            return (hidden, kwargs) if before is None else self._apply(before, hidden, kwargs)
        previous = before.present if before is not None else ~self.batch.padding
        present = self._presence(layer, previous)
        if before is None and torch.equal(present, ~self.batch.padding):
            self.layouts.append(None)
            return hidden, kwargs
        layout = before if before is not None and torch.equal(present, previous) else Layout.of(present)
        if layout is not before:
            hidden = self._relayout(hidden, before, layout)
        self.layouts.append(layout)
        return self._apply(layout, hidden, kwargs)

    def _events(self) -> set[int]:
        """Layers where presence may change (layer 0, every drop and entry); the others keep their input's."""
        return {0, *(at for at, _ in self.drops), *(at for at, _ in self.entries)}

    def _apply(self, layout: Layout, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """The layer's mask and position embeddings under ``layout`` (hidden states already in it)."""
        kwargs = dict(kwargs)
        source = kwargs["position_embeddings"]
        pos = kwargs.get("position_ids")
        if not (isinstance(pos, torch.Tensor) and pos.shape[-1] == self.batch.prompt_len and pos.dim() == 2):
            pos = None  # absent, or not 1-D prompt positions (M-RoPE's [3, batch, seq]): passed on as given
        key = (layout, *source, pos)  # consecutive layers share the layout, the RoPE tensors and the positions
        if not self._memo_hit(key):
            gathered = None if pos is None else layout.gather(pos)
            self._memo = (key, layout.prefill_mask(), tuple(layout.gather(t) for t in source), gathered)
        _, kwargs["attention_mask"], kwargs["position_embeddings"], gathered = self._memo
        if pos is not None:
            kwargs["position_ids"] = gathered
        return hidden, kwargs

    def _relayout(self, hidden: torch.Tensor, before: Layout | None, after: Layout) -> torch.Tensor:
        """Hidden states of the new layout: carried over where the token was present, input embedding otherwise."""
        full = hidden if before is None else self._scatter(hidden, before)  # [batch, prompt, d]
        if self.embeds is not None:
            was = ~self.batch.padding if before is None else before.present
            full = torch.where(was[..., None], full, self.embeds)
        return after.gather(full)

    def _scatter(self, hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
        full = hidden.new_zeros(hidden.shape[0], self.batch.prompt_len, hidden.shape[2])
        # padding slots point at position 0 and add zeros there: exact, and no boolean indexing (no host sync)
        index = layout.index[..., None].expand_as(hidden)  # [batch, n, d]
        return full.scatter_add_(1, index, torch.where(layout.valid[..., None], hidden, 0.0))

    def _decode_kwargs(self, layer: int, q_len: int, kwargs: dict) -> dict:
        layout = self.layouts[layer] if layer < len(self.layouts) else None
        if layout is None:
            return kwargs
        cache = layer_cache(kwargs)
        if cache is None:
            raise RuntimeError("a pruned prompt can only be continued with the KV cache of its prefill")
        kv_len = cache.get_seq_length(layer) + q_len
        key = (layout, q_len, kv_len)  # layers sharing a layout share the step's mask
        if not self._memo_hit(key):
            self._memo = (key, layout.decode_mask(q_len, kv_len))
        return {**kwargs, "attention_mask": self._memo[1]}

    def _memo_hit(self, key: tuple) -> bool:
        """Whether the memo was made for ``key`` (objects compared by identity, numbers by value)."""
        if self._memo is None or len(self._memo[0]) != len(key):
            return False
        return all(a is b if not isinstance(a, int) else a == b for a, b in zip(self._memo[0], key, strict=True))


def _checked(keep: torch.Tensor, valid: torch.Tensor, what: str) -> torch.Tensor:
    if keep.shape != valid.shape or keep.dtype != torch.bool:
        raise ValueError(f"{what} must be a bool mask of shape {tuple(valid.shape)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")  # fmt: skip
    return keep & valid
