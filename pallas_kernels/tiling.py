"""Which (query tile, key tile) pairs a scale pattern touches: the static schedule of the kernels.

The sequence is cut into query tiles of `block_q` rows and key tiles of `block_k` columns (the
last of each ragged). Every query row r may attend to the contiguous key range
[starts[r], ends[r]) (`patterns.key_ranges`), and both bounds grow with r, so the key tiles one
query tile touches form a contiguous range, and so do the query tiles one key tile is touched by.

A tile is *full* when every valid row of it attends to every column of it and all its columns are
valid (< L); only the other touched tiles need the mask inside the kernel. Rows >= L of a ragged
query tile never reach memory, so they do not make a tile partial.

Everything here is NumPy at trace time, cached per layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from pallas_kernels import patterns


@dataclasses.dataclass(frozen=True)
class TileSchedule:
  """Touched tiles of one layout, as flat pair lists in two orders.

  Attributes:
    length: L, the true sequence length.
    block_q, block_k: tile sizes.
    num_q_tiles, num_k_tiles: ceil(L / block).
    row_lo, row_hi: (num_q_tiles,) int32, touched key tiles of query tile i are
      [row_lo[i], row_hi[i]).
    row_full_lo, row_full_hi: (num_q_tiles,) int32, the full ones among them are
      [row_full_lo[i], row_full_hi[i]) (an empty range has lo == hi, inside [row_lo, row_hi]).
    col_lo, col_hi, col_full_lo, col_full_hi: the same per key tile over query tiles.
    touched: (num_q_tiles, num_k_tiles) bool.
    full: (num_q_tiles, num_k_tiles) bool.
  """

  length: int
  block_q: int
  block_k: int
  num_q_tiles: int
  num_k_tiles: int
  row_lo: np.ndarray
  row_hi: np.ndarray
  row_full_lo: np.ndarray
  row_full_hi: np.ndarray
  col_lo: np.ndarray
  col_hi: np.ndarray
  col_full_lo: np.ndarray
  col_full_hi: np.ndarray
  touched: np.ndarray
  full: np.ndarray

  @property
  def num_touched(self) -> int:
    return int(self.touched.sum())

  def pairs_by_row(self) -> dict[str, np.ndarray]:
    """Touched pairs ordered by query tile, then key tile (forward and dQ order).

    Returns int32 arrays of one entry per pair: q (query tile), k (key tile), first / last (1 on
    the first / last pair of its query tile), masked (1 if the tile is not full).
    """
    qi, ki = np.nonzero(self.touched)  # row-major: sorted by q, then k
    return _pair_arrays(qi, ki, qi, self.full[qi, ki])

  def pairs_by_col(self) -> dict[str, np.ndarray]:
    """Touched pairs ordered by key tile, then query tile (dK/dV order)."""
    ki, qi = np.nonzero(self.touched.T)
    return _pair_arrays(qi, ki, ki, self.full[qi, ki])


def _pair_arrays(qi, ki, group, full) -> dict[str, np.ndarray]:
  first = np.ones_like(group, dtype=bool)
  first[1:] = group[1:] != group[:-1]
  last = np.ones_like(group, dtype=bool)
  last[:-1] = group[1:] != group[:-1]
  as32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)
  return dict(q=as32(qi), k=as32(ki), first=as32(first), last=as32(last), masked=as32(~full))


def _contiguous_range(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per row of a (n, m) bool array whose True entries are contiguous: [lo, hi), lo == hi if none."""
  any_ = flags.any(axis=1)
  lo = np.where(any_, flags.argmax(axis=1), 0)
  hi = np.where(any_, flags.shape[1] - flags[:, ::-1].argmax(axis=1), 0)
  # Empty ranges sit at the first touched index so that [full_lo, full_hi) stays inside.
  return lo.astype(np.int32), hi.astype(np.int32)


@functools.lru_cache(maxsize=64)
def _schedule(patch_nums: tuple[int, ...], pattern: str, block_q: int, block_k: int) -> TileSchedule:
  starts, ends = patterns.key_ranges(patch_nums, pattern)
  length = len(starts)
  nq = -(-length // block_q)
  nk = -(-length // block_k)
  # Pad rows to whole tiles with an empty range [0, 0) and an 'ignore' flag for fullness.
  pad = nq * block_q - length
  valid = np.concatenate([np.ones(length, bool), np.zeros(pad, bool)]).reshape(nq, block_q)
  s = np.concatenate([starts, np.zeros(pad, np.int32)]).reshape(nq, block_q, 1).astype(np.int64)
  e = np.concatenate([ends, np.zeros(pad, np.int32)]).reshape(nq, block_q, 1).astype(np.int64)
  col_lo = (np.arange(nk) * block_k)[None, None, :]
  col_hi = np.minimum(col_lo + block_k, length)
  # (nq, block_q, nk): row r overlaps / covers key tile j.
  overlaps = (np.maximum(s, col_lo) < np.minimum(e, col_hi)) & valid[..., None]
  covers = ((s <= col_lo) & (e >= col_lo + block_k)) | ~valid[..., None]
  touched = overlaps.any(axis=1)
  full = touched & covers.all(axis=1)
  row_lo, row_hi = _contiguous_range(touched)
  t_lo, t_hi = _contiguous_range(touched.T)
  f_lo, f_hi = _contiguous_range(full)
  nonempty = f_hi > f_lo
  f_lo = np.where(nonempty, f_lo, row_lo).astype(np.int32)
  f_hi = np.where(nonempty, f_hi, row_lo).astype(np.int32)
  cf_lo, cf_hi = _contiguous_range(full.T)
  nonempty = cf_hi > cf_lo
  cf_lo = np.where(nonempty, cf_lo, t_lo).astype(np.int32)
  cf_hi = np.where(nonempty, cf_hi, t_lo).astype(np.int32)
  sched = TileSchedule(
    length=length,
    block_q=block_q,
    block_k=block_k,
    num_q_tiles=nq,
    num_k_tiles=nk,
    row_lo=row_lo,
    row_hi=row_hi,
    row_full_lo=f_lo,
    row_full_hi=f_hi,
    col_lo=t_lo,
    col_hi=t_hi,
    col_full_lo=cf_lo,
    col_full_hi=cf_hi,
    touched=touched,
    full=full,
  )
  _check_contiguous(sched)
  return sched


def _check_contiguous(sched: TileSchedule) -> None:
  """The kernels loop over [lo, hi) ranges: make sure that is exactly the touched / full set."""
  for flags, lo, hi in (
    (sched.touched, sched.row_lo, sched.row_hi),
    (sched.full, sched.row_full_lo, sched.row_full_hi),
    (sched.touched.T, sched.col_lo, sched.col_hi),
    (sched.full.T, sched.col_full_lo, sched.col_full_hi),
  ):
    idx = np.arange(flags.shape[1])[None, :]
    if not np.array_equal(flags, (idx >= lo[:, None]) & (idx < hi[:, None])):
      raise AssertionError("touched/full tiles are not contiguous ranges; tiling logic is wrong")
  if not sched.touched.any(axis=1).all() or not sched.touched.any(axis=0).all():
    raise AssertionError("every tile row and column must be touched at least once")


def tile_schedule(patch_nums: Sequence[int], pattern: str, block_q: int, block_k: int) -> TileSchedule:
  """The touched tiles of `patch_nums` under `pattern` for (block_q, block_k) tiles."""
  patterns.check_pattern(pattern)
  return _schedule(patterns.check_patch_nums(patch_nums), pattern, int(block_q), int(block_k))


def touched_tile_elements(patch_nums: Sequence[int], pattern: str, block: int = 64) -> int:
  """Number of score elements in touched block x block tiles (the tile floor counts these)."""
  return tile_schedule(patch_nums, pattern, block, block).num_touched * block * block


def other_ranges(patch_nums: Sequence[int], pattern: str, side: str) -> tuple[np.ndarray, np.ndarray]:
  """Per row of one side, the contiguous range [lo, hi) of the other side it meets.

  side='query': the keys each query attends to (`patterns.key_ranges`).
  side='key': the queries that attend to each key (block_diagonal: its own scale;
  block_causal: its scale's first row to L). Both bounds are non-decreasing in the row.
  Returns (lo, hi), each (L,) int32.
  """
  if side == "query":
    return patterns.key_ranges(patch_nums, pattern)
  if side != "key":
    raise ValueError(f"side must be 'query' or 'key', got {side!r}")
  bounds = patterns.scale_bounds(patch_nums)
  ids = patterns.scale_ids(patch_nums)
  lo = bounds[ids].astype(np.int32)
  hi = bounds[ids + 1] if pattern == "block_diagonal" else np.full(len(ids), bounds[-1])
  return lo, hi.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RowTiles:
  """The CUDA kernels' schedule: tiles of `block` own rows, each walking `other_block` tiles.

  A program owns rows [own_lo, own_hi) (at most `block`; rows past own_hi load as zeros and are
  never stored) and walks the other side in tiles [other_lo + j * other_block, ...) for
  j < num_other. Tiles j in [full_lo, full_hi) are allowed for every owned row and run without a
  mask; the others are masked per element with the rows' ranges (`other_ranges`).

  Two ways to cut the own rows, and the schedule keeps whichever visits fewer elements:
  * 'scale': tiles start at each scale's first row, so a tile holds one scale and every row of it
    sees the same range: at most its last other-tile is ragged. Scales shorter than a tile are
    packed together. 1024 px block_diagonal forward, 128x64: 24.95M elements instead of 26.31M.
  * 'global': tiles at multiples of `block` (better for block_causal's dK/dV, where a ragged
    scale-aligned key tile would still walk every later query).
  Tiles are ordered longest walk first (stable): with the tile axis fastest in the grid, one
  (batch, head)'s tiles run together, so its keys stay in L2, and the long ones start first.

  Attributes:
    own_lo, own_hi, other_lo, num_other, full_lo, full_hi: (n,) int32; own_hi - own_lo <= block.
  """

  cut: str
  block: int
  other_block: int
  own_lo: np.ndarray
  own_hi: np.ndarray
  other_lo: np.ndarray
  num_other: np.ndarray
  full_lo: np.ndarray
  full_hi: np.ndarray

  @property
  def num_tiles(self) -> int:
    return len(self.own_lo)

  @property
  def visited_elements(self) -> int:
    """Score elements the kernel computes (padding of ragged tiles included)."""
    return int(self.num_other.astype(np.int64).sum()) * self.block * self.other_block

  @property
  def masked_elements(self) -> int:
    masked = self.num_other.astype(np.int64) - (self.full_hi - self.full_lo)
    return int(masked.sum()) * self.block * self.other_block


def _own_ranges(bounds: np.ndarray, block: int, cut: str) -> list[tuple[int, int]]:
  length = int(bounds[-1])
  if cut == "global":
    return [(r, min(r + block, length)) for r in range(0, length, block)]
  out, s, num_scales = [], 0, len(bounds) - 1
  while s < num_scales:
    lo, hi = int(bounds[s]), int(bounds[s + 1])
    if hi - lo >= block:
      out += [(r, min(r + block, hi)) for r in range(lo, hi, block)]
      s += 1
      continue
    t = s  # pack the following short scales while they fit one tile
    while t + 1 < num_scales and bounds[t + 2] - lo <= block:
      t += 1
    out.append((lo, int(bounds[t + 1])))
    s = t + 1
  return out


def _row_tiles(patch_nums, pattern, block, other_block, side, cut) -> RowTiles:
  bounds = patterns.scale_bounds(patch_nums)
  lo_r, hi_r = other_ranges(patch_nums, pattern, side)
  rows = []
  for own_lo, own_hi in _own_ranges(bounds, block, cut):
    a, b = lo_r[own_lo:own_hi], hi_r[own_lo:own_hi]
    origin, end = int(a.min()), int(b.max())
    num = -(-(end - origin) // other_block)
    full_lo = min(num, -(-(int(a.max()) - origin) // other_block))
    full_hi = max(full_lo, min(num, (int(b.min()) - origin) // other_block))
    rows.append((own_lo, own_hi, origin, num, full_lo, full_hi))
  arr = np.asarray(rows, np.int64)
  arr = arr[np.argsort(-arr[:, 3], kind="stable")].astype(np.int32)
  cols = [np.ascontiguousarray(arr[:, i]) for i in range(6)]
  return RowTiles(cut, block, other_block, *cols)


@functools.lru_cache(maxsize=128)
def _best_row_tiles(patch_nums, pattern, block, other_block, side) -> RowTiles:
  options = [_row_tiles(patch_nums, pattern, block, other_block, side, cut) for cut in ("scale", "global")]
  # A masked element costs a compare pair, a select and masked loads on top of an unmasked one;
  # weighting it 1.25 is a guess that only breaks near-ties (e.g. 2240 block_diagonal 64x64).
  return min(options, key=lambda t: t.visited_elements + 0.25 * t.masked_elements)


def row_tiles(
  patch_nums: Sequence[int], pattern: str, block: int, other_block: int, side: str = "query", cut: str | None = None
) -> RowTiles:
  """The kernels' tiles of `patch_nums` (see RowTiles); `cut` forces 'scale' or 'global'."""
  patterns.check_pattern(pattern)
  if side not in ("query", "key"):
    raise ValueError(f"side must be 'query' or 'key', got {side!r}")
  pns = patterns.check_patch_nums(patch_nums)
  if cut is None:
    return _best_row_tiles(pns, pattern, int(block), int(other_block), side)
  if cut not in ("scale", "global"):
    raise ValueError(f"cut must be 'scale' or 'global', got {cut!r}")
  return _row_tiles(pns, pattern, int(block), int(other_block), side, cut)
