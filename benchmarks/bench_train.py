"""Training throughput, side by side in one process: our model under Lightning vs the same model in a bare
PyTorch loop vs a TransformerLens ``boot_native`` model of the same shape trained the same way.

    python benchmarks/bench_train.py                 # CPU, the issue's shape
    python benchmarks/bench_train.py --device cuda --steps 50 --precision bf16

Shape (issue #2): 4 layers, d_model 256, 8 heads, d_mlp 1024, n_ctx 256, vocabulary 8192, batch 16.
Each contender runs ``--warmup`` untimed steps, then ``--rounds`` rounds of ``--steps`` timed steps; the
rounds are interleaved (A, B, C, A, B, C, ...) so machine noise hits all three alike, and the median
round is reported. Prints tokens/s and the ratios: Lightning overhead vs the bare loop (target <= 10%)
and our model vs the TransformerLens model (target >= 1.3x).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from residual_dynamics.training.model import ModelConfig, Transformer
from residual_dynamics.training.optim import OptimConfig, build_optimizer

SHAPE = dict(n_layers=4, d_model=256, n_heads=8, d_mlp=1024, n_ctx=256, d_vocab=8192)
BATCH = 16


def batches(n: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["d_vocab"], (BATCH, SHAPE["n_ctx"] + 1), generator=g).to(device) for _ in range(n)]


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class BareLoop:
    """The loop Lightning runs, without Lightning: forward, backward, clip, AdamW step."""

    def __init__(self, loss_fn, params, optimizer, device, precision):
        self.loss_fn, self.params, self.opt = loss_fn, list(params), optimizer
        self.device, self.precision = device, precision

    def run(self, data):
        for batch in data:
            with autocast(self.device, self.precision):
                loss = self.loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.device)


def ours_bare(device, precision) -> BareLoop:
    """Our model with our AdamW parameter groups."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE)).to(device)
    return BareLoop(model.loss, model.parameters(), build_optimizer(model, OptimConfig()), device, precision)


def transformer_lens_bare(device, precision) -> BareLoop:
    """A TransformerLens ``boot_native`` bridge of the same shape, trained by the same loop."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401

    cfg = TransformerBridgeConfig(d_model=SHAPE["d_model"], d_head=SHAPE["d_model"] // SHAPE["n_heads"],
                                  n_heads=SHAPE["n_heads"], n_layers=SHAPE["n_layers"], n_ctx=SHAPE["n_ctx"],
                                  d_vocab=SHAPE["d_vocab"], d_mlp=SHAPE["d_mlp"], act_fn="gelu",
                                  normalization_type="LN", seed=0)
    bridge = TransformerBridge.boot_native(cfg, device=device)
    bridge.train()

    def loss(batch):
        logits = bridge(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    return BareLoop(loss, bridge.parameters(), optimizer, device, precision)


class LightningRun:
    """Our model in LitTransformer under a Lightning Trainer (no logger, checkpoints or progress bar)."""

    def __init__(self, device, precision):
        import lightning as L

        from residual_dynamics.training.lit import LitTransformer

        torch.manual_seed(0)
        self.lit = LitTransformer(ModelConfig(**SHAPE), OptimConfig(), max_steps=10**9)
        self.L, self.device, self.precision = L, device, precision

    def run(self, data):
        accelerator = "gpu" if torch.device(self.device).type == "cuda" else "cpu"
        trainer = self.L.Trainer(
            accelerator=accelerator, devices=1, max_steps=len(data), logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
            precision="bf16-mixed" if self.precision == "bf16" else "32-true", limit_val_batches=0,
        )
        self.lit.max_steps = len(data)
        # a fresh Trainer per round restarts the step counter; the model and its weights carry on
        trainer.fit(self.lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
        sync(self.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    contenders = {"lightning": LightningRun, "bare_loop": ours_bare, "transformer_lens": transformer_lens_bare}
    runners = {name: make(args.device, args.precision) for name, make in contenders.items()}
    for runner in runners.values():  # warmup
        runner.run(batches(args.warmup, args.device, seed=1))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        data = batches(args.steps, args.device, seed=100 + r)
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(data)
            times[name].append(time.perf_counter() - start)
    tokens = args.steps * BATCH * SHAPE["n_ctx"]
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"device={args.device} precision={args.precision} shape={SHAPE} batch={BATCH} "
          f"steps/round={args.steps} rounds={args.rounds} threads={torch.get_num_threads()}")
    for name, value in tps.items():
        print(f"  {name:17s} {value:10.0f} tokens/s")
    overhead = tps["bare_loop"] / tps["lightning"] - 1
    print(f"Lightning overhead vs bare loop: {100 * overhead:+.1f}%  (target <= +10%)")
    print(f"ours (Lightning) / TransformerLens: {tps['lightning'] / tps['transformer_lens']:.2f}x  (target >= 1.3x)")
    print(f"ours (bare loop) / TransformerLens: {tps['bare_loop'] / tps['transformer_lens']:.2f}x")


if __name__ == "__main__":
    main()
