"""Local (sliding-window + sink) attention vs the teacher's full causal attention; ratios measured in one run.

    python bench/bench_local_attention.py                       # CPU, SmolLM2-135M head shapes, T = 1K..8K
    python bench/bench_local_attention.py --device cuda --save  # FlexAttention block mask on a GPU

Prefill: ``local_attention`` (chunked SDPA on CPU, compiled FlexAttention on CUDA) against SDPA with
``is_causal`` on the same q/k/v, the call the teacher's attention makes. Decode: one query against the W - 1 + S
cached keys vs against all T. Teacher and student calls alternate so machine load hits both alike.
``--save`` writes ``bench/results/local-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reattend.modeling.local_attention import local_attention, local_mask

RESULTS = Path(__file__).resolve().parent / "results"


def alternate(fns: dict, device: str, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``rounds`` times after one warm-up each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    device, scale = args.device, args.head_dim ** -0.5
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    print(f"device {device}, threads {torch.get_num_threads()}, heads {args.heads}/{args.kv_heads}x{args.head_dim}, "
          f"sinks {args.sinks}")
    print("| T | W | teacher prefill ms | local prefill ms | speed-up | teacher decode ms | local decode ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for T in args.lengths:
        torch.manual_seed(0)
        q = torch.randn(1, args.heads, T, args.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, args.kv_heads, T, args.head_dim, device=device, dtype=dtype) for _ in range(2))
        for W in args.windows:
            kept = torch.cat([torch.arange(args.sinks), torch.arange(T - W + 1, T)]).to(device)
            q1, k_kept, v_kept = q[:, :, -1:], k[:, :, kept], v[:, :, kept]
            decode_mask = local_mask(torch.tensor([T - 1], device=device), kept, W, args.sinks)
            fns = {
                "teacher_prefill": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                          enable_gqa=True),
                "local_prefill": lambda: local_attention(q, k, v, window=W, sinks=args.sinks, scale=scale),
                "teacher_decode": lambda: F.scaled_dot_product_attention(q1, k, v, scale=scale, enable_gqa=True),
                "local_decode": lambda: F.scaled_dot_product_attention(q1, k_kept, v_kept, attn_mask=decode_mask,
                                                                       scale=scale, enable_gqa=True),
            }
            with torch.no_grad():
                t = alternate(fns, device, args.rounds)
            row = {"T": T, "W": W, "S": args.sinks, **{k_: round(v_ * 1e3, 3) for k_, v_ in t.items()},
                   "prefill_speedup": round(t["teacher_prefill"] / t["local_prefill"], 2),
                   "decode_speedup": round(t["teacher_decode"] / t["local_decode"], 2)}
            rows.append(row)
            print(f"| {T} | {W} | {row['teacher_prefill']:.1f} | {row['local_prefill']:.1f} | "
                  f"{row['prefill_speedup']:.2f}x | {row['teacher_decode']:.3f} | {row['local_decode']:.3f} | "
                  f"{row['decode_speedup']:.2f}x |")
    if args.save:
        name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{torch.get_num_threads()}thread"
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"local-{name.replace(' ', '-').lower()}.json"
        path.write_text(json.dumps({"device": name, "torch": torch.__version__, "python": platform.python_version(),
                                    "rows": rows}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
