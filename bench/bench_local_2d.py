"""2-D local (CLEAR) attention on an image-token grid vs dense attention; ratios measured in one run.

    OMP_NUM_THREADS=1 python bench/bench_local_2d.py --save         # CPU tile path vs SDPA, 64 x 64 grid
    OMP_NUM_THREADS=1 python bench/bench_local_2d.py --flex --backward --save  # + compiled FlexAttention (raster vs
                                                                             # tiled) and forward+backward times

For each text length and radius: the fraction of attention FLOPs kept by an exact sparse kernel (query-key pairs
inside the circle, text pairs included), by a 128 x 128 block-sparse kernel (FlexAttention) over raster and over
tile-ordered layouts, and by the CPU tile path (whole t x t key tiles within reach); then the forward time of
``local_2d_attention`` on the tile path against ``scaled_dot_product_attention`` on the same q/k/v (what the
teacher computes), calls alternating so that machine load hits both alike, median of ``--rounds``. ``--flex`` on
CPU adds FlexAttention compiled for the CPU (forward only; needs a C++ compiler; the first call compiles) over the
raster and the tile-ordered layouts: the block-sparse kernel CUDA uses, run where it can be run. ``--backward``
adds forward+backward times of the dense and the local call (what distillation runs).
``--save`` writes ``bench/results/local-2d-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script, this folder is on sys.path: the 1-D benchmark's alternating timer serves both.
from bench_local_attention import alternate
from reattend.modeling import local_2d
from reattend.modeling.local_2d import (
    block_kept_fraction,
    grid_positions,
    kept_fraction,
    local_2d_attention,
    tile_path_fraction,
)

RESULTS = Path(__file__).resolve().parent / "results"


def describe(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--radii", type=float, nargs="+", default=[8, 16])
    parser.add_argument("--text", type=int, nargs="+", default=[0, 128], help="text tokens (global)")
    parser.add_argument("--heads", type=int, default=16, help="DiT-XL/2, PixArt-alpha: 16 heads x 72; FLUX: 24 x 128")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flex", action="store_true", help="CPU: also time compiled FlexAttention")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    device, (height, width) = args.device, args.grid
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    backend = "tiles" if device == "cpu" else "flex"
    raster, tiled = grid_positions(height, width), grid_positions(height, width, tile=args.tile)
    print(f"{describe(device)}; grid {height}x{width}, heads {args.heads}x{args.head_dim}, tile {args.tile}, "
          f"path {backend}, median of {args.rounds}")
    flex = args.flex and device == "cpu"
    extra = (" flex raster ms | flex tiled ms |" if flex else "") + (" dense fwd+bwd ms | local fwd+bwd ms |"
                                                                     if args.backward else "")
    print(f"| text | r | exact pairs | blocks raster | blocks tiled | tile path | dense ms | local ms | speed-up |{extra}")
    print("|---:" * (9 + 2 * flex + 2 * args.backward) + "|")
    rows = []
    for text in args.text:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, text + height * width, args.head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        for radius in args.radii:
            kwargs = dict(height=height, width=width, radius=radius, text_tokens=text, tile=args.tile,
                          backend=backend)
            fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                   "local": lambda: local_2d_attention(q, k, v, **kwargs)}
            if flex:
                # The op compiles FlexAttention only for CUDA tensors; call its flex path with compilation forced.
                for name, layout in (("flex_raster", None), ("flex_tiled", args.tile)):
                    fns[name] = (lambda layout=layout: local_2d._flex_attention(
                        q, k, v, height, width, float(radius), text, None, None, tile=layout, compiled=True))
            with torch.no_grad():
                times = alternate(fns, device, args.rounds)
            if args.backward:
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                times.update(alternate({
                    "dense_grad": lambda: F.scaled_dot_product_attention(*leaves).sum().backward(),
                    "local_grad": lambda: local_2d_attention(*leaves, **kwargs).sum().backward(),
                }, device, args.rounds))
            row = dict(text_tokens=text, radius=radius, exact_pairs=kept_fraction(raster, radius, text),
                       blocks_raster=block_kept_fraction(raster, radius, text),
                       blocks_tiled=block_kept_fraction(tiled, radius, text),
                       tile_path=tile_path_fraction(height, width, radius, args.tile, text),
                       dense_ms=1e3 * times["dense"], local_ms=1e3 * times["local"],
                       speedup=times["dense"] / times["local"])
            if flex:
                row.update(flex_raster_ms=1e3 * times["flex_raster"], flex_tiled_ms=1e3 * times["flex_tiled"])
            if args.backward:
                row.update(dense_fwd_bwd_ms=1e3 * times["dense_grad"], local_fwd_bwd_ms=1e3 * times["local_grad"])
            rows.append(row)
            print(f"| {text} | {radius:g} | {row['exact_pairs']:.3f} | {row['blocks_raster']:.3f} | "
                  f"{row['blocks_tiled']:.3f} | {row['tile_path']:.3f} | {row['dense_ms']:.0f} | "
                  f"{row['local_ms']:.0f} | {row['speedup']:.2f}x |"
                  + (f" {row['flex_raster_ms']:.0f} | {row['flex_tiled_ms']:.0f} |" if flex else "")
                  + (f" {row['dense_fwd_bwd_ms']:.0f} | {row['local_fwd_bwd_ms']:.0f} |" if args.backward else ""))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        name = "cpu" if device == "cpu" else torch.cuda.get_device_name().replace(" ", "-").lower()
        path = RESULTS / f"local-2d-{name}.json"
        path.write_text(json.dumps(dict(device=describe(device), torch=torch.__version__, grid=[height, width],
                                        heads=args.heads, head_dim=args.head_dim, tile=args.tile, path=backend,
                                        dtype=str(dtype), rounds=args.rounds, rows=rows), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
