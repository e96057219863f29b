"""torch's antialiased bilinear resize, bit for bit, in numpy alone (torch is not imported).

`resizer(in_rows, in_cols, out_rows, out_cols)(image)` equals, for a 2-D float32 image,

    torch.nn.functional.interpolate(image[None, None], size=(out_rows, out_cols),
                                    mode="bilinear", antialias=True, align_corners=False)

as torch's CPU kernel computes it on x86-64 (its AVX2 and AVX512 builds), down and up, every
bit. What that kernel does (aten/src/ATen/native/cpu/UpSampleKernel.cpp:
`upsample_bilinear2d_aa_kernel_impl` -> `separable_upsample_generic_Nd_kernel_impl`):

- It is separable: across (the last, contiguous axis) first, then down. An axis whose size
  does not change is skipped (no weights of one); with both unchanged the image is copied.
- Per axis and output index i (`HelperInterpBase::_compute_indices_min_size_weights_aa`,
  `HelperInterpLinear::aa_filter`, scalar_t = float; `float(...)` below is a rounding to
  float32, the rest is float32 arithmetic or double where C++ promotes to it):
  scale = float(in) / out; support = scale if scale >= 1 else 1.0; center = float(scale *
  (i + 0.5)) (product in double); invscale = float(1.0 / scale) (in double) if scale >= 1
  else 1; xmin = max(int(double(center - support) + 0.5), 0); xsize = min(int(double(center
  + support) + 0.5), in) - xmin (clamped to 2 * ceil(support) + 1);
  w_j = aa_filter(float((double(float(j + xmin) - center) + 0.5) * invscale)) for j < xsize,
  aa_filter(x) = float(1.0 - |x|) if |x| < 1 else 0; total = the float32 sum of the w_j in
  order; w_j = w_j / total where total != 0.
- Each output value sums its taps in order (`interpolate_aa_single_dim`, the same loop for
  both passes): the first product rounded to float32, then plain float32 additions of the
  rounded products of taps 1 .. 4 * floor((xsize - 1) / 4), then fused multiply-adds (one
  rounding each) for the remaining 0-3 taps: the compiled loop takes four products at a time
  and contracts its scalar epilogue into FMAs. (torch's DEFAULT kernel, for CPUs without AVX2
  or with ATEN_CPU_CAPABILITY=default, adds every tap plainly: _VECTOR = 1 here.)
- With one output column, the vertical pass gives every output row the first one's value (its
  loop reads the first output's taps only once the column axis collapses); so does this.

Making numpy fast at it: the across pass transposes a band of rows at a time, so that each
input column is a contiguous row; one `take` gathers a group of outputs' taps tap-major
(taps, outputs, rows), one multiply applies the weights, and one reduce over the taps sums them
(numpy's reduce along an outer axis adds one row after the other, in float32). The down pass
does the same on the rows of the across result. The fused taps run in float64, where the
product of two float32 is exact and a single rounding to float32 is a correct FMA unless the
float64 sum lies exactly halfway between two float32 without being exact: those are found
(TwoSum) and nudged towards the exact sum first. A Resizer can be shared between threads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

_F32 = np.float32
_F64 = np.float64
# Taps summed with plain float32 additions come in fours (see the module docstring).
_VECTOR = 4
# Rows of the image transposed and resized across at a time.
_BAND_ROWS = 32
# Rows transposed per copy (numpy's transposing copies slow down with more rows at a time).
_TRANSPOSE_ROWS = 16
# Values per gathered block of plain taps (taps x outputs x row length), and per block of
# fused taps (float64): small enough for the L2 cache, large enough to amortise numpy's calls.
_BLOCK_VALUES = 1 << 16
_FUSED_BLOCK_VALUES = 1 << 15
# Values of plain sums per chunk of bands whose fused taps are added together.
_CHUNK_VALUES = 1 << 17
# Below this row length, weights are stored expanded along the row: multiplying by a weight
# broadcast along a short row runs a short inner loop per weight.
_EXPANDED_BELOW = 128
# float64 bit patterns: halfway between two float32 when the 29 bits float32 drops are 1 then
# 28 zeros, i.e. when the pattern shifted left by 64 - 29 is 1 then 63 zeros.
_DROPPED_SHIFT = 64 - 29
_HALFWAY = np.int64(-(1 << 63))


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First input index, number of taps and float32 weights (out, max taps; zero past the
    count) of each output index, as torch computes them for float32 input."""
    scale = _F32(in_size) / _F32(out_size)
    support = scale if scale >= 1 else _F32(1.0)
    max_taps = int(np.ceil(_F64(support))) * 2 + 1
    invscale = _F32(1.0 / _F64(scale)) if scale >= 1 else _F32(1.0)
    index = np.arange(out_size, dtype=_F64)
    center = (_F64(scale) * (index + 0.5)).astype(_F32)
    first = np.maximum(((center - support).astype(_F64) + 0.5).astype(np.int64), 0)
    stop = np.minimum(((center + support).astype(_F64) + 0.5).astype(np.int64), in_size)
    count = np.clip(stop - first, 0, max_taps)
    tap = np.arange(max_taps)
    distance = ((first[:, None] + tap).astype(_F32) - center[:, None]).astype(_F64) + 0.5
    x = np.abs((distance * _F64(invscale)).astype(_F32))
    weights = np.where(x < 1, (1.0 - x.astype(_F64)).astype(_F32), _F32(0))
    weights[tap[None, :] >= count[:, None]] = 0
    total = np.zeros(out_size, _F32)
    for column in weights.T:  # float32, in order, as torch sums them
        total += column
    nonzero = total != 0
    weights[nonzero] /= total[nonzero, None]
    return first, count, weights


def _rows(selection: np.ndarray) -> slice | np.ndarray:
    """Output rows: a slice when they are consecutive (a view to write into)."""
    if len(selection) and selection[-1] - selection[0] + 1 == len(selection):
        return slice(int(selection[0]), int(selection[-1]) + 1)
    return selection


def _part(rows: slice | np.ndarray, start: int, stop: int) -> slice | np.ndarray:
    if isinstance(rows, slice):
        return slice(rows.start + start, rows.start + stop)
    return rows[start:stop]


@dataclass(frozen=True)
class _Plain:
    """Outputs with the same number of taps added plainly."""

    rows: slice | np.ndarray
    index: np.ndarray  # (taps, outputs): input index of each tap
    weights: np.ndarray  # (taps, outputs, 1) float32


@dataclass(frozen=True)
class _Fused:
    """The k-th fused multiply-add tap of the outputs that have one."""

    rows: slice | np.ndarray
    index: np.ndarray  # (outputs,)
    weights: np.ndarray  # (outputs, 1) float64


class _Pass:
    """Resampling of one axis, applied to the rows of a (in_size, L) array: (out_size, L)."""

    def __init__(self, in_size: int, out_size: int) -> None:
        self.in_size, self.out_size = in_size, out_size
        first, count, weights = _taps(in_size, out_size)
        plain = 1 + _VECTOR * ((np.maximum(count, 1) - 1) // _VECTOR)
        self.plain: list[_Plain] = []
        for taps in np.unique(plain):
            selection = np.flatnonzero(plain == taps)
            index = first[selection][None, :] + np.arange(taps)[:, None]
            # With no taps at all torch still multiplies one input by a zero weight.
            self.plain.append(_Plain(
                _rows(selection), np.minimum(index, in_size - 1),
                np.ascontiguousarray(weights[selection, :taps].T[:, :, None])))
        self.fused: list[_Fused] = []
        extra = count - plain
        for k in range(int(extra.max(initial=0))):
            selection = np.flatnonzero(extra > k)
            at = plain[selection] + k
            self.fused.append(_Fused(_rows(selection), first[selection] + at,
                                     weights[selection, at].astype(_F64)[:, None]))
        self._expanded: dict[tuple[int, int, int], np.ndarray] = {}
        self._plans: dict[int, tuple[tuple, ...]] = {}

    def _along(self, key: int, weights: np.ndarray, start: int, stop: int,
               length: int) -> np.ndarray:
        """weights[..., start:stop, :] for rows of `length` values: broadcast, or expanded
        along short rows (cached)."""
        part = weights[..., start:stop, :]
        if length >= _EXPANDED_BELOW:
            return part
        expanded = self._expanded.get((key, start, length))
        if expanded is None:
            expanded = np.ascontiguousarray(np.broadcast_to(part, part.shape[:-1] + (length,)))
            self._expanded[key, start, length] = expanded
        return expanded

    def _blocks(self, length: int) -> tuple[tuple, ...]:
        """The plain sums' blocks for rows of `length` values: (input index (taps, outputs),
        weights, output rows, gathered shape), each small enough for the cache (cached)."""
        cached = self._plans.get(length)
        if cached is not None:
            return cached
        blocks = []
        for number, group in enumerate(self.plain):
            taps, outputs = group.index.shape
            block = max(1, _BLOCK_VALUES // (taps * length))
            for start in range(0, outputs, block):
                stop = min(outputs, start + block)
                index = group.index[:, start:stop]
                weights = self._along(number, group.weights, start, stop, length)
                rows = _part(group.rows, start, stop)
                if (stop - start) * length == 1:
                    # A single value to sum: numpy would reduce along its contiguous axis,
                    # pairwise, not in order. Sum it twice, side by side.
                    index, weights = np.repeat(index, 2, axis=1), np.repeat(weights, 2, axis=1)
                    rows = np.arange(rows.start, rows.stop).repeat(2) \
                        if isinstance(rows, slice) else rows.repeat(2)
                blocks.append((np.ascontiguousarray(index), weights, rows,
                               (taps, index.shape[1], length)))
        self._plans[length] = tuple(blocks)
        return self._plans[length]

    def plain_sums(self, source: np.ndarray, out: np.ndarray,
                   gathered: list[np.ndarray] | None = None) -> None:
        """The plainly added taps: source (in_size, L) float32 C-contiguous -> out
        (out_size, L) float32 C-contiguous. Each block of outputs gathers its taps' rows
        tap-major, multiplies them by their weights and sums them in order (numpy's reduce
        along an outer axis adds one row after the other, in float32; -0.0 as the initial
        value leaves the first product as it is, signed zeros included). gathered: from
        self.buffers(L), to reuse them."""
        blocks = self._blocks(source.shape[1])
        for (index, weights, rows, _), block in zip(
                blocks, gathered or self.buffers(source.shape[1])):
            source.take(index, axis=0, out=block, mode="clip")
            np.multiply(block, weights, out=block)
            if isinstance(rows, slice):
                np.add.reduce(block, axis=0, out=out[rows], initial=-0.0)
            else:
                out[rows] = np.add.reduce(block, axis=0, initial=-0.0)

    def buffers(self, length: int) -> list[np.ndarray]:
        """Scratch for plain_sums with rows of `length` values (one buffer, viewed per
        block)."""
        blocks = self._blocks(length)
        buffer = np.empty(max(int(np.prod(shape)) for *_, shape in blocks), _F32)
        return [buffer[:int(np.prod(shape))].reshape(shape) for *_, shape in blocks]

    def fused_values(self, source: np.ndarray, into: list[np.ndarray] | None = None
                     ) -> list[np.ndarray]:
        """The inputs of each fused tap: (outputs with it, L) float32 each."""
        if into is None:
            into = [np.empty((len(tap.index), source.shape[1]), _F32) for tap in self.fused]
        for tap, values in zip(self.fused, into):
            source.take(tap.index, axis=0, out=values, mode="clip")
        return into

    def fused_sums(self, out: np.ndarray, values: list[np.ndarray]) -> None:
        """Add the fused taps, in order, to the plain sums: out (bands, out_size, L) float32,
        values as fused_values gives them for each band, (bands, outputs, L)."""
        bands, _, length = out.shape
        scratch = _Scratch(_FUSED_BLOCK_VALUES)
        for number, (tap, tap_values) in enumerate(zip(self.fused, values)):
            outputs = len(tap.index)
            if outputs * length <= _FUSED_BLOCK_VALUES:
                weights = self._along(-1 - number, tap.weights, 0, outputs, length)
                step = _FUSED_BLOCK_VALUES // (outputs * length)
                for band in range(0, bands, step):
                    scratch.multiply_add(out[band:band + step], tap.rows,
                                         tap_values[band:band + step], weights)
                continue
            step = max(1, _FUSED_BLOCK_VALUES // length)
            for band in range(bands):
                for start in range(0, outputs, step):
                    stop = min(outputs, start + step)
                    scratch.multiply_add(out[band:band + 1], _part(tap.rows, start, stop),
                                         tap_values[band:band + 1, start:stop],
                                         tap.weights[start:stop])

    def apply(self, source: np.ndarray) -> np.ndarray:
        """source (in_size, L) float32 C-contiguous -> (out_size, L) float32."""
        out = np.empty((self.out_size, source.shape[1]), _F32)
        self.plain_sums(source, out)
        self.fused_sums(out[None], [values[None] for values in self.fused_values(source)])
        return out


class _Scratch:
    """Fused multiply-adds emulated in float64, a block at a time: the product of two float32
    is exact there, and rounding the float64 sum to float32 is what one FMA gives, except
    where that sum lies exactly halfway between two float32 without being exact."""

    def __init__(self, size: int) -> None:
        self.product = np.empty(size, _F64)
        self.total = np.empty(size, _F64)
        self.bits = np.empty(size, np.int64)
        self.halfway = np.empty(size, np.bool_)

    def multiply_add(self, out: np.ndarray, rows: slice | np.ndarray, values: np.ndarray,
                     weights: np.ndarray) -> None:
        """out[:, rows] = fma(values, weights, out[:, rows]) in float32, element by element:
        out (bands, outputs, L), values (bands, rows, L), weights broadcast to values."""
        before = out[:, rows]  # a view for a slice, else a copy written back below
        used = before.size
        product = self.product[:used].reshape(before.shape)
        total = self.total[:used].reshape(before.shape)
        np.multiply(values, weights, out=product)
        np.add(product, before, out=total)
        self._fix_halfway(used, before)
        if isinstance(rows, slice):
            np.copyto(before, total, casting="same_kind")
        else:
            out[:, rows] = total.astype(_F32)

    def _fix_halfway(self, used: int, before: np.ndarray) -> None:
        """Move the inexact halfway totals by a float64 ulp towards the exact sum (whose
        side of halfway decides), so that rounding them to float32 is correct."""
        total = self.total[:used]
        bits, halfway = self.bits[:used], self.halfway[:used]
        np.left_shift(total.view(np.int64), _DROPPED_SHIFT, out=bits)
        np.equal(bits, _HALFWAY, out=halfway)
        if not halfway.any():
            return
        # Exact halfway sums are common with simple weights (a power-of-two scale, say).
        where = np.flatnonzero(halfway)
        s = total.take(where)
        p = self.product[:used].take(where)
        a = np.ravel(before).take(where).astype(_F64)
        b = s - a
        error = (a - (s - b)) + (p - b)  # TwoSum: s + error == a + p exactly
        moved = np.flatnonzero(error)
        if len(moved):
            total[where[moved]] = np.nextafter(s[moved], np.copysign(np.inf, error[moved]))


class Resizer:
    """torch's antialiased bilinear resize of (in_rows, in_cols) float32 images to
    (out_rows, out_cols), bit for bit; build it with `resizer()` (cached)."""

    def __init__(self, in_rows: int, in_cols: int, out_rows: int, out_cols: int) -> None:
        sizes = (in_rows, in_cols, out_rows, out_cols)
        if any(int(size) < 1 for size in sizes):
            raise ValueError(f"sizes must be positive: {sizes}")
        self.in_rows, self.in_cols = int(in_rows), int(in_cols)
        self.out_rows, self.out_cols = int(out_rows), int(out_cols)
        self._across = _Pass(self.in_cols, self.out_cols) if in_cols != out_cols else None
        self._down = _Pass(self.in_rows, self.out_rows) if in_rows != out_rows else None

    def across(self, band: np.ndarray) -> np.ndarray:
        """The horizontal pass alone: (r, in_cols) -> (r, out_cols) float32, for any number of
        rows r; what torch gives for `band` resized to (r, out_cols)."""
        band = np.asarray(band, dtype=_F32)
        if band.ndim != 2 or band.shape[1] != self.in_cols:
            raise ValueError(f"expected (rows, {self.in_cols}), got {band.shape}")
        if self._across is None:
            return band.copy()
        step = self._across
        rows = band.shape[0]
        if not rows:
            return np.empty((0, self.out_cols), _F32)
        size = min(_BAND_ROWS, 1 << (rows - 1).bit_length())  # few sizes: few cached weights
        bands = -(-rows // size)
        # Bands of rows are transposed (each input column a contiguous row), their plain sums
        # made and the inputs of their fused taps gathered; the fused taps are then added
        # for a chunk of bands at once, still in the cache, and the chunk turned back.
        chunk = max(1, min(bands, _CHUNK_VALUES // (self.out_cols * size)))
        sums = np.empty((chunk, self.out_cols, size), _F32)
        fused = [np.empty((chunk, len(tap.index), size), _F32) for tap in step.fused]
        transposed = np.empty((self.in_cols, size), _F32)
        gathered = step.buffers(size)
        out = np.empty((bands * size, self.out_cols), _F32)
        for first_band in range(0, bands, chunk):
            count = min(chunk, bands - first_band)
            for number in range(count):
                start = (first_band + number) * size
                part = band[start:start + size]
                if len(part) < size:
                    transposed[:, len(part):] = 0  # rows past the end, dropped below
                for first in range(0, len(part), _TRANSPOSE_ROWS):
                    piece = part[first:first + _TRANSPOSE_ROWS]
                    np.copyto(transposed[:, first:first + len(piece)], piece.T)
                step.plain_sums(transposed, sums[number], gathered)
                step.fused_values(transposed, [values[number] for values in fused])
            step.fused_sums(sums[:count], [values[:count] for values in fused])
            start = first_band * size
            np.copyto(out[start:start + count * size].reshape(count, size, self.out_cols),
                      sums[:count].transpose(0, 2, 1))
        return out[:rows]

    def down(self, across: np.ndarray) -> np.ndarray:
        """The vertical pass alone: (in_rows, out_cols) -> (out_rows, out_cols) float32."""
        across = np.ascontiguousarray(across, dtype=_F32)
        if across.ndim != 2 or across.shape[0] != self.in_rows:
            raise ValueError(f"expected ({self.in_rows}, columns), got {across.shape}")
        if self._down is None:
            return across.copy()
        if not across.shape[1]:
            return np.empty((self.out_rows, 0), _F32)
        out = self._down.apply(across)
        if across.shape[1] == 1:
            out[1:] = out[0]  # torch's quirk with a single column: see the module docstring
        return out

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(in_rows, in_cols) -> (out_rows, out_cols) float32: across, then down, as torch."""
        image = np.asarray(image, dtype=_F32)
        if image.shape != (self.in_rows, self.in_cols):
            raise ValueError(f"expected {(self.in_rows, self.in_cols)}, got {image.shape}")
        return self.down(self.across(image))


# A resizer holds 1-3 MB of weights and gather plans; sites see a handful of image sizes.
@functools.lru_cache(maxsize=8)
def resizer(in_rows: int, in_cols: int, out_rows: int, out_cols: int) -> Resizer:
    """The (cached) Resizer for these sizes."""
    return Resizer(in_rows, in_cols, out_rows, out_cols)
