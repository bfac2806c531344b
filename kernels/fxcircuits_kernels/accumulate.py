"""Triton kernels for the accumulation behind every patched run (``fxcircuits.patching._Accumulate``).

With keep [N, U, D] (N masks, U upstream nodes, D readers; 1 = clean), rows [U, N, X] (``a_u(other) − a_u(run)``,
X = batch·seq·d_model values per mask) and the output's gradient grad [D, N, X]:

    accumulate:  out[d, n, x]      = stream[n, x] + Σ_u (1 − keep[n, u, d]) · rows[u, n, x]
    grad_keep:   grad_keep[n, u, d] = − Σ_x rows[u, n, x] · grad[d, n, x]          (the EAP edge scores)
    grad_rows:   grad_rows[u, n, x] = Σ_d (1 − keep[n, u, d]) · grad[d, n, x]

Every product is tiled onto ``tl.dot`` with fp32 accumulation, so bf16 and fp16 inputs lose nothing beyond their
own rounding; fp32 inputs get fp32 accuracy from three TF32 products ("tf32x3"), or one where torch allows TF32
matmuls (``torch.backends.cuda.matmul.allow_tf32``), as torch's own products do.  The weights
``1 − keep`` are formed tile by tile in registers and never stored.  Offsets are 64-bit: rows of a large model
hold more than 2³¹ values.  Any size and any strides of keep (``mask_block`` hands a slice) are accepted.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read; fp64 stays on the torch path
# Tile sizes and launch settings measured best on an H100 (torch 2.11, Triton 3.6) for SmolLM2-135M's shapes:
# 300 upstream nodes, 1 or 27 readers, x from 8·14·576 to 32·64·576
BLOCK_X = 128      # values of one mask per program of the mixing products (forward, grad_rows)
BLOCK_IN = 32      # summed-over nodes per step of the mixing products
MAX_OUT = 64       # largest tile of output nodes of the mixing products
BLOCK_K = 64       # values per step of the x reduction of grad_keep
MAX_U, MAX_D = 128, 64   # largest tiles of upstream nodes and readers of grad_keep
PROGRAMS = 1024    # grad_keep splits x until about this many programs run: a few waves over 100+ SMs


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for fp32 tiles (ignored for 16-bit ones).  Not "ieee": Triton computes that
    with FMAs, several times slower than cuBLAS's fp32 path, for no accuracy that tf32x3 lacks."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _dot_type(dtype: torch.dtype):
    """The type ``tl.dot`` multiplies in: the inputs' own, except bf16 under Triton's CPU interpreter, whose dot
    multiplies the raw bits of bf16 tiles (Triton 3.9).  fp32 tiles give the same products there: bf16
    products are exact in fp32, and ``tl.dot`` accumulates in fp32 anyway."""
    interpreted = not isinstance(_mix_kernel, triton.runtime.JITFunction)
    return tl.float32 if interpreted else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                                          torch.float16: tl.float16}[dtype]


def _block(n: int, largest: int) -> int:
    """A tile side covering ``n`` (``tl.dot`` needs at least 16), at most ``largest``."""
    return min(max(triton.next_power_of_2(n), 16), largest)


@triton.jit
def _mix_kernel(keep_ptr, src_ptr, stream_ptr, out_ptr, n_out, n_in, size_x,
                stride_kn, stride_kin, stride_kout, stride_sin, stride_sn, stride_sx, stride_tn, stride_tx,
                stride_oout, stride_on, stride_ox, HAS_STREAM: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_X: tl.constexpr):
    """out[o, n, x] = (stream[n, x]) + Σ_i (1 − keep[n, i, o]) · src[i, n, x]: the forward and grad_rows.

    Tiles are [x, nodes]: x is the long side of the product.  A step whose weights are all 0 (edges kept clean:
    every edge under EAP's keep = 1, nearly every one in a single-edge patch) loads and multiplies nothing.
    That test is a branch, not a load mask: a mask computed from the weights stalls the pipelining of the
    loads (measured 3× slower on an H100)."""
    n = tl.program_id(2).to(tl.int64)
    out = tl.program_id(1).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    x = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    acc = tl.zeros((BLOCK_X, BLOCK_OUT), dtype=tl.float32)
    for first in range(0, n_in, BLOCK_IN):
        inp = first + tl.arange(0, BLOCK_IN).to(tl.int64)
        keep = tl.load(keep_ptr + n * stride_kn + inp[:, None] * stride_kin + out[None, :] * stride_kout,
                       mask=(inp[:, None] < n_in) & (out[None, :] < n_out), other=1.0)
        weight = 1 - keep.to(tl.float32)  # 0 outside the bounds
        if tl.max(tl.abs(weight)) > 0:
            src = tl.load(src_ptr + inp[None, :] * stride_sin + n * stride_sn + x[:, None] * stride_sx,
                          mask=(inp[None, :] < n_in) & (x[:, None] < size_x), other=0.0)
            acc = tl.dot(src.to(DOT), weight.to(src.dtype).to(DOT), acc, input_precision=PRECISION)
    if HAS_STREAM:
        stream = tl.load(stream_ptr + n * stride_tn + x * stride_tx, mask=x < size_x, other=0.0)
        acc += stream.to(tl.float32)[:, None]
    tl.store(out_ptr + out[None, :] * stride_oout + n * stride_on + x[:, None] * stride_ox,
             acc.to(out_ptr.dtype.element_ty), mask=(out[None, :] < n_out) & (x[:, None] < size_x))


@triton.jit
def _scores_kernel(rows_ptr, grad_ptr, part_ptr, n_up, n_readers, size_x, chunk,
                   stride_ru, stride_rn, stride_rx, stride_gd, stride_gn, stride_gx,
                   stride_ps, stride_pn, stride_pu, stride_pd, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, n, u, d] = Σ_{x in chunk s} rows[u, n, x] · grad[d, n, x]: one split of the x reduction."""
    split, n = tl.program_id(0), tl.program_id(2).to(tl.int64)
    tiles_d = tl.cdiv(n_readers, BLOCK_D)
    up = (tl.program_id(1) // tiles_d).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    reader = (tl.program_id(1) % tiles_d).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = split.to(tl.int64) * chunk
    acc = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    for first in range(start, tl.minimum(start + chunk, size_x), BLOCK_K):
        x = first + tl.arange(0, BLOCK_K)
        rows = tl.load(rows_ptr + up[:, None] * stride_ru + n * stride_rn + x[None, :] * stride_rx,
                       mask=(up[:, None] < n_up) & (x[None, :] < size_x), other=0.0)
        grad = tl.load(grad_ptr + reader[None, :] * stride_gd + n * stride_gn + x[:, None] * stride_gx,
                       mask=(reader[None, :] < n_readers) & (x[:, None] < size_x), other=0.0)
        acc = tl.dot(rows.to(DOT), grad.to(DOT), acc, input_precision=PRECISION)
    tl.store(part_ptr + split * stride_ps + n * stride_pn + up[:, None] * stride_pu + reader[None, :] * stride_pd,
             acc, mask=(up[:, None] < n_up) & (reader[None, :] < n_readers))


def _device(t: torch.Tensor):
    """Launch on the tensors' GPU (not the current one); a no-op for the CPU interpreter."""
    return torch.cuda.device(t.device if t.is_cuda else -1)


def _mix(keep: torch.Tensor, src: torch.Tensor, stream: torch.Tensor | None) -> torch.Tensor:
    """out[o, n, x] = (stream[n, x]) + Σ_i (1 − keep[n, i, o]) · src[i, n, x], out in src's dtype."""
    n_masks, n_in, n_out = keep.shape
    size_x = src.shape[2]
    out = src.new_empty(n_out, n_masks, size_x)
    block_out = _block(n_out, MAX_OUT)
    grid = (triton.cdiv(size_x, BLOCK_X), triton.cdiv(n_out, block_out), n_masks)
    has_stream = stream is not None
    stream_strides = stream.stride() if has_stream else (0, 0)
    with _device(src):
        _mix_kernel[grid](keep, src, stream if has_stream else src, out, n_out, n_in, size_x,
                          *keep.stride(), *src.stride(), *stream_strides, *out.stride(),
                          HAS_STREAM=has_stream, DOT=_dot_type(src.dtype), PRECISION=_precision(src.dtype),
                          BLOCK_OUT=block_out, BLOCK_IN=BLOCK_IN, BLOCK_X=BLOCK_X)
    return out


def accumulate(stream: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """stream [N, X], keep [N, U, D], rows [U, N, X] → out [D, N, X] in rows' dtype (the forward)."""
    return _mix(keep, rows, stream)


def grad_rows(keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """keep [N, U, D], grad [D, N, X] → grad_rows [U, N, X] in grad's dtype."""
    return _mix(keep.transpose(1, 2), grad, None)


def grad_keep(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """rows [U, N, X], grad [D, N, X] → grad_keep [N, U, D] in fp32.

    The reduction over x (up to millions of values) is split across programs that write fp32 partial sums,
    added by torch afterwards: unlike atomic adds, the result is the same bit for bit on every run."""
    n_up, n_masks, size_x = rows.shape
    n_readers = grad.shape[0]
    block_u, block_d = _block(n_up, MAX_U), _block(n_readers, MAX_D)
    tiles = triton.cdiv(n_up, block_u) * triton.cdiv(n_readers, block_d)
    splits = min(triton.cdiv(size_x, BLOCK_K), max(1, PROGRAMS // (tiles * n_masks)))
    chunk = triton.cdiv(triton.cdiv(size_x, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(size_x, chunk)
    part = rows.new_empty(splits, n_masks, n_up, n_readers, dtype=torch.float32)
    with _device(rows):
        _scores_kernel[(splits, tiles, n_masks)](rows, grad, part, n_up, n_readers, size_x, chunk,
                                                 *rows.stride(), *grad.stride(), *part.stride(),
                                                 DOT=_dot_type(rows.dtype), PRECISION=_precision(rows.dtype),
                                                 BLOCK_U=block_u, BLOCK_D=block_d, BLOCK_K=BLOCK_K, num_warps=8)
    return part.sum(0).neg_()
