"""SR(C, s) in inference form in ONE Triton launch on tensor cores (issue #21, gpu.md §3 item 3):
``saffnet_fast_triton::split_resplice_tiled``, the Triton row of the native op of the same
schema (``split_resplice_tiled(x, weights[], biases[], negative_slope, tile_h=0, tile_w=0,
write_carries=True) -> (out, carries)``; carries N×0×H×W when write_carries is False).

The function (saffnet_fast.nn.reference.SplitResplice, eval: BN folded into W_j, b_j, Dropout
the identity): x splits into s slices of w = C/s channels; slice 0 goes to the output; step j
(j = 0 … S−1, S = s − 1) is y_j = LeakyReLU(conv3×3(in_j; W_j) + b_j) with in_0 = slice 1 and
in_j = cat(slice j+1, carry_{j−1}); every y_j but the last keeps its first ceil(c_j/2)
channels for the output and carries the rest. Widths for C = 64: [8, 12, 14, 15, 15, 15, 15].

Design
------
* **Grid**: one program per (spatial tile, image), tile TILE_H × TILE_W (chosen by
  :func:`choose_tile`; 32×48 at SAFFNet's 64×48, 128 programs at batch 64 on 132 SMs).
* **Shrinking halo**: step j computes y_j on the tile plus h_j = S−1−j pixels of halo (what
  step j+1 … S−1 still need), clipped to the image (outside it, every activation is the
  convolution's zero padding, so halo beyond an image border costs nothing); step 0 reads
  its input on the tile ± S.
* **Carries on chip as far as Triton allows**: Triton has no indexable shared memory, so each
  program owns a scratch region in global memory (L2-resident at these sizes): two buffers
  (ping-pong: step j reads one, writes the other) of the clipped (tile ± S) frame, CP channels
  per pixel, pixel-major (a pixel's CP channels contiguous: 16-B vector accesses). Each buffer
  holds exactly the next step's input, ``cat(slice j+1, carry_{j−1})`` zero-padded to CP
  channels, so a step is ONE implicit GEMM. Written by one step, re-read with the 9 shifted
  tap offsets by the next after ``tl.debug_barrier()`` (bar.sync: the CTA's global writes are
  visible to the CTA after it). Bytes per program: 2 · frame_px · CP · sizeof(compute dtype),
  frame_px ≤ (TILE_H + 2S)(TILE_W + 2S): at 32×48 on a 64×48 image, fp16, C = 64:
  2 · 39·48 · 16 · 2 B = 120 KB touched (the allocation is 2 · 46·48 · 16 · 2 B = 141 KB;
  the frame of a tile on the image border is smaller); 18 MB allocated at batch 64.
* **Implicit GEMM per step**: M = the step's region pixels in BLOCK_M chunks (flat index over
  the clipped region), K = 9 taps × CP, N = CP, CP = max(16, next_pow2(2w)) (16 for C ≤ 64,
  32 for C = 128): nine ``tl.dot([BLOCK_M, CP], [CP, CP])`` per chunk accumulating in fp32.
  Operands in the compute dtype: float16 / bfloat16 inputs → f16 / bf16 mma with fp32
  accumulation (carries rounded to the input dtype between steps, as the reference run in
  that dtype does); float32 → fp32 scratch and ``input_precision="tf32x3"`` (three tf32 mma
  per product: tensor cores and ~fp32 accuracy, the 1e-5 parity bound; "ieee" or "tf32"
  selectable with ``FLOAT32_PRECISION``); float64 → ieee (parity under the interpreter).
* **Packed weights, output columns permuted so no register shuffle is needed**: step j's
  weight is packed [9, CP(in), CP(out)] with its kept channels in output columns [0, keep_j)
  and its carried channels in columns [w, w + carry_j). The accumulator tile then holds the
  kept channels where they are stored to the output and the carry exactly where the next
  step's input wants it: next input = where(col < w, slice j+2, y). Zero weight columns and
  bias give LeakyReLU(0) = 0 in the padding, so the scratch never holds garbage that a zero
  weight could turn into NaN. Packed once per set of weight tensors (:func:`packed_params`,
  a cache keyed like fast/bn.py's folded-weight cache, so the fast path's cached folded
  weights are packed once per module), in the compute dtype, bias in fp32 (fp64).
* **Layouts**: every tensor is read and written through its strides (no copy, no
  ``.contiguous(channels_last)``). NHWC (channels_last, the fast path's layout): a pixel's w
  slice channels are one 16-B vector (fp16, w = 8) and each step's kept channels one
  contiguous run per pixel. NCHW: each channel's pixels are contiguous along W, so a chunk's
  loads and stores are coalesced per channel plane instead; the same DRAM bytes (x read once,
  out written once), more address arithmetic (sm_90: 168 registers against 128 for NHWC,
  fp16, neither spills). ``out`` (and the carries) come back in x's layout, like the native
  ops'.
* **Compiled for sm_90** (benchmarks/kernel_report.py, triton 3.8): fp16 / bf16 →
  ``wgmma.m64n16k16.f32.f16.f16`` / ``.bf16`` (126 per kernel: 7 steps × 9 taps × 2),
  float32 → tf32 wgmma (tf32x3); 128–172 registers, no spills, 4.6–6 KB shared memory (the
  dot operands' staging). One pipeline stage (NUM_STAGES): with two, triton issues the tap
  loads as ``cp.async.cg``, which bypasses L1, and the 9 taps would all come from L2.

Cost per call, SAFFNet's SR(64) at 64×48, batch 64, fp16, tile 32×48 (a prediction)
-----------------------------------------------------------------------------------
* DRAM: x read once (25.2 MB) + out written once (25.2 MB) = 50.3 MB = 17 µs at 2.9 TB/s.
  The 7-row halo band two tiles share re-reads 22% of x's slices, from L2. The scratch
  (15.3 MB touched of 18 MB allocated) lives in L2; its dirty lines may be written back
  once when evicted: at most +15 MB (+5 µs).
* L2 traffic (the likely limit): per program, the scratch written once per step (13.6 k
  pixel-steps × 32 B = 436 KB) and read back about once (the 9 taps of a chunk overlap in L1:
  its rows ± 1 pixel), x's slices (~220 KB), out (196 KB): ~1.3 MB × 128 programs = 166 MB,
  24–30 µs at 5.5–7 TB/s.
* Tensor cores: 9·16·16 = 2304 MAC per pixel per step (K and N padded from ≤ 15 to 16),
  × 7 steps × 64·3072 px × 1.09 (halo recompute at 32×48 tiles) = 3.46 GMAC (2.31 GMAC
  without padding and halo) = 6.9 GFLOP: 8.7 µs at 800 TF/s dense fp16, 17–29 µs at the
  30–50% that N = 16 dots with a barrier per tap reach.
* Programs: 2 tiles × 64 images = 128 on 132 SMs: one wave, one CTA (4 warps) per SM.
* Expected: 35–60 µs per call (L2, mma and DRAM overlap only partly with one CTA per SM),
  0.1–0.18 ms for SAFFNet's three SR calls, against the 17 µs byte floor and gpu.md's
  ≤ 0.1 ms per call. float32 (tf32x3, fp32 scratch): 3× the mma, 2× the scratch bytes,
  ~80–120 µs. Only a GPU run confirms these, the tile choice (32×48 against 16×48 with two
  CTAs per SM, 64×48 without halo) and whether L2 keeps the scratch.
"""
from __future__ import annotations

import collections
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._schema import TRITON
from ..split_resplice import register_split_resplice_tiled_autograd
from ._common import INTERPRET, acc_dtype, launch_is_traced_away, next_pow2

__all__ = ["split_resplice_tiled", "launch_split_resplice_tc", "pack_split_resplice",
           "packed_params", "choose_tile", "block_rows", "channel_pad", "sr_widths",
           "FLOAT32_PRECISION", "NUM_SMS"]

# tl.dot input precision for float32 inputs: "tf32x3" keeps the 1e-5 parity bound on tensor
# cores (3 tf32 products: hi·hi + hi·lo + lo·hi); "tf32" is ~2× faster at ~1e-3 relative
# error; "ieee" is FMA, no tensor cores.
FLOAT32_PRECISION = "tf32x3"
# Streaming multiprocessors the tile choice plans for when x is not on a CUDA device (the
# kernel report, the interpreter): an H100 SXM.
NUM_SMS = 132
# Pixels per implicit-GEMM chunk (at most: see block_rows), warps and software-pipeline
# stages per program. One stage: the
# tap loads are then plain L1-cached loads (ld.global.ca) of the scratch region, which the 9
# taps of a chunk re-read from L1; with two, triton turns them into cp.async.cg copies that
# bypass L1, so every tap would come from L2 (9 × 32 B per pixel and step). Under the
# interpreter a chunk is one numpy operation, so a larger one only saves time.
BLOCK_M, NUM_WARPS, NUM_STAGES = 128, 4, 1


def sr_widths(channels: int, steps: int) -> List[int]:
    """Step widths of SR(channels, steps + 1): w, then w + c_{j−1} // 2."""
    w = channels // (steps + 1)
    widths = [w]
    for _ in range(1, steps):
        widths.append(w + widths[-1] // 2)
    return widths


def block_rows(cp: int, dtype: torch.dtype) -> int:
    """BLOCK_M for CP padded channels: 128 rows of 16 or 32 half-precision channels, fewer
    as the tile widens so the accumulator and operands stay in registers (sm_90, 4 warps:
    C = 256 in float16 spills 100 B at 128 rows, 208 registers at 64), and half that for 4-
    and 8-byte dtypes (float32's tf32x3 splits each operand in two: 255 registers at
    128 × 16, 164 at 64 × 16, 222 at 64 × 32)."""
    rows = max(16, min(BLOCK_M, BLOCK_M * 32 // cp))
    return rows if dtype.itemsize == 2 else max(16, rows // 2)


def channel_pad(w: int) -> int:
    """CP: the padded K and N of every step, room for a slice (w) next to a carry (≤ w − 1)
    and for a step's width (≤ 2w − 1); at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(2 * w))


# ------------------------------------------------------------------------------ the kernel


@triton.jit
def _sr_tc_kernel(x_ptr, out_ptr, carries_ptr, w_ptr, b_ptr, scratch_ptr,
                  H, W, TILES_W, TILES, BUF,
                  sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sk_n, sk_c, sk_h, sk_w,
                  slope,
                  STEPS: tl.constexpr, W0: tl.constexpr, CP: tl.constexpr,
                  TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr,
                  WRITE_CARRIES: tl.constexpr, PRECISION: tl.constexpr,
                  DOT_F32: tl.constexpr):
    t = tl.program_id(0)
    n64 = tl.program_id(1).to(tl.int64)
    ty0 = (t // TILES_W) * TILE_H
    tx0 = (t % TILES_W) * TILE_W
    ty1 = tl.minimum(ty0 + TILE_H, H)
    tx1 = tl.minimum(tx0 + TILE_W, W)
    # The scratch frame: step 0's input region (tile ± STEPS, clipped), pixel-major with
    # pitch fw; pixel (iy, ix) of the image at (iy − oy)·fw + (ix − ox).
    oy = tl.maximum(ty0 - STEPS, 0)
    ox = tl.maximum(tx0 - STEPS, 0)
    fw = tl.minimum(tx1 + STEPS, W) - ox
    fh = tl.minimum(ty1 + STEPS, H) - oy
    scr = scratch_ptr + (n64 * TILES + t) * (2 * BUF * CP)
    cols = tl.arange(0, CP)
    lanes = tl.arange(0, BLOCK_M)
    x_img = x_ptr + n64 * sx_n
    o_img = out_ptr + n64 * so_n
    k_img = carries_ptr + n64 * sk_n
    is_slice = (cols < W0)[None, :]

    # Fill: step 0's input (slice 1, zero-padded to CP channels) on the frame; slice 0
    # straight to the output on the tile.
    npx = fh * fw
    for chunk in range(0, tl.cdiv(npx, BLOCK_M)):
        offs = chunk * BLOCK_M + lanes
        valid = offs < npx
        iy = oy + offs // fw
        ix = ox + offs % fw
        x_px = x_img + iy * sx_h + ix * sx_w
        v = tl.load(x_px[:, None] + (W0 + cols)[None, :] * sx_c,
                    mask=valid[:, None] & is_slice, other=0.0)
        tl.store(scr + offs[:, None] * CP + cols[None, :], v.to(scratch_ptr.dtype.element_ty),
                 mask=valid[:, None])
        inside = valid & (iy >= ty0) & (iy < ty1) & (ix >= tx0) & (ix < tx1)
        s0 = tl.load(x_px[:, None] + cols[None, :] * sx_c, mask=inside[:, None] & is_slice)
        tl.store(o_img + (iy * so_h + ix * so_w)[:, None] + cols[None, :] * so_c,
                 s0.to(out_ptr.dtype.element_ty), mask=inside[:, None] & is_slice)
    tl.debug_barrier()

    # The channel plan, as compile-time constants (split_resplice_plan's arithmetic).
    width = W0
    out_off = W0
    carry_off = 0
    for j in tl.static_range(STEPS):
        if j > 0:
            width = W0 + width // 2
        keep = width
        if j < STEPS - 1:
            keep = (width + 1) // 2
        halo = STEPS - 1 - j
        src = scr + (j % 2) * (BUF * CP)
        dst = scr + ((j + 1) % 2) * (BUF * CP)
        ry0 = tl.maximum(ty0 - halo, 0)
        rx0 = tl.maximum(tx0 - halo, 0)
        rw = tl.minimum(tx1 + halo, W) - rx0
        npx = (tl.minimum(ty1 + halo, H) - ry0) * rw
        bias = tl.load(b_ptr + j * CP + cols)
        for chunk in range(0, tl.cdiv(npx, BLOCK_M)):
            offs = chunk * BLOCK_M + lanes
            valid = offs < npx
            iy = ry0 + offs // rw
            ix = rx0 + offs % rw
            acc = tl.zeros([BLOCK_M, CP], dtype=b_ptr.dtype.element_ty)
            for tap in tl.static_range(9):
                sy = iy + (tap // 3 - 1)
                sx = ix + (tap % 3 - 1)
                # outside the image: the convolution's zero padding (never stored)
                ok = valid & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
                a = tl.load(src + ((sy - oy) * fw + (sx - ox))[:, None] * CP + cols[None, :],
                            mask=ok[:, None], other=0.0)
                b = tl.load(w_ptr + ((j * 9 + tap) * CP + cols[:, None]) * CP + cols[None, :])
                if DOT_F32:  # the interpreter's numpy dot has no bfloat16: exact upcast
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION,
                             out_dtype=b_ptr.dtype.element_ty)
            acc += bias[None, :]
            y = tl.where(acc >= 0.0, acc, acc * slope)
            inside = valid & (iy >= ty0) & (iy < ty1) & (ix >= tx0) & (ix < tx1)
            o_px = o_img + (iy * so_h + ix * so_w)
            # kept channels: columns [0, keep) → output channels out_off + column
            tl.store(o_px[:, None] + (out_off + cols)[None, :] * so_c,
                     y.to(out_ptr.dtype.element_ty),
                     mask=inside[:, None] & (cols < keep)[None, :])
            if j < STEPS - 1:
                # the next step's input: slice j+2 in columns [0, w), this step's carry
                # already in columns [w, w + carry) (the packed weights put it there)
                xs = tl.load(x_img + (iy * sx_h + ix * sx_w)[:, None]
                             + ((j + 2) * W0 + cols)[None, :] * sx_c,
                             mask=valid[:, None] & is_slice, other=0.0)
                nxt = tl.where(is_slice, xs.to(y.dtype), y)
                tl.store(dst + ((iy - oy) * fw + (ix - ox))[:, None] * CP + cols[None, :],
                         nxt.to(scratch_ptr.dtype.element_ty), mask=valid[:, None])
                if WRITE_CARRIES:
                    carry_cols = (cols >= W0) & (cols < W0 + width - keep)
                    tl.store(k_img + (iy * sk_h + ix * sk_w)[:, None]
                             + (carry_off - W0 + cols)[None, :] * sk_c,
                             y.to(carries_ptr.dtype.element_ty),
                             mask=inside[:, None] & carry_cols[None, :])
        # every thread's writes of this step before any reads them (and before the next
        # step overwrites the buffer this one read)
        tl.debug_barrier()
        out_off = out_off + keep
        carry_off = carry_off + width - keep


# ------------------------------------------------------------------------- weight packing


def pack_split_resplice(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                        dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W [S, 9, CP, CP] in ``dtype``, b [S, CP] in its arithmetic dtype) as the kernel reads
    them: W[j, 3·ky + kx, i, col(o)] = weights[j][o, i, ky, kx], with col(o) = o for the
    kept channels o < keep_j and w + (o − keep_j) for the carried ones (the last step: o);
    everything else zero."""
    steps = len(weights)
    w0 = int(weights[0].shape[0])
    cp = channel_pad(w0)
    device = weights[0].device
    packed = torch.zeros((steps, 9, cp, cp), dtype=dtype, device=device)
    bias = torch.zeros((steps, cp), dtype=acc_dtype(dtype), device=device)
    for j, (wt, b) in enumerate(zip(weights, biases)):
        c = int(wt.shape[0])
        keep = c if j == steps - 1 else (c + 1) // 2
        cols = torch.tensor(list(range(keep)) + list(range(w0, w0 + c - keep)), device=device)
        taps = wt.detach().to(dtype).permute(2, 3, 1, 0).reshape(9, c, c)  # [tap, in, out]
        packed[j, :, :c, cols] = taps
        bias[j, cols] = b.detach().to(bias.dtype)
    return packed, bias


_PACKED: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_PACKED_MAX = 64


def packed_params(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """pack_split_resplice, cached per set of source tensors (the fast path hands the same
    cached folded tensors every call, so they are packed once per module): keyed like
    fast/bn.py's folded cache on each tensor's id, version counter, storage address, dtype and
    device, with strong references to the sources (no id reused while the entry lives).
    Packed per call under torch.compile tracing (the packing becomes part of the graph) and
    for tensors without a version counter (inference tensors)."""
    sources = (*weights, *biases)
    if torch.compiler.is_compiling() or any(_is_fake(t) for t in sources):
        return pack_split_resplice(weights, biases, dtype)
    try:
        key = (dtype,) + tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                               for t in sources)
    except RuntimeError:  # inference tensors have no version counter
        return pack_split_resplice(weights, biases, dtype)
    entry = _PACKED.get(key)
    if entry is not None:
        _PACKED.move_to_end(key)
        return entry[0]
    with torch.no_grad():
        params = pack_split_resplice(weights, biases, dtype)
    _PACKED[key] = (params, sources)
    if len(_PACKED) > _PACKED_MAX:
        _PACKED.popitem(last=False)
    return params


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


# ------------------------------------------------------------------------------- launcher


def _region_work(tile: int, size: int, halo: int) -> int:
    """Pixels along one axis that a tile of the worst (most interior) position computes with
    this halo, clipped to the image."""
    if tile >= size:
        return size
    # an interior tile if there is one (3+ tiles), else a border tile (halo on one side)
    sides = 2 if -(-size // tile) >= 3 else 1
    return min(size, tile + sides * halo)


def choose_tile(n: int, h: int, w: int, steps: int, sms: int = NUM_SMS) -> Tuple[int, int]:
    """The tile (TILE_H, TILE_W) with the least estimated time: waves of programs over the
    SMs (one program per SM: each runs 4 warps through all steps) × the worst program's
    pixel-steps (tile plus the shrinking halo, clipped); ties to more programs. At 64×48,
    batch 64, 132 SMs: 32×48 (128 programs, 9% recompute)."""
    best = None
    # candidates: the whole extent, or tiles that fit at least twice (no thin remainder)
    for th in sorted({h, *[t for t in (8, 16, 32, 64) if 2 * t <= h]}):
        for tw in sorted({w, *[t for t in (16, 32, 64) if 2 * t <= w]}):
            programs = n * -(-h // th) * -(-w // tw)
            work = sum(_region_work(th, h, s) * _region_work(tw, w, s) for s in range(steps))
            cost = (-(-programs // sms) * work, -programs)
            if best is None or cost < best[0]:
                best = (cost, (min(th, h), min(tw, w)))
    return best[1]


def _alloc_like(x: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """An N×channels×H×W tensor in x's layout: channels_last when x is (and is not also
    contiguous), else contiguous (the native ops' out_like)."""
    n, _, h, w = x.shape
    channels_last = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((n, channels, h, w), dtype=dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last
                       else torch.contiguous_format)


def _outputs(x: torch.Tensor, widths: Sequence[int], write_carries: bool):
    """(out N×C×H×W, carries N×Σcarry×H×W or N×0×H×W), x's dtype and layout."""
    carry_total = sum(cj - (cj + 1) // 2 for cj in widths[:-1]) if write_carries else 0
    return _alloc_like(x, x.shape[1], x.dtype), _alloc_like(x, carry_total, x.dtype)


def check_args(x: torch.Tensor, weights: Sequence[torch.Tensor],
               biases: Sequence[torch.Tensor], op: str = "split_resplice_tiled") -> List[int]:
    """The native op's argument checks (csrc/common/split_resplice_checks.h), each error
    naming the argument; weights / biases may be in any floating dtype (packed once into the
    compute dtype). Returns the step widths."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x: expected a 4-D N×C×H×W tensor, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: x: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    steps = len(weights)
    if steps < 1:
        raise ValueError(f"{op}: weights: expected one 3×3 weight per step, got none")
    if len(biases) != steps:
        raise ValueError(f"{op}: biases: expected {steps} tensors (one per weight), got "
                         f"{len(biases)}")
    n, c, h, w = x.shape
    if c % (steps + 1) != 0:
        raise ValueError(f"{op}: x: expected channels divisible by splits = {steps + 1} "
                         f"(steps + 1), got C = {c}")
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{op}: x: empty tensor (shape {tuple(x.shape)})")
    widths = sr_widths(c, steps)
    for j, (wt, b, cj) in enumerate(zip(weights, biases, widths)):
        if tuple(wt.shape) != (cj, cj, 3, 3):
            raise ValueError(f"{op}: weights[{j}]: expected shape [{cj}, {cj}, 3, 3] for x "
                             f"with C = {c}, got {list(wt.shape)}")
        if tuple(b.shape) != (cj,):
            raise ValueError(f"{op}: biases[{j}]: expected shape [{cj}], got {list(b.shape)}")
        for name, t in ((f"weights[{j}]", wt), (f"biases[{j}]", b)):
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name}: expected a floating-point tensor, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{op}: {name}: expected device {x.device}, got {t.device}")
    return widths


def launch_split_resplice_tc(x: torch.Tensor, weights: Sequence[torch.Tensor],
                             biases: Sequence[torch.Tensor], negative_slope: float,
                             tile_h: int = 0, tile_w: int = 0, write_carries: bool = True,
                             block_m: Optional[int] = None, num_warps: Optional[int] = None,
                             num_stages: Optional[int] = None,
                             float32_precision: Optional[str] = None):
    """(out, carries) of SR in inference form in one launch; see the module docstring.
    tile_h, tile_w: both 0 picks :func:`choose_tile`; carries: N×Σcarry×H×W, or N×0×H×W when
    ``write_carries`` is False."""
    widths = check_args(x, weights, biases)
    n, c, h, w = x.shape
    steps = len(widths)
    # as the native op: both 0 (automatic) or both positive; no upper bound here (no shared
    # memory to fit: a tile larger than the image is the image)
    if not ((tile_h == 0 and tile_w == 0) or (tile_h >= 1 and tile_w >= 1)):
        raise ValueError(f"split_resplice_tiled: tile_h, tile_w: expected both 0 (automatic) "
                         f"or both ≥ 1, got {tile_h}, {tile_w}")
    if tile_h == 0:
        sms = (torch.cuda.get_device_properties(x.device).multi_processor_count
               if x.is_cuda else NUM_SMS)
        tile_h, tile_w = choose_tile(n, h, w, steps, sms)
    tile_h, tile_w = min(tile_h, h), min(tile_w, w)
    if n > 65535:  # the grid's second dimension
        raise ValueError(f"split_resplice_tiled: x: batch {n} over the launch grid's limit "
                         "of 65535 images per call: split the batch")
    w0 = c // (steps + 1)
    cp = channel_pad(w0)
    compute = x.dtype
    packed, bias = packed_params(weights, biases, compute)
    out, carries = _outputs(x, widths, write_carries)
    tiles_w = -(-w // tile_w)
    tiles = -(-h // tile_h) * tiles_w
    buf = min(tile_h + 2 * steps, h) * min(tile_w + 2 * steps, w)
    scratch = torch.empty((n * tiles * 2 * buf * cp,), dtype=compute, device=x.device)
    if x.dtype == torch.float64:
        precision = "ieee"
    elif x.dtype == torch.float32:
        precision = float32_precision or FLOAT32_PRECISION
    else:
        precision = "ieee"  # unused for 16-bit operands (their products are exact in fp32)
    if launch_is_traced_away(x):
        return out, carries
    carries_arg = carries if write_carries else out  # never written when WRITE_CARRIES off
    wrap_triton(_sr_tc_kernel)[(tiles, n)](
        x, out, carries_arg, packed, bias, scratch,
        h, w, tiles_w, tiles, buf, *x.stride(), *out.stride(), *carries_arg.stride(),
        float(negative_slope),
        STEPS=steps, W0=w0, CP=cp, TILE_H=tile_h, TILE_W=tile_w,
        BLOCK_M=block_m or block_rows(cp, compute),
        WRITE_CARRIES=bool(write_carries), PRECISION=precision,
        DOT_F32=INTERPRET and compute == torch.bfloat16,
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES)
    return out, carries


# Registered with torch.library.custom_op and the native schema verbatim
# (csrc/split_resplice.cpp), not triton_op: triton_op (torch 2.13) infers its schema from the
# annotations and ignores the one given, so tile_h / tile_w would read SymInt where the
# native op says int. torch.compile treats the op as one opaque kernel call (its fake
# kernel below gives the shapes), which is all a single launch needs.
@torch.library.custom_op(
    "saffnet_fast_triton::split_resplice_tiled", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor[] biases, float negative_slope, "
           "int tile_h=0, int tile_w=0, bool write_carries=True) -> (Tensor, Tensor)")
def split_resplice_tiled(x: torch.Tensor, weights: List[torch.Tensor],
                         biases: List[torch.Tensor], negative_slope: float, tile_h: int = 0,
                         tile_w: int = 0, write_carries: bool = True
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SR forward, BN folded into (weights, biases), in one launch: (out, carries)."""
    return launch_split_resplice_tc(x, weights, biases, negative_slope, tile_h, tile_w,
                                    write_carries)


@split_resplice_tiled.register_fake
def _split_resplice_tiled_fake(x, weights, biases, negative_slope, tile_h=0, tile_w=0,
                               write_carries=True):
    return _outputs(x, check_args(x, weights, biases), write_carries)


# Its backward: split_resplice's (ATen convolution gradients from out and the carries), as
# for the native op; it refuses write_carries=False.
register_split_resplice_tiled_autograd(TRITON)
