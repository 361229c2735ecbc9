"""Where the visual tokens are: spans in the LM sequence, token grids, tiles in the original image, positions.

The :class:`Geometry` mixin of :class:`adapters.base.Adapter` and the plain types and helpers that go with it:
:data:`Box` (a rectangle in original-image pixels), :class:`TileFrame` (where one tile's token grid lies in its
image) and :func:`box_overlap` (how much of each token cell a rectangle covers).

Per sample, a family gives each visual token's ``(image, tile, row, col)`` (:meth:`Geometry.visual_token_map`)
and, from its preprocessing, the rectangle each tile's grid covers (:meth:`Geometry.tile_boxes`); the spans
(:meth:`Geometry.image_spans`, :meth:`Geometry.tile_spans`, :meth:`Geometry.instruction_spans`), grids, frames,
cells and padding fractions follow from those. The LM's position ids as ``generate`` builds them
(:meth:`Geometry.position_ids`) are here too; their replacement is
:meth:`adapters.generation.Generation.positions`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

#: a rectangle ``(x0, y0, x1, y1)`` in an ORIGINAL image's pixel coordinates (x right, y down)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TileFrame:
    """Where one tile's visual-token grid lies in its source image (see :meth:`Geometry.tile_frames`).

    Attributes:
        image: The sample's image index (prompt order).
        tile: The image's tile index (0 for untiled families).
        rows: Token-grid rows.
        cols: Token-grid columns.
        box: The rectangle of the original image the grid covers; it extends beyond the image where the
            processor padded it (letterbox) and lies inside it for centre crops and tiles.
        size: The original image's ``(height, width)``.
    """

    image: int
    tile: int
    rows: int
    cols: int
    box: Box
    size: tuple[int, int]


def box_overlap(cells: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Fraction of each cell ``[n, 4]`` inside ``region`` (``[4]`` or ``[n, 4]``), both ``(x0, y0, x1, y1)``; ``[n]``.

    A NaN cell (no grid cell) gives NaN.
    """
    x0, y0 = torch.maximum(cells[:, 0], region[..., 0]), torch.maximum(cells[:, 1], region[..., 1])
    x1, y1 = torch.minimum(cells[:, 2], region[..., 2]), torch.minimum(cells[:, 3], region[..., 3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    return inter / ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]))


class Geometry(abc.ABC):
    """Mixin of :class:`adapters.base.Adapter`: where the visual tokens are and which image region each one covers.

    A family implements :attr:`image_token_id` and :meth:`visual_token_map`, and overrides :meth:`tile_boxes` when
    its preprocessing crops, pads or tiles and :meth:`position_ids` for a RoPE other than 1-D.
    """

    #: the family's name in :data:`adapters.base.ADAPTERS` (set on each adapter class)
    family: ClassVar[str]

    if TYPE_CHECKING:  # provided by adapters.generation.Generation

        def turn_suffix_ids(self) -> list[int]:
            """The assistant-turn suffix of the prompt format (see :class:`adapters.generation.Generation`)."""

    # ------------------------------------------------------------------ visual-token spans
    @property
    @abc.abstractmethod
    def image_token_id(self) -> int:
        """Token id of the image placeholder in ``input_ids``."""

    def image_token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean mask of visual-token positions in the LM sequence, ``[batch, seq]``."""
        return inputs["input_ids"] == self.image_token_id

    def image_spans(self, inputs: dict[str, torch.Tensor]) -> list[list[tuple[int, int]]]:
        """Per sample, the ``[start, end)`` runs of visual tokens in the (padded) LM sequence, in order."""
        mask = self.image_token_mask(inputs).to(torch.int8)  # [batch, seq]
        edges = torch.diff(
            mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1)
        )
        spans = []
        for row in edges.tolist():  # one copy to the host for the batch, then plain Python (no per-row sync)
            starts = [i for i, e in enumerate(row) if e == 1]
            ends = [i for i, e in enumerate(row) if e == -1]
            spans.append(list(zip(starts, ends, strict=True)))
        return spans

    def tile_spans(self, inputs: dict[str, torch.Tensor]) -> list[list[tuple[int, int, int, int]]]:
        """Per sample, ``(image, tile, start, end)`` of each tile's run of visual tokens, in sequence order.

        Untiled families have one tile per image; InternVL has one per crop plus the thumbnail.
        """
        out = []
        for mask, vmap in zip(self.image_token_mask(inputs), self.visual_token_map(inputs), strict=True):
            pos = mask.nonzero().flatten().tolist()
            runs: list[tuple[int, int, int, int]] = []
            for p, (img, tile) in zip(pos, vmap[:, :2].tolist(), strict=True):
                if runs and runs[-1][:2] == (img, tile) and runs[-1][3] == p:
                    runs[-1] = (img, tile, runs[-1][2], p + 1)
                else:
                    runs.append((img, tile, p, p + 1))
            out.append(runs)
        return out

    def instruction_spans(self, inputs: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        r"""Per sample, ``[start, end)`` of the instruction: after the LAST visual token, up to the turn suffix.

        The span ends at the first :meth:`turn_suffix_ids` occurrence after the last visual token.

        With a single-turn prompt that is the user's question plus any template tokens between the image and
        it (Qwen's ``<|vision_end|>``, InternVL's ``</img>\n``); the end-of-turn marker and the assistant
        header are excluded. In multi-turn sequences it is the first question after the image. A row without
        visual tokens (a text-only call) has no instruction after an image: its span is empty, ``(0, 0)``.

        Raises:
            ValueError: a row with visual tokens but without the turn suffix after them.
        """
        suffix = torch.tensor(self.turn_suffix_ids(), device=inputs["input_ids"].device)
        ids = inputs["input_ids"]  # [batch, seq]
        hits = (ids.unfold(1, len(suffix), 1) == suffix).all(-1)  # [batch, seq - k + 1]: suffix starts here
        spans = []
        for b, (vis, hit) in enumerate(zip(self.image_token_mask(inputs), hits, strict=True)):
            if not vis.any():
                spans.append((0, 0))
                continue
            start = int(vis.nonzero().max()) + 1
            after = hit[start:].nonzero()
            if len(after) == 0:
                raise ValueError(f"row {b}: no assistant turn ({self.turn_suffix_ids()}) after the image")
            spans.append((start, start + int(after[0])))
        return spans

    # ------------------------------------------------------------------ token grids and the image regions they cover
    @abc.abstractmethod
    def visual_token_map(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, ``(image, tile, row, col)`` of every visual token, in sequence order.

        ``image`` counts the sample's images from 0 in prompt order; ``tile`` counts an image's tiles (0 for
        untiled families); ``(row, col)`` is the token's cell in its tile's token grid. Rows of ``-1`` in row/col
        mark tokens without a grid cell (e.g. a kept [CLS]).

        Returns:
            One ``LongTensor [n_visual_tokens, 4]`` per sample.
        """

    def visual_grid(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the ``(row, col)`` of every visual token (:meth:`visual_token_map` columns 2–3)."""
        return [m[:, 2:] for m in self.visual_token_map(inputs)]

    def tile_frames(self, inputs: dict[str, torch.Tensor]) -> list[list[TileFrame]]:
        """Per sample, each (image, tile)'s token grid and the original-image rectangle it covers, in sequence order.

        Needs ``harness_image_sizes`` (inputs from :meth:`build_inputs`); the rectangles come from
        :meth:`tile_boxes`, the family's preprocessing geometry.
        """
        if "harness_image_sizes" not in inputs:
            raise ValueError("tile geometry needs the original image sizes (inputs from adapter.build_inputs)")
        sizes = inputs["harness_image_sizes"].tolist()
        out, first = [], 0
        for vmap in self.visual_token_map(inputs):
            cells = vmap[vmap[:, 2] >= 0]  # [n, 4] tokens with a grid cell
            tiles: dict[tuple[int, int], tuple[int, int]] = {}
            for image, tile, row, col in cells.tolist():
                r, c = tiles.get((image, tile), (0, 0))
                tiles[(image, tile)] = (max(r, row + 1), max(c, col + 1))
            n_images = int(vmap[:, 0].max()) + 1 if len(vmap) else 0
            per_image = [sum(1 for i, _t in tiles if i == image) for image in range(n_images)]
            size = [tuple(sizes[first + i]) for i in range(n_images)]  # (height, width) per image
            boxes = [self.tile_boxes(size[i], n) for i, n in enumerate(per_image)]
            out.append([TileFrame(i, t, r, c, boxes[i][t], size[i]) for (i, t), (r, c) in tiles.items()])
            first += n_images
        if first != len(sizes):
            raise ValueError(f"{len(sizes)} image sizes for {first} images in the prompts")
        return out

    def tile_boxes(self, size: tuple[int, int], n_tiles: int) -> list[Box]:
        """The rectangles of an image of ``size = (height, width)`` that its ``n_tiles`` tiles' grids cover.

        Default: one tile whose grid covers the whole image (the image is resized, never cropped or padded).
        """
        if n_tiles != 1:
            raise NotImplementedError(f"{self.family}: no tile geometry for {n_tiles} tiles per image")
        h, w = size
        return [(0.0, 0.0, float(w), float(h))]

    def token_cells(self, inputs: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample, each visual token's cell and its image's rectangle in original pixels (float64).

        Returns:
            ``(cells [n, 4], images [n, 4])`` per sample, ``(x0, y0, x1, y1)``, from :meth:`tile_frames`; a token
            without a grid cell (a kept [CLS]) has a NaN cell.
        """
        out = []
        for vmap, frames in zip(self.visual_token_map(inputs), self.tile_frames(inputs), strict=True):
            by_tile = {(f.image, f.tile): f for f in frames}
            sizes = {f.image: f.size for f in frames}
            cells, images = [], []
            for image, tile, r, c in vmap.tolist():
                h, w = sizes[image]
                images.append((0.0, 0.0, float(w), float(h)))
                if r < 0:
                    cells.append((float("nan"),) * 4)
                    continue
                f = by_tile[(image, tile)]
                cw, ch = (f.box[2] - f.box[0]) / f.cols, (f.box[3] - f.box[1]) / f.rows
                cells.append((f.box[0] + c * cw, f.box[1] + r * ch, f.box[0] + (c + 1) * cw, f.box[1] + (r + 1) * ch))
            as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64, device="cpu").reshape(-1, 4)  # noqa: E731
            out.append((as_tensor(cells), as_tensor(images)))
        return out

    def visual_content(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the fraction of each visual token's patch covered by the image rather than padding, ``[n]``.

        From the preprocessing geometry (:meth:`token_cells`): below 1 only where the processor letterboxes
        (LLaVA's ``do_pad``); tokens without a grid cell (a kept [CLS]) count as content.
        """
        return [box_overlap(cells, images).nan_to_num(nan=1.0).float() for cells, images in self.token_cells(inputs)]

    def _per_row(self, inputs: dict[str, torch.Tensor], units: torch.Tensor, per_unit: int) -> list[torch.Tensor]:
        """Split per-image (or per-tile) token scores ``[n_units, tokens_per_unit]`` into the batch's rows."""
        out, start = [], 0
        for n in self.image_token_mask(inputs).sum(-1).tolist():
            k, rest = divmod(int(n), per_unit)
            if rest:
                raise ValueError(f"{n} visual tokens is not a multiple of {per_unit}")
            out.append(units[start : start + k].reshape(-1))
            start += k
        if start != units.shape[0]:
            raise ValueError(f"{units.shape[0]} images/tiles for {start} in the prompts")
        return out

    # ------------------------------------------------------------------ positions
    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids the LM uses in prefill, as ``generate`` builds them.

        ``[batch, seq]`` for 1-D RoPE (``cumsum(attention_mask) - 1``, so left padding is skipped); families with
        M-RoPE override this.
        """
        mask = inputs["attention_mask"].long()
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
