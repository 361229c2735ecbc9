r"""The intervention layer: one custom attention function for the language model, dispatching per layer.

Every method of the product reaches the model through the sites below. The attention ones are served by a
single function registered with transformers' ``AttentionInterface`` under the name ``"harness"`` together
with a SAME-NAME mask function in ``AttentionMaskInterface`` (without it transformers hands the function
``attention_mask=None`` and causality and padding silently disappear). It is switched on for the language
model only (the vision tower keeps its kernel) while at least one method is attached, and it dispatches each
call to the callbacks registered for that layer:

==============================  ===================================  ============================================
site                            registered with                      tensor the callback edits or reads
==============================  ===================================  ============================================
``inputs.position_ids``         ``adapter.positions(fn)``            ``[batch, seq]`` (``[3, batch, seq]`` M-RoPE)
``inputs.mask``                 :meth:`Handle.mask`                  prefill mask ``[batch, 1, q, k]``, True=attend
``lm.layers.{l}.resid_pre``     :meth:`Handle.resid_pre`             hidden state entering layer l ``[batch, seq, d]``
``lm.layers.{l}.attn_out``      :meth:`Handle.attn_out`              attention output before the residual add
``lm.layers.{l}.mlp_out``       :meth:`Handle.mlp_out`               MLP output before the residual add
``lm.layers.{l}.attn.scores``   :meth:`Handle.scores`                pre-softmax ``[batch, heads, q, k]``
``lm.layers.{l}.attn.probs``    :meth:`Handle.probs`                 post-softmax ``[batch, heads, q, k]``
``lm.layers.{l}.attn.heads``    :meth:`Handle.heads`                 per-head outputs before the output
                                                                     projection ``[batch, q, heads, head_dim]``
``lm.layers.{l}.tokens``        :meth:`Handle.drop_input`,           which prompt tokens enter layer l (see
                                :meth:`Handle.drop_at`,              :mod:`methods.surgery`), ``[batch, prompt]``
                                :meth:`Handle.enter_at`
``dec_logits``                  :meth:`Handle.logits`                each decoding step's scores ``[batch, vocab]``
==============================  ===================================  ============================================

Layers where no callback needs scores or probabilities run PyTorch's fused SDPA on the (possibly edited) mask;
the others run an eager softmax so the probabilities can be edited before they multiply V. When no row is padded
the mask function skips the mask, as it does for the unmodified model, and the untouched layers run the same
causal kernel as the baseline; the mask is built only where a callback needs it in hand. A per-call
:class:`Batch` (prompt tensors, visual-token and padding masks, each method's per-batch state) is built from
the adapter's inputs before every ``generate``/``forward``; callbacks get a :class:`Step` telling them the layer
and whether this call is the prefill (query length = key length) or one cached decoding step.

Composition: methods attach with the resources they claim. ``positions``, ``scores``, ``probs``, ``heads`` and
``tokens`` are exclusive (two methods editing the same probabilities compound in an order no paper defines), mask
edits, hidden-state and sub-layer-output edits (``resid``, ``outputs``) compose in attach order. A method that
removes or adds tokens (``tokens``) changes what every other site's positions mean, so it combines only with
decoding-logit methods. A second attach by the same method, or an exclusive claim already held, raises
:class:`CompositionError` before anything is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapters.base import Adapter
from adapters.hf_compat import attention_function, sdpa_attention
from methods.base import check_layers
from methods.surgery import InputSelect, LayerSelect, Surgery

#: the name the attention function and its mask function are registered under
ATTENTION = "harness"
#: resources at most one attached method may hold
EXCLUSIVE = frozenset({"positions", "scores", "probs", "heads", "tokens"})
#: every resource a method may claim
RESOURCES = EXCLUSIVE | {"mask", "resid", "outputs", "logits"}
#: resources another method's ``tokens`` claim cannot coexist with (their per-position state would be stale)
TOKEN_CONFLICTS = RESOURCES - {"logits"}


class CompositionError(ValueError):
    """Two methods that cannot be applied together (or one method twice)."""


@dataclass
class Batch:
    """What the model is about to process in one ``generate``/``forward`` call.

    Attributes:
        inputs: The prompt tensors (``input_ids``, ``attention_mask``, image inputs, ``position_ids`` if replaced).
        prompt_len: Prompt length (padded); keys beyond it are generated tokens.
        visual: Visual-token positions ``[batch, prompt_len]``.
        padding: Padding positions ``[batch, prompt_len]``.
        state: Per-method scratch space, keyed by method name.
    """

    inputs: dict[str, torch.Tensor]
    prompt_len: int
    visual: torch.Tensor
    padding: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)

    def keys(self, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        """A ``[batch, prompt_len]`` token mask extended with False for generated keys: ``[batch, kv_len]``."""
        if kv_len < mask.shape[1]:
            raise ValueError(f"key length {kv_len} is shorter than the prompt ({mask.shape[1]})")
        return torch.nn.functional.pad(mask, (0, kv_len - mask.shape[1]), value=False)


@dataclass
class Step:
    """Where an attention callback is being called.

    Attributes:
        layer: LM layer index.
        offset: Sequence position of the first query row (0 in prefill and in uncached passes; the number of
            cached tokens during cached decoding).
        q_len: Query length (``prompt_len`` in prefill, 1 in a cached decoding step, more in an uncached one).
        kv_len: Key length (``offset + q_len``).
        batch: The current :class:`Batch`.
    """

    layer: int
    offset: int
    q_len: int
    kv_len: int
    batch: Batch

    @property
    def prefill(self) -> bool:
        """True when the queries start at position 0 (they include the whole prompt)."""
        return self.offset == 0

    def query_positions(self) -> torch.Tensor:
        """Sequence positions of the query rows, ``[q]``."""
        return torch.arange(self.offset, self.offset + self.q_len, device=self.batch.visual.device)


MaskFn = Callable[[torch.Tensor, Step], torch.Tensor]
AttnFn = Callable[[torch.Tensor, Step], torch.Tensor]
ResidFn = Callable[[torch.Tensor, Step], torch.Tensor | None]
BatchFn = Callable[[Batch], None]
RowFn = Callable[[Step], int]


class Intervention:
    """The per-adapter dispatcher (one per adapter, shared by every attached method)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.batch: Batch | None = None
        self.owners: dict[str, frozenset[str]] = {}
        self.batch_fns: list[tuple[str, BatchFn]] = []
        self.mask_fns: list[tuple[str, MaskFn]] = []
        self.score_fns: dict[int, list[tuple[str, AttnFn, RowFn | None]]] = {}
        self.prob_fns: dict[int, list[tuple[str, AttnFn, RowFn | None]]] = {}
        self.head_fns: dict[int, list[tuple[str, AttnFn]]] = {}
        self._stack: contextlib.ExitStack | None = None
        self._edited: tuple[torch.Tensor | None, torch.Tensor] | None = None  # (mask received, mask edited)
        self._causal_memo: tuple[tuple, torch.Tensor] | None = None  # ((batch, q, k, device), causal mask)
        self._bias_memo: tuple[torch.Tensor, tuple, torch.Tensor] | None = None  # (mask source, (shape, dtype), bias)
        self.surgery: Surgery | None = None

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        """Switch the LM to the dispatching attention function and observe the adapter's inputs."""
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.adapter.lm_attention(ATTENTION))
            for layer in range(self.adapter.num_layers("lm")):
                module = self.adapter.site(f"lm.layers.{layer}.attn")
                module._harness_site = (self, layer)
                stack.callback(delattr, module, "_harness_site")
            stack.enter_context(self.adapter.on_inputs(self._new_batch))
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def _stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
        self.batch = None

    def _new_batch(self, inputs: dict[str, torch.Tensor] | None) -> None:
        self._edited = self._causal_memo = self._bias_memo = None
        if inputs is None:  # the adapter call is over
            self.batch = None
            return
        ids = inputs["input_ids"]  # [batch, seq]
        mask = inputs.get("attention_mask")
        padding = (mask == 0) if mask is not None else torch.zeros_like(ids, dtype=torch.bool)
        self.batch = Batch(inputs, ids.shape[1], self.adapter.image_token_mask(inputs), padding)
        for _owner, fn in self.batch_fns:
            fn(self.batch)

    # ------------------------------------------------------------------ the attention function
    def attend(
        self,
        layer: int,
        module: nn.Module,
        query: torch.Tensor,  # [batch, heads, q, head_dim]
        key: torch.Tensor,  # [batch, kv_heads, k, head_dim]
        value: torch.Tensor,  # [batch, kv_heads, k, head_dim]
        mask: torch.Tensor | None,  # [batch, 1, q, k] bool, True = attend
        scaling: float,
        dropout: float,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one LM attention call with this layer's callbacks (fused SDPA where none needs probabilities)."""
        out, probs = self._attend(layer, module, query, key, value, mask, scaling, dropout, kwargs)
        for _owner, fn in self.head_fns.get(layer, []):  # out: [batch, q, heads, head_dim]
            out = fn(out, Step(layer, key.shape[2] - query.shape[2], query.shape[2], key.shape[2], self.batch))
        return out, probs

    def _attend(
        self,
        layer: int,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        dropout: float,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q_len, kv_len = query.shape[2], key.shape[2]
        if self.batch is None:
            raise RuntimeError(
                "an intervention is attached but the model was called without the adapter; use adapter.generate / "
                "adapter.forward so per-batch state is built"
            )
        step = Step(layer, kv_len - q_len, q_len, kv_len, self.batch)
        score_fns, prob_fns = self.score_fns.get(layer, []), self.prob_fns.get(layer, [])
        edits = step.prefill and bool(self.mask_fns)
        plain = mask is None and not edits  # SDPA's mask function skipped it (no padded row): causal only
        if mask is None and q_len > 1 and (score_fns or prob_fns or edits):
            mask = self._causal(query.shape[0], q_len, kv_len, query.device)
        received = mask
        if mask is not None and mask.shape[-1] != kv_len:  # longer than the keys (a static cache): cut to them
            mask = mask[..., :kv_len]
        if edits:
            # every layer of one forward receives the same mask tensor: edit it once, reuse the result
            if self._edited is None or self._edited[0] is not received:
                self._edited = (received, self._edit_prompt_block(mask, step))
            mask = self._edited[1]
        if not score_fns and not prob_fns:
            return sdpa_attention(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        start = min((first(step) if first else 0) for _o, _f, first in score_fns + prob_fns)
        start = max(0, min(start, q_len))
        source = self._edited[1] if edits else received if received is not None else mask
        bias = None if mask is None else self._bias(source, mask, query.dtype)  # [batch, 1, q, k]
        if start == 0:
            return self._eager(module, query, key, value, bias, scaling, dropout, step, score_fns, prob_fns)
        # rows before `start` are never edited: fused SDPA for them, eager only for the rest. Prefill rows from
        # position 0 under a plain causal mask keep the causal kernel (its top-left alignment is right there; a
        # single row would attend every key, so one row keeps the mask)
        head_mask = None if mask is None or (plain and step.prefill and start > 1) else mask[:, :, :start]
        head, _ = sdpa_attention(module, query[:, :, :start], key, value, head_mask, dropout=dropout,
                                         scaling=scaling, **kwargs)  # fmt: skip
        if start == q_len:
            return head, None
        tail_step = Step(layer, step.offset + start, q_len - start, kv_len, step.batch)
        tail_bias = None if bias is None else bias[:, :, start:]
        tail, _ = self._eager(module, query[:, :, start:], key, value, tail_bias, scaling, dropout, tail_step,
                              score_fns, prob_fns)  # fmt: skip
        return torch.cat([head, tail], 1), None  # [batch, q, heads, head_dim]; no full probabilities to return

    def _causal(self, batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """The causal mask SDPA's mask function skips when no row is padded, ``[batch, 1, q, k]`` (True = attend).

        Built only for the layers that need one in hand (eager softmax, mask edits), once per shape: the other
        layers keep ``None`` and so run the same causal kernel as the unmodified model.
        """
        key = (batch, q_len, kv_len, device)
        if self._causal_memo is None or self._causal_memo[0] != key:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)  # [q, k]
            self._causal_memo = (key, causal.expand(batch, 1, q_len, kv_len).contiguous())
        return self._causal_memo[1]

    def _bias(self, source: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive form of ``mask`` (0 where attended, the dtype's minimum elsewhere), ``[batch, 1, q, k]``.

        Every eager layer of one forward receives the same mask (``source``, which the memo keeps alive so its
        identity cannot be reused), so it is converted once per forward (2 launches) and each eager layer scales
        and masks its scores in one kernel instead of two. ``min + s`` rounds to ``min`` for any score below
        about 1e31 in magnitude, so the scores equal ``where(mask, s, min)``.
        """
        shape = (*mask.shape, dtype)
        memo = self._bias_memo
        if memo is None or memo[0] is not source or memo[1] != shape:
            bias = torch.full(mask.shape, torch.finfo(dtype).min, dtype=dtype, device=mask.device)
            self._bias_memo = memo = (source, shape, bias.masked_fill_(mask, 0.0))
        return memo[2]

    @staticmethod
    def _eager(
        module: nn.Module,
        query: torch.Tensor,  # [batch, heads, q, head_dim]
        key: torch.Tensor,  # [batch, kv_heads, k, head_dim]
        value: torch.Tensor,
        bias: torch.Tensor | None,  # [batch, 1, q, k] additive mask: 0 = attend, the dtype's minimum = masked
        scaling: float,
        dropout: float,
        step: Step,
        score_fns: list,
        prob_fns: list,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager attention with the score and probability callbacks applied; ``([batch, q, heads, hd], probs)``."""
        b, heads, q, hd = query.shape
        kv_heads = key.shape[1]
        # grouped-query attention without repeat_kv's copies of K and V (×heads/kv_heads of the cache, per layer):
        # query head h uses KV head h // groups, so [b, heads, q, hd] -> [b, kv_heads, groups·q, hd] is the same
        # product against the un-repeated keys
        grouped = query.reshape(b, kv_heads, -1, hd)  # [batch, kv_heads, groups * q, head_dim]
        raw = torch.matmul(grouped, key.transpose(2, 3)).view(b, heads, q, -1)  # [batch, heads, q, k]
        # scaled and masked in one kernel: bias + scaling · raw
        scores = raw * scaling if bias is None else torch.add(bias, raw, alpha=scaling)
        for _owner, fn, _first in score_fns:
            scores = fn(scores, step)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # [batch, heads, q, k]
        for _owner, fn, _first in prob_fns:
            probs = fn(probs, step)
        probs = probs.to(query.dtype)
        dropped = nn.functional.dropout(probs, p=dropout, training=True) if dropout and module.training else probs
        out = torch.matmul(dropped.reshape(b, kv_heads, -1, dropped.shape[-1]), value)  # [b, kv_heads, g·q, hd]
        return out.view(b, heads, q, hd).transpose(1, 2).contiguous(), probs

    def _edit_prompt_block(self, mask: torch.Tensor | None, step: Step) -> torch.Tensor:
        """Apply the mask callbacks to the prompt × prompt block (the rows of generated tokens stay causal)."""
        n = step.batch.prompt_len
        if mask is None:
            raise RuntimeError(f"the {ATTENTION!r} mask function produced no mask; mask edits need a materialised one")
        block = mask[..., :n, :n]  # [batch, 1, prompt, prompt]
        for _owner, fn in self.mask_fns:
            block = fn(block, step)
        if step.q_len == n:
            return block
        mask = mask.clone()
        mask[..., :n, :n] = block
        return mask

    # ------------------------------------------------------------------ registration
    def _claim(self, owner: str, claims: frozenset[str]) -> None:
        unknown = claims - RESOURCES
        if unknown:
            raise ValueError(f"{owner}: unknown resources {sorted(unknown)}; known: {sorted(RESOURCES)}")
        if owner in self.owners:
            raise CompositionError(f"method {owner!r} is already applied to this model; it cannot be stacked twice")
        for other, held in self.owners.items():
            if ("tokens" in claims and held & TOKEN_CONFLICTS) or ("tokens" in held and claims & TOKEN_CONFLICTS):
                raise CompositionError(
                    f"method {owner!r} cannot be combined with {other!r}: one of them removes or adds prompt tokens "
                    "mid-stack, which changes the positions the other one edits"
                )
            clash = claims & held & EXCLUSIVE
            if clash:
                raise CompositionError(
                    f"method {owner!r} cannot be combined with {other!r}: both edit {', '.join(sorted(clash))} "
                    "(the result would depend on an order neither paper defines)"
                )
        self.owners[owner] = claims

    def _release(self, owner: str) -> None:
        self.owners.pop(owner, None)
        if "tokens" not in {c for held in self.owners.values() for c in held}:
            self.surgery = None
        self.batch_fns = [(o, f) for o, f in self.batch_fns if o != owner]
        self.mask_fns = [(o, f) for o, f in self.mask_fns if o != owner]
        for table in (self.score_fns, self.prob_fns, self.head_fns):
            for layer in list(table):
                table[layer] = [entry for entry in table[layer] if entry[0] != owner]
                if not table[layer]:
                    del table[layer]


class Handle:
    """One method's registrations on an :class:`Intervention`; everything is removed when it detaches."""

    def __init__(self, iv: Intervention, owner: str, claims: frozenset[str]) -> None:
        self.iv, self.owner, self.claims = iv, owner, claims
        self._hooks: list[Any] = []
        self._contexts = contextlib.ExitStack()
        self._positions_on = False

    @property
    def adapter(self) -> Adapter:
        """The adapter this handle is attached to."""
        return self.iv.adapter

    def _need(self, resource: str) -> None:
        if resource not in self.claims:
            raise CompositionError(f"method {self.owner!r} did not claim {resource!r} when attaching")

    def _layers(self, layers: list[int] | range) -> list[int]:
        check_layers(self.adapter, self.owner, layers)  # the same check Method.check ran before loading
        return list(layers)

    def on_batch(self, fn: BatchFn) -> None:
        """Call ``fn(batch)`` when a new batch starts (before its prefill), e.g. to precompute masks."""
        self.iv.batch_fns.append((self.owner, fn))

    def mask(self, fn: MaskFn) -> None:
        """Edit the prompt's mask (site ``inputs.mask``): ``fn(mask [batch, 1, prompt, prompt] bool, step) -> mask``.

        Only the prompt × prompt block is edited (in prefill, and in uncached passes that recompute the prompt);
        generated tokens keep the ordinary mask (a new token sees every unpadded key), and what the prompt tokens
        saw in prefill is baked into the cache.
        """
        self._need("mask")
        self.iv.mask_fns.append((self.owner, fn))

    def scores(self, layers: list[int] | range, fn: AttnFn, first_row: RowFn | None = None) -> None:
        """Edit pre-softmax scores ``[batch, heads, q, k]`` (site ``lm.layers.{l}.attn.scores``), prefill and decode.

        ``first_row(step)``, when given, is the first query row (0-based within this call) the callback may edit;
        earlier rows run on fused SDPA and are not shown to it (the callback's ``step`` then starts there).
        """
        self._need("scores")
        for layer in self._layers(layers):
            self.iv.score_fns.setdefault(layer, []).append((self.owner, fn, first_row))

    def probs(self, layers: list[int] | range, fn: AttnFn, first_row: RowFn | None = None) -> None:
        """Edit post-softmax probabilities ``[batch, heads, q, k]`` (``lm.layers.{l}.attn.probs``), prefill and decode.

        Each row of the returned tensor must still sum to 1; the callback sees float32. ``first_row`` as in
        :meth:`scores`.
        """
        self._need("probs")
        for layer in self._layers(layers):
            self.iv.prob_fns.setdefault(layer, []).append((self.owner, fn, first_row))

    def heads(self, layers: list[int] | range, fn: AttnFn) -> None:
        """Read or replace each head's output before the output projection (site ``lm.layers.{l}.attn.heads``).

        ``fn(out [batch, q, heads, head_dim], step) -> out``, prefill and every decoding step (``step`` as in
        :meth:`scores`); the returned tensor goes into the attention module's output projection.
        """
        self._need("heads")
        for layer in self._layers(layers):
            self.iv.head_fns.setdefault(layer, []).append((self.owner, fn))

    def logits(self, processor: Any) -> None:
        """Edit each decoding step's next-token scores (site ``dec_logits``; contrastive decoding and the like).

        ``processor`` is a ``transformers.LogitsProcessor``: ``processor(input_ids, scores [batch, vocab])``.
        """
        self._need("logits")
        self._contexts.enter_context(self.adapter.decoding_logits(processor))

    def _surgery(self) -> Surgery:
        """The adapter's token surgery, installed on every decoder layer at first use."""
        self._need("tokens")
        if self.iv.surgery is None:
            surgery = Surgery(self.adapter.num_layers("lm"))
            for layer in range(surgery.num_layers):
                site = self.adapter.site(f"lm.layers.{layer}")
                self._hooks.append(site.register_forward_pre_hook(surgery.hook(layer), with_kwargs=True))
            self.on_batch(surgery.start)
            self.iv.surgery = surgery
        return self.iv.surgery

    def _explicit_positions(self, surgery: Surgery) -> None:
        if self._positions_on:
            return

        def positions(default: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            renumbered = surgery.plan_inputs(inputs)
            if renumbered is None:
                return default  # explicit: decoding continues from the unpruned prompt length
            if default.dim() != 2:
                raise ValueError("renumbering positions after input pruning is defined for 1-D RoPE only")
            return renumbered

        self._contexts.enter_context(self.adapter.positions(positions))
        self._positions_on = True

    def drop_input(self, select: InputSelect, renumber: bool = False) -> None:
        """Tokens that never enter the LM (site ``lm.layers.0.tokens``), decided from the prompt tensors.

        ``select(inputs) -> keep [batch, prompt] bool``. ``renumber=False``: the kept tokens keep their positions
        in the unpruned prompt (gaps); ``True``: positions are contiguous over the kept tokens (as if the prompt
        had been built without the dropped ones).
        """
        surgery = self._surgery()
        if surgery.input_select is not None:
            raise CompositionError(f"{self.owner}: one input selection per model")
        surgery.input_select = (select, renumber)
        self._explicit_positions(surgery)

    def drop_at(self, layer: int, select: LayerSelect) -> None:
        """Tokens removed from layer ``layer`` on (site ``lm.layers.{layer}.tokens``), decided in prefill.

        ``select(batch) -> keep [batch, prompt] bool`` is called once per prompt when its prefill reaches the
        layer (e.g. from attention recorded at an earlier layer in ``batch.state``). Kept tokens keep their
        positions; the KV cache of layers ≥ ``layer`` holds only them.
        """
        self._surgery().drops.append((self._layers([layer])[0], select))

    def enter_at(self, layer: int, select: InputSelect) -> None:
        """Tokens absent from layers ``< layer`` that enter at ``layer`` with their LM input embeddings.

        ``select(inputs) -> enter_late [batch, prompt] bool``; every token keeps its full-prompt position.
        """
        if layer == 0:
            raise ValueError("enter_at(0) is the ordinary forward pass; use a layer >= 1")
        surgery = self._surgery()
        surgery.entries.append((self._layers([layer])[0], select))
        self._explicit_positions(surgery)

    def resid_pre(self, layers: list[int] | range, fn: ResidFn) -> None:
        """Read (or, returning a tensor, replace) the hidden state entering layer l, ``[batch, seq, d]``.

        Site ``lm.layers.{l}.resid_pre``; called in prefill (``step.offset == 0``, the first ``prompt_len`` rows
        are the prompt) and at every cached decoding step (``step.offset == -1``, one row).
        """
        self._need("resid")
        for layer in self._layers(layers):
            self._hooks.append(
                self.adapter.site(f"lm.layers.{layer}").register_forward_pre_hook(
                    self._resid_hook(layer, fn), with_kwargs=True
                )
            )

    def attn_out(self, layers: list[int] | range, fn: ResidFn) -> None:
        """Read (or, returning a tensor, replace) layer l's attention output ``[batch, seq, d]``.

        Site ``lm.layers.{l}.attn_out``: the attention module's output after its output projection, before the
        residual add; ``step`` as in :meth:`resid_pre` (prefill: ``offset == 0``; a cached decoding step:
        ``offset == -1``, one row).
        """
        self._sublayer_out("attn", layers, fn)

    def mlp_out(self, layers: list[int] | range, fn: ResidFn) -> None:
        """Read (or replace) layer l's MLP output ``[batch, seq, d]`` (site ``lm.layers.{l}.mlp_out``), as attn_out."""
        self._sublayer_out("mlp", layers, fn)

    def _sublayer_out(self, part: str, layers: list[int] | range, fn: ResidFn) -> None:
        self._need("outputs")
        for layer in self._layers(layers):
            hook = self._output_hook(layer, fn)
            self._hooks.append(self.adapter.site(f"lm.layers.{layer}.{part}").register_forward_hook(hook))

    def _step(self, layer: int, q: int) -> Step:
        batch = self.iv.batch
        if batch is None:
            raise RuntimeError("an intervention hook was called outside adapter.generate / adapter.forward")
        offset = 0 if q >= batch.prompt_len else -1  # -1: a cached decoding step (cache length unknown here)
        return Step(layer, offset, q, -1, batch)

    def _output_hook(self, layer: int, fn: ResidFn) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            tensor = output[0] if isinstance(output, tuple) else output  # [batch, seq, d]
            new = fn(tensor, self._step(layer, tensor.shape[1]))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _resid_hook(self, layer: int, fn: ResidFn) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, d]
            new = fn(hidden, self._step(layer, hidden.shape[1]))
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _detach(self) -> None:
        self._contexts.close()
        while self._hooks:
            self._hooks.pop().remove()
        self.iv._release(self.owner)


@contextlib.contextmanager
def attach(adapter: Adapter, owner: str, claims: set[str] | frozenset[str]) -> Iterator[Handle]:
    """Attach method ``owner`` to ``adapter``'s intervention layer, claiming ``claims``; detach on exit.

    The first attach switches the LM to the dispatching attention function; the last detach restores the
    previous one, so a baseline run after a method run is bit-identical to one before it.
    """
    iv: Intervention | None = getattr(adapter, "_intervention", None)
    if iv is None:
        iv = Intervention(adapter)
    iv._claim(owner, frozenset(claims))
    handle = Handle(iv, owner, frozenset(claims))
    first = len(iv.owners) == 1
    try:
        if first:
            iv._start()
            adapter._intervention = iv
        yield handle
    finally:
        handle._detach()
        if not iv.owners:
            iv._stop()
            adapter._intervention = None


# ---------------------------------------------------------------------------------------------- registration
# registered with transformers (with SDPA's mask function under the same name: its causal skip gives every layer
# ``None`` when no row is padded, so it runs the causal kernel the unmodified model runs; ``Intervention._causal``
# builds the mask where one is needed) when the adapter first switches the LM to it
@attention_function(ATTENTION)
def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``AttentionInterface`` entry point: dispatch to the attached :class:`Intervention`, else plain SDPA."""
    site = getattr(module, "_harness_site", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if site is None:
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    iv, layer = site
    return iv.attend(layer, module, query, key, value, attention_mask, scaling, dropout, kwargs)
