"""Kernel-only GPU timings of the integer kernels, for tile and loop choices (not a user benchmark).

``tfmq-video bench kernels`` times whole calls (quantization pass, Python launch, GEMM) one at a
time with a host sync after each, which is what a layer costs in an eager model. This script
separates the parts, with Triton's ``do_bench`` (CUDA events over many queued launches):

- ``gemm``: the W8A8 GEMM on pre-quantized codes for explicit (BLOCK_M, BLOCK_N, BLOCK_K,
  warps, stages) tiles, in two load forms: the library's pointer loads (``library``) and TMA
  tensor descriptors (``tma``); next to bf16 cuBLAS and ``torch._int_mm`` (cuBLASLt int8 ->
  int32, no epilogue). (Session 10's JSON also has ``ptr``, session 9's kernel, and ``nk``, the
  form the library took from it.)
- ``w4a8``: the library's W4A8 GEMM (autotuned) on the same shapes;
- ``attention``: the INT8 attention kernel alone for explicit tiles, and its Q/K preparation;
- ``layer``: whole ``QuantLinear`` calls, queued (throughput) and synced one by one (latency).

    python tools/gpu_kernel_sweep.py --json out/sweep.json           # on a CUDA machine
    TRITON_INTERPRET=1 python tools/gpu_kernel_sweep.py --smoke      # the code paths, on a CPU
"""

# The closures below are called inside the iteration that defines them (guarded() runs them at
# once), so binding the loop variables late is what is meant.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfmq_video.export.packing import pack_int4  # noqa: E402
from tfmq_video.export.rtn import RTNConfig, rtn_linear_record  # noqa: E402
from tfmq_video.kernels import act_quant, int8_attention, w4a8_gemm, w8a8_gemm  # noqa: E402
from tfmq_video.quant.records import ActivationRecord  # noqa: E402
from tfmq_video.runtime.linear import QuantLinear  # noqa: E402

log = logging.getLogger("sweep")

# (M, K, N): FLUX mlp.0 and STDiT3-XL fc1 at 16k tokens, STDiT3-XL attn.proj at 4k tokens
GEMM_SHAPES = ((16384, 3072, 12288), (16384, 1152, 4608), (4096, 1152, 1152))
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMM_TILES = (
    (128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (256, 128, 128, 8, 3),
    (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4),
)
# (label, heads, head_dim, tokens)
ATTENTION_SHAPES = (("wan 7800 tokens d128", 12, 128, 7800), ("stdit3 1590 tokens d72", 16, 72, 1590))
ATTENTION_TILES = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3))


@triton.jit
def _w8a8_tma_kernel(
    x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """The W8A8 GEMM (symmetric codes, per-row and per-channel scales, bias) with TMA loads and a
    grouped tile order (GROUP_M row tiles share their weight tiles in L2)."""
    pid_m, pid_n = w8a8_gemm.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        a = x_desc.load([off_m, k * BLOCK_K])
        b = w_desc.load([off_n, k * BLOCK_K])
        acc += tl.dot(a, b.T)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    out = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
    out = out * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def gemm_output(x_codes: torch.Tensor, w_codes: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
    """M, N, K of codes (M, K) x (N, K) and an fp16 (M, N) output buffer."""
    M, K = x_codes.shape
    N = w_codes.shape[0]
    return M, N, K, torch.empty(M, N, dtype=torch.float16, device=x_codes.device)


def tma_gemm(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor, tile: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Launch :func:`_w8a8_tma_kernel` with one explicit tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages = tile
    M, N, K, out = gemm_output(x_codes, w_codes)
    x_desc = TensorDescriptor.from_tensor(x_codes, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w_codes, [bn, bk])
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _w8a8_tma_kernel[grid](x_desc, w_desc, x_scale, w_scale, bias, out, M, N, K, BLOCK_M=bm, BLOCK_N=bn,
                           BLOCK_K=bk, GROUP_M=8, NUM_STAGES=stages, num_warps=warps)
    return out


def library_gemm(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor, tile: tuple[int, int, int, int, int]) -> torch.Tensor:
    """The library's W8A8 kernel with one explicit tile and launch shape."""
    bm, bn, bk, warps, stages = tile
    M, N, K, out = gemm_output(x_codes, w_codes)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    w8a8_gemm._w8a8_plain[grid](
        x_codes, w_codes, x_scale, w_scale, w_scale, w_scale, w_scale, bias, out, M, N, K,
        HAS_BIAS=True, HAS_XZERO=False, HAS_WZERO=False, X_PER_ROW=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=w8a8_gemm.GROUP_M, num_warps=warps, num_stages=stages,
    )
    return out


def bench_ms(fn: Callable[[], object], smoke: bool) -> float:
    """Kernel time in ms: CUDA events over queued launches (one plain call in the interpreter)."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def guarded(rows: list[dict], base: dict, fn: Callable[[], dict]) -> None:
    """Append ``base`` + ``fn()``, or ``base`` + the error: one failing variant must not end the sweep."""
    try:
        rows.append({**base, **fn()})
    except Exception as err:  # compile errors (out of shared memory, unsupported layouts) land in the table
        log.warning("%s failed: %s", base, err)
        rows.append({**base, "error": f"{type(err).__name__}: {str(err)[-700:]}"})


def gemm_section(device: torch.device, smoke: bool) -> list[dict]:
    """bf16, _int_mm, library autotuned and explicit tiles of both W8A8 forms, and W4A8."""
    rows: list[dict] = []
    shapes = ((64, 128, 64),) if smoke else GEMM_SHAPES
    tiles = ((32, 32, 32, 4, 2),) if smoke else GEMM_TILES
    for M, K, N in shapes:
        torch.manual_seed(0)
        x_codes = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
        w_codes = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
        x_scale = torch.rand(M, device=device) * 0.01 + 0.001
        w_scale = torch.rand(N, device=device) * 0.01 + 0.001
        bias = torch.randn(N, device=device)
        ref = (x_codes.double() @ w_codes.double().T * x_scale.double()[:, None] * w_scale.double()[None, :]
               + bias.double()).float()
        ops = 2.0 * M * N * K
        shape = {"section": "gemm", "M": M, "K": K, "N": N}

        def timed(fn: Callable[[], torch.Tensor], check: bool = True) -> dict:
            ms = bench_ms(fn, smoke)
            return {"ms": ms, "tops": ops / ms / 1e9, **({"rel_err": rel_err(fn(), ref)} if check else {})}

        if device.type == "cuda":
            xh, wh = torch.randn(M, K, device=device, dtype=torch.bfloat16), torch.randn(N, K, device=device,
                                                                                         dtype=torch.bfloat16)
            guarded(rows, {**shape, "method": "bf16_cublas"}, lambda: timed(lambda: xh @ wh.T, check=False))
            guarded(rows, {**shape, "method": "int_mm_cublaslt"},
                    lambda: timed(lambda: torch._int_mm(x_codes, w_codes.T), check=False))
        guarded(rows, {**shape, "method": "library_autotuned"}, lambda: timed(
            lambda: w8a8_gemm.w8a8_gemm(x_codes, x_scale[:, None], w_codes, w_scale[:, None], bias)))
        for tile in tiles:
            for form, launch in (("library", library_gemm), ("tma", tma_gemm)):
                guarded(rows, {**shape, "method": f"w8a8_{form}", "tile": list(tile)}, lambda launch=launch, tile=tile:
                        timed(lambda: launch(x_codes, x_scale, w_codes, w_scale, bias, tile)))
        packed = pack_int4(w_codes.clamp(-8, 7).cpu(), signed=True).to(device)
        ref4 = w4a8_gemm.w4a8_gemm_ref(x_codes.cpu(), x_scale[:, None].cpu(), packed.cpu(), K, True,
                                        w_scale[:, None].cpu(), bias.cpu()).to(device)
        # The weight in the kernel's layout, as a layer caches it. (Session 10's rows were timed
        # without it: each call also repacked the weight, so its W4A8 kernel-only rows are too slow.)
        split = w4a8_gemm.split_int4(packed, K, 1)

        def w4a8() -> torch.Tensor:
            return w4a8_gemm.w4a8_gemm(x_codes, x_scale[:, None], packed, K, True, w_scale[:, None], bias,
                                       w_split=split)

        guarded(rows, {**shape, "method": "w4a8_library_autotuned_presplit"},
                lambda: {**timed(w4a8, check=False), "rel_err": rel_err(w4a8(), ref4)})
    return rows


def attention_section(device: torch.device, smoke: bool) -> list[dict]:
    """The INT8 attention kernel alone for explicit tiles; the Q/K preparation; fp16 SDPA."""
    rows: list[dict] = []
    shapes = (("smoke", 2, 72, 100),) if smoke else ATTENTION_SHAPES
    tiles = ((32, 32, 4, 2),) if smoke else ATTENTION_TILES
    for label, heads, dim, tokens in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=torch.float16) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        base = {"section": "attention", "shape": label, "tokens": tokens, "head_dim": dim}
        if device.type == "cuda":
            guarded(rows, {**base, "method": "sdpa_fp16"}, lambda: {
                "ms": bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), smoke)})
        for bm, bn, warps, stages in tiles:
            def kernel_only(bm: int = bm, bn: int = bn, warps: int = warps, stages: int = stages) -> dict:
                q_codes, q_scale, k_codes, k_scale = int8_attention.quantize_qk(q, k, None, bm, bn)
                out = torch.empty_like(q)
                grid = (triton.cdiv(tokens, bm), heads)

                def launch() -> torch.Tensor:
                    int8_attention._int8_attention_kernel[grid](
                        q_codes, k_codes, v, q_scale, k_scale, q_scale, out, heads, tokens, tokens, dim,
                        q_scale.shape[-1], k_scale.shape[-1], v.stride(0), v.stride(1), v.stride(2),
                        HAS_MASK=False, BLOCK_M=bm, BLOCK_N=bn,
                        BLOCK_D=max(32, triton.next_power_of_2(dim)), num_warps=warps, num_stages=stages)
                    return out

                return {"ms": bench_ms(launch, smoke), "rel_err": rel_err(launch(), ref)}

            guarded(rows, {**base, "method": "int8_kernel_only", "tile": [bm, bn, warps, stages]}, kernel_only)
        guarded(rows, {**base, "method": "prepare_qk_torch"},
                lambda: {"ms": bench_ms(lambda: int8_attention.prepare_qk(q, k, None), smoke)})
        guarded(rows, {**base, "method": "quantize_qk_triton"},
                lambda: {"ms": bench_ms(lambda: int8_attention.quantize_qk(q, k, None), smoke)})
        guarded(rows, {**base, "method": "int8_attention_call_default_tiles"}, lambda: {
            "ms": bench_ms(lambda: int8_attention.int8_attention(q, k, v), smoke),
            "rel_err": rel_err(int8_attention.int8_attention(q, k, v), ref)})
        qv, kv, vv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # the model's head views
        guarded(rows, {**base, "method": "int8_attention_call_head_views"}, lambda: {
            "ms": bench_ms(lambda: int8_attention.int8_attention(qv, kv, vv), smoke)})
        if device.type == "cuda":
            guarded(rows, {**base, "method": "sdpa_fp16_head_views"}, lambda: {
                "ms": bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qv, kv, vv), smoke)})
    return rows


def layer_section(device: torch.device, smoke: bool) -> list[dict]:
    """Whole QuantLinear calls (quantization pass + GEMM + Python): queued and synced one by one."""
    rows: list[dict] = []
    cases = ((64, 128, 64),) if smoke else ((16384, 3072, 12288), (4096, 1152, 1152), (256, 1152, 1152))
    for M, K, N in cases:
        torch.manual_seed(0)
        linear = nn.Linear(K, N)
        x = torch.randn(M, K, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        static = ActivationRecord("static", 8, True, x.float().abs().max().cpu() / 127, torch.tensor(0.0))
        layers = {
            "half_linear": nn.Linear(K, N).to(device, x.dtype),
            "w8a8_dynamic": QuantLinear(rtn_linear_record("l", linear, RTNConfig(weight_bits=8)), backend="reference"),
            "w8a8_static": QuantLinear(rtn_linear_record("l", linear, RTNConfig(weight_bits=8), static),
                                       backend="reference"),
            "w4a8_dynamic": QuantLinear(rtn_linear_record("l", linear, RTNConfig(weight_bits=4)), backend="reference"),
        }
        for layer in layers.values():
            layer.to(device)
            if isinstance(layer, QuantLinear):
                layer.set_backend("triton")
        for name, layer in layers.items():
            def measure(layer: nn.Module = layer) -> dict:
                with torch.no_grad():
                    queued = bench_ms(lambda: layer(x), smoke)
                    for _ in range(3):
                        layer(x)
                    samples = []
                    for _ in range(1 if smoke else 20):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        layer(x)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        samples.append((time.perf_counter() - start) * 1e3)
                return {"ms_queued": queued, "ms_synced": statistics.median(samples)}

            guarded(rows, {"section": "layer", "M": M, "K": K, "N": N, "method": name}, measure)
        rows.append({"section": "layer", "M": M, "K": K, "N": N, "method": "static_quant_only",
                     "ms": bench_ms(lambda: act_quant.static_quant(x, static.scale.to(device), static.zero_point.to(
                         device), -127, 127, 0), smoke)})
    return rows


def main() -> int:
    """Run the sections, print each row, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one call each (the interpreter)")
    parser.add_argument("--sections", nargs="*", default=["gemm", "attention", "layer"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        parser.error("needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke runs in Triton's interpreter: set TRITON_INTERPRET=1")
    sections = {"gemm": gemm_section, "attention": attention_section, "layer": layer_section}
    rows: list[dict] = []
    for name in args.sections:
        log.info("section %s", name)
        try:
            new = sections[name](device, args.smoke)
        except Exception:
            traceback.print_exc()
            new = [{"section": name, "error": traceback.format_exc()[-500:]}]
        for row in new:
            print(json.dumps(row), flush=True)
        rows += new
        if args.json:
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                                   else "cpu (interpreter)", "triton": triton.__version__,
                                                   "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
