"""Linear / hybrid attention kernels vs the reference and softmax attention; prints ratios measured in one run.

    python bench/bench_linear_attention.py --device cpu            # reference path vs SDPA, T = 2K..32K
    python bench/bench_linear_attention.py --device cuda --save    # kernels, T = 1K..64K, decode step

``--save`` writes ``bench/results/<device-name>.json``. Every ratio compares timings taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reattend.modeling import attention_backend, linear_attention_ops as ref

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, device: str, min_time: float = 0.3, max_reps: int = 20) -> float:
    """Median seconds per call after one warm-up call; repeats until ``min_time`` has passed (at least 3 calls).

    A warm-up call that itself takes over a second (long CPU runs) is taken as the measurement.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    if first > 1.0:
        return first
    times = []
    while len(times) < max_reps and (len(times) < 3 or sum(times) < min_time):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn) -> int:
    """Peak bytes allocated during ``fn`` beyond what was allocated before it (CUDA only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def inputs(B, H, T, d, F_dim, dtype, device, requires_grad=False):
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype) for _ in range(3))
    qf, kf = (torch.randn(B, H, T, F_dim, device=device).softmax(-1).to(dtype) for _ in range(2))
    gamma = torch.full((H,), 0.1, device=device)
    tensors = [q, k, v, qf, kf, gamma]
    if requires_grad:
        for x in tensors:
            x.requires_grad_()
    return tensors


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fwd_bwd(fn):
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------------------------------ CPU


def bench_cpu(args) -> dict:
    """Reference (plain PyTorch) linear and hybrid attention vs causal softmax SDPA, forward, float32."""
    B, H, d, F_dim, W = 1, args.heads, args.dim, args.features, args.window
    rows = []
    for T in args.cpu_lengths:
        q, k, v, qf, kf, gamma = inputs(B, H, T, d, F_dim, torch.float32, "cpu")
        with torch.no_grad():
            row = {
                "T": T,
                "linear_ref_s": timed(lambda: ref.chunked_linear_attention(qf, kf, v), "cpu"),
                "hybrid_ref_s": timed(
                    lambda: ref.chunked_hybrid_attention(q, k, v, qf, kf, gamma, window=W, sinks=4, scale=d**-0.5), "cpu"
                ),
                "sdpa_s": timed(lambda: sdpa(q, k, v), "cpu", max_reps=3),
            }
        row["sdpa_over_linear"] = row["sdpa_s"] / row["linear_ref_s"]
        row["sdpa_over_hybrid"] = row["sdpa_s"] / row["hybrid_ref_s"]
        rows.append(row)
        print(
            f"cpu T={T:6d}  linear ref {row['linear_ref_s'] * 1e3:8.1f} ms  hybrid ref {row['hybrid_ref_s'] * 1e3:8.1f} ms"
            f"  SDPA {row['sdpa_s'] * 1e3:9.1f} ms  SDPA/linear {row['sdpa_over_linear']:6.2f}x"
            f"  SDPA/hybrid {row['sdpa_over_hybrid']:6.2f}x",
            flush=True,
        )
    summary = {}
    by_t = {r["T"]: r for r in rows}
    if 4096 in by_t and max(by_t) > 4096:
        hi = max(by_t)
        for key in ("linear_ref_s", "hybrid_ref_s", "sdpa_s"):
            summary[f"{key[:-2]}_scaling_{hi // 1024}k_over_4k"] = by_t[hi][key] / by_t[4096][key]
        summary["ideal_linear_scaling"] = hi / 4096
        summary["ideal_quadratic_scaling"] = (hi / 4096) ** 2
    for key in ("linear", "hybrid"):
        faster = [r["T"] for r in rows if r[f"sdpa_over_{key}"] > 1.0]
        summary[f"{key}_faster_than_sdpa_from_T"] = min(faster) if faster else None
    for name, value in summary.items():
        print(f"cpu {name}: {value:.2f}" if isinstance(value, float) else f"cpu {name}: {value}")
    return {"config": dict(B=B, H=H, d=d, F=F_dim, window=W, sinks=4, dtype="float32"), "rows": rows, "summary": summary}


# ------------------------------------------------------------------------------------------------ GPU


def fla_linear(qf, kf, v):
    """flash-linear-attention's chunk_linear_attn on already feature-mapped q/k, or None if unavailable."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None

    def run():
        # fla takes (B, T, H, K); scale 1 and normalize=True match our normalised output.
        args = (qf.transpose(1, 2), kf.transpose(1, 2), v.transpose(1, 2))
        return chunk_linear_attn(*args, scale=1.0, normalize=True)[0]

    return run


def window_attention(q, k, v, window: int):
    """Sliding-window softmax attention on its own (flex_attention with a block mask), or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    T = q.shape[-2]

    def band(b, h, i, j):
        return (j <= i) & (i - j < window)

    mask = create_block_mask(band, None, None, T, T, device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=mask)


def bench_gpu(args) -> dict:
    B, H, d, F_dim, W = 1, args.heads, args.dim, args.features, args.window
    dtype = torch.bfloat16
    scale = d**-0.5
    rows = []
    for T in args.gpu_lengths:
        q, k, v, qf, kf, gamma = inputs(B, H, T, d, F_dim, dtype, "cuda", requires_grad=True)
        cases = {
            "linear_triton": lambda: attention_backend.linear_attention(qf, kf, v, backend="triton"),
            "linear_ref": lambda: attention_backend.linear_attention(qf, kf, v, backend="reference"),
            "hybrid_triton": lambda: attention_backend.hybrid_attention(
                q, k, v, qf, kf, gamma, window=W, sinks=4, scale=scale, backend="triton"
            ),
            "hybrid_ref": lambda: attention_backend.hybrid_attention(
                q, k, v, qf, kf, gamma, window=W, sinks=4, scale=scale, backend="reference"
            ),
            "sdpa": lambda: sdpa(q, k, v),
        }
        weight = (torch.randn(H, d, F_dim // 2, device="cuda") * d**-0.5).requires_grad_()
        bias = torch.zeros(H, F_dim // 2, device="cuda", requires_grad=True)
        cases["hedgehog_triton"] = lambda: attention_backend.hedgehog_features(q, weight, bias, backend="triton")
        cases["hedgehog_ref"] = lambda: attention_backend.hedgehog_features(q, weight, bias, backend="reference")
        fla = fla_linear(qf, kf, v)
        if fla is not None:
            cases["linear_fla"] = fla
        win = window_attention(q, k, v, W)
        if win is not None:
            # The unfused alternative to the hybrid kernel: linear kernel plus a separate window attention.
            cases["linear_triton+window"] = lambda: (
                attention_backend.linear_attention(qf, kf, v, backend="triton")[0] + win()
            )
        row = {"T": T}
        for name, fn in cases.items():
            try:
                with torch.no_grad():
                    row[f"{name}_fwd_s"] = timed(fn, "cuda")
                    row[f"{name}_fwd_mem"] = peak_memory(fn)
                row[f"{name}_fwdbwd_s"] = timed(fwd_bwd(fn), "cuda")
                row[f"{name}_fwdbwd_mem"] = peak_memory(fwd_bwd(fn))
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_error"] = "out of memory"
            except Exception as exc:  # a missing optional baseline must not stop the others
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
            for x in (q, k, v, qf, kf, gamma, weight, bias):
                x.grad = None
            torch.cuda.empty_cache()
        for base in ("linear_ref", "linear_fla", "sdpa"):
            for mode in ("fwd", "fwdbwd"):
                if f"{base}_{mode}_s" in row and "linear_triton_fwd_s" in row:
                    row[f"{base}_over_linear_triton_{mode}"] = row[f"{base}_{mode}_s"] / row[f"linear_triton_{mode}_s"]
        for base in ("hybrid_ref", "linear_triton+window", "sdpa"):
            for mode in ("fwd", "fwdbwd"):
                if f"{base}_{mode}_s" in row and "hybrid_triton_fwd_s" in row:
                    row[f"{base}_over_hybrid_triton_{mode}"] = row[f"{base}_{mode}_s"] / row[f"hybrid_triton_{mode}_s"]
        for mode in ("fwd", "fwdbwd"):
            if f"hedgehog_triton_{mode}_s" in row and f"hedgehog_ref_{mode}_s" in row:
                row[f"hedgehog_ref_over_triton_{mode}"] = row[f"hedgehog_ref_{mode}_s"] / row[f"hedgehog_triton_{mode}_s"]
        rows.append(row)
        print(f"cuda T={T}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "T"), flush=True)
    return {
        "config": dict(B=B, H=H, d=d, F=F_dim, window=W, sinks=4, dtype="bfloat16"),
        "rows": rows,
        "decode": bench_decode(args),
    }


def bench_decode(args) -> dict:
    """One fused hybrid decode step per layer vs the bytes it must move at the copy bandwidth measured here."""
    B, H, d, F_dim, W, sinks = args.decode_batch, args.heads, args.dim, args.features, args.window, 4
    dtype = torch.bfloat16
    L = W + sinks
    q = torch.randn(B, H, 1, d, device="cuda", dtype=dtype)
    qf = torch.randn(B, H, 1, F_dim, device="cuda").softmax(-1).to(dtype)
    k, v = (torch.randn(B, H, L, d, device="cuda", dtype=dtype) for _ in range(2))
    kl = torch.randn(B, H, 1, F_dim, device="cuda").softmax(-1).to(dtype)
    vl = torch.randn(B, H, 1, d, device="cuda", dtype=dtype)
    state = torch.rand(B, H, F_dim, d + 1, device="cuda")
    gamma = torch.full((H,), 0.1, device="cuda")

    def step(backend):
        return lambda: attention_backend.hybrid_decode_step(
            q, qf, k, v, state, gamma, scale=d**-0.5, k_feat_leaving=kl, v_leaving=vl, backend=backend
        )

    buf = torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8)
    out = torch.empty_like(buf)
    copy_s = timed(lambda: out.copy_(buf), "cuda")
    bandwidth = 2 * buf.numel() / copy_s  # read + write
    state_bytes = state.numel() * 4
    moved = 2 * state_bytes + sum(x.numel() * x.element_size() for x in (q, qf, k, v, kl, vl)) + q.numel() * 2
    with torch.no_grad():
        triton_s = timed(step("triton"), "cuda")
        ref_s = timed(step("reference"), "cuda")
    result = dict(
        B=B, H=H, d=d, F=F_dim, softmax_keys=L, bytes_moved=moved, copy_bandwidth_Bps=bandwidth,
        bound_s=moved / bandwidth, triton_s=triton_s, reference_s=ref_s,
        triton_over_bound=triton_s / (moved / bandwidth), reference_over_triton=ref_s / triton_s,
    )
    print("cuda decode: " + "  ".join(f"{k}={_fmt(v)}" for k, v in result.items()), flush=True)
    return result


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heads", type=int, default=None, help="default 9 on CPU, 16 on CUDA")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=128, help="feature dimension (Hedgehog 2f, f=64)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--cpu-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--gpu-lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--save", action="store_true", help="write bench/results/<device-name>.json")
    args = parser.parse_args(argv)
    if args.heads is None:
        args.heads = 16 if args.device == "cuda" else 9
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    torch.manual_seed(0)
    result = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        # Shared machines: the 1-minute load average before and after says how contended the timings were.
        "load_average_before": os.getloadavg()[0],
    }
    if args.device == "cuda":
        import triton

        result["triton"] = triton.__version__
        result["gpu"] = bench_gpu(args)
    else:
        result["cpu"] = bench_cpu(args)
    result["load_average_after"] = os.getloadavg()[0]
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{result['device']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
