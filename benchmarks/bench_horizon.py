"""Benchmark: cost of a layer-horizon sweep against plain forward passes of the probe batch.

Target: sweep time <= 1.2 x the time of K + 1 plain forward passes of the probe batch (K horizons;
the probe runs one clean forward and then the K windowed copies of the batch: by default in one hooked
forward on CUDA and one forward per copy on CPU; the other choice is timed too). Everything is timed in this one process: each round runs the
K + 1 plain forwards and then every sweep variant, and the best round of each is compared (CPU time
of this process on CPU, so other jobs on a shared machine inflate both sides less; wall clock on CUDA).

    python benchmarks/bench_horizon.py                # CPU, 1 thread
    python benchmarks/bench_horizon.py --device cuda --d-model 768 --layers 12 --batch 16 --seq 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)
from residual_dynamics.probes.layer_horizon import layer_horizon


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ks", default="1,2,3,4,6,8", help="comma-separated horizons")
    parser.add_argument("--rounds", type=int, default=8)
    return parser.parse_args()


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    cfg = TransformerBridgeConfig(
        d_model=args.d_model,
        d_head=args.d_model // args.heads,
        n_heads=args.heads,
        n_layers=args.layers,
        n_ctx=args.seq,
        d_vocab=args.vocab,
        act_fn="gelu",
        normalization_type="LN",
        d_mlp=4 * args.d_model,
        seed=0,
    )
    bridge = TransformerBridge.boot_native(cfg, device=args.device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)

    def plain() -> None:
        with torch.no_grad():
            for _ in range(len(ks) + 1):
                bridge(tokens)

    def sweep(**options):
        return lambda: layer_horizon(bridge, tokens, ks=ks, **options)

    one_forward = len(ks) * args.batch
    variants = {
        "clean, default max_batch": sweep(mode="clean"),
        "clean, one hooked forward": sweep(mode="clean", max_batch=one_forward),
        "same_pass+unembed window, default max_batch": sweep(mode="same_pass", unembed_reads_window=True),
        "same_pass+unembed window, one hooked forward": sweep(
            mode="same_pass", unembed_reads_window=True, max_batch=one_forward
        ),
    }
    runs = {"plain": plain, **variants}
    for fn in runs.values():  # warm up
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            seconds[name].append(timed(fn, args.device))

    best_plain = min(seconds["plain"])
    print(
        f"native LN model d_model={args.d_model} layers={args.layers} vocab={args.vocab}; "
        f"batch {args.batch}x{args.seq}; device {args.device}, {args.threads} thread(s); K={len(ks)} ks={ks}; "
        f"best of {args.rounds} rounds"
    )
    print(f"{'':<45} {'seconds':>8} {'median':>8} {'ratio':>7}")
    plain_name = f"{len(ks) + 1} plain forwards (K + 1)"
    print(f"{plain_name:<45} {best_plain:>8.3f} {statistics.median(seconds['plain']):>8.3f}")
    for name in variants:
        best = min(seconds[name])
        print(f"{name:<45} {best:>8.3f} {statistics.median(seconds[name]):>8.3f} {best / best_plain:>7.3f}")
    print("target: ratio <= 1.2")


if __name__ == "__main__":
    main()
