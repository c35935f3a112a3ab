"""The CPU sum-of-squares kernels over the weight gradient each replaces, layer by layer.

diag_fim's weight rules reduce to ``per_sample_sq_sum`` (a linear layer over T positions:
sum_n (g_n^T x_n)^2) and ``conv2d_sq_sum`` (a convolution: the same with im2col patches), where
a plain backward pass computes one weight gradient, sum_n g_n^T x_n. Their ratio is the part of
diag_fim's cost above the floor that the kernels own. Shapes are the layers of the real-model
benchmark (real_models.py: timm ViT-tiny at 64 px with 8 px patches, the GPT-2-style model at
T = 128 with its tied 2000-token head, timm ResNet-18 at 64 px), N = 16; and the weight-
standardised convolutions of ResNet-V2-50 (BiT) at 64 px, whose kernel ``conv2d_residual_sq_sum_``
squares residuals of the per-sample gradients (rules/standardised_conv.py). Each round times
every kernel and its baseline once, interleaved; medians over rounds.

    python benchmarks/sq_sum_kernels.py --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fisher_fast import ops

N = 16
# name: (T, O, I) of a linear layer over T positions
LINEAR = {
    "vit qkv": (65, 576, 192),
    "vit fc1": (65, 768, 192),
    "vit fc2": (65, 192, 768),
    "vit proj": (65, 192, 192),
    "gpt2 c_attn": (128, 384, 128),
    "gpt2 c_fc": (128, 512, 128),
    "gpt2 c_proj (mlp)": (128, 128, 512),
    "gpt2 tied head": (128, 2000, 128),
}
# name: (C, O, input side, kernel, stride, padding) of a convolution
CONV = {
    "resnet18 stem 7x7": (3, 64, 64, 7, 2, 3),
    "resnet18 layer1 3x3": (64, 64, 16, 3, 1, 1),
    "resnet18 layer2 3x3": (128, 128, 8, 3, 1, 1),
    "resnet18 layer3 3x3": (256, 256, 4, 3, 1, 1),
    "resnet18 layer4 3x3": (512, 512, 2, 3, 1, 1),
    "resnet18 layer2 1x1/2": (64, 128, 16, 1, 2, 0),
}
# the same for ResNet-V2-50's standardised convolutions (the residual kernel)
STANDARDISED = {
    "resnetv2 s1 1x1 64>256": (64, 256, 16, 1, 1, 0),
    "resnetv2 s1 3x3": (64, 64, 16, 3, 1, 1),
    "resnetv2 s2 3x3": (128, 128, 8, 3, 1, 1),
    "resnetv2 s2 1x1 512>128": (512, 128, 8, 1, 1, 0),
    "resnetv2 s3 3x3": (256, 256, 4, 3, 1, 1),
    "resnetv2 s3 1x1 1024>256": (1024, 256, 4, 1, 1, 0),
    "resnetv2 s4 3x3": (512, 512, 2, 3, 1, 1),
    "resnetv2 s4 1x1 2048>512": (2048, 512, 2, 1, 1, 0),
    "resnetv2 s4 1x1 512>2048": (512, 2048, 2, 1, 1, 0),
}


def linear_pair(t: int, o: int, i: int) -> tuple[Callable[[], object], Callable[[], object]]:
    g, x = torch.randn(N, 1, t, o), torch.randn(N, 1, t, i)
    g2, x2 = g.reshape(-1, o), x.reshape(-1, i)
    return (lambda: ops.per_sample_sq_sum(g, x, torch.float32)), (lambda: g2.t().mm(x2))


def conv_pair(
    c: int, o: int, side: int, k: int, stride: int, pad: int, residual: bool = False
) -> tuple[Callable[[], object], Callable[[], object]]:
    x = torch.randn(N, c, side, side)
    w = torch.randn(o, c, k, k)
    out = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
    g = torch.randn_like(out)
    geometry = ([k, k], [stride, stride], [pad, pad], [1, 1], 1)
    shift, scale, total = torch.randn(N, o), torch.randn(N, o), torch.zeros_like(w)

    def kernel() -> object:
        if residual:  # into a running total, as the rule adds it
            return ops.conv2d_residual_sq_sum_(total, x, g, shift, scale, w, *geometry)
        return ops.conv2d_sq_sum(x, g, *geometry, torch.float32)

    def weight_grad() -> object:
        return torch.ops.aten.convolution_backward(
            g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [False, True, False]
        )

    return kernel, weight_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="time the layers whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = {name: linear_pair(*shape) for name, shape in LINEAR.items()}
    pairs |= {name: conv_pair(*shape) for name, shape in CONV.items()}
    pairs |= {name: conv_pair(*shape, residual=True) for name, shape in STANDARDISED.items()}
    pairs = {name: pair for name, pair in pairs.items() if args.only in name}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for _ in range(2):  # warm-up
        for kernel, baseline in pairs.values():
            kernel(), baseline()
    for _ in range(args.rounds):
        for name, (kernel, baseline) in pairs.items():
            for fn, store in zip((kernel, baseline), times[name], strict=True):
                start = time.perf_counter()
                fn()
                store.append(time.perf_counter() - start)
    print(f"N = {N}, {args.threads} threads, medians of {args.rounds} interleaved rounds (ms)")
    print(f"{'layer':24s} {'kernel':>8s} {'weight grad':>12s} {'ratio':>6s}")
    totals = {"linear": [0.0, 0.0], "conv": [0.0, 0.0], "standardised": [0.0, 0.0]}
    for name, (kernel_times, base_times) in times.items():
        k, b = statistics.median(kernel_times), statistics.median(base_times)
        kind = "linear" if name in LINEAR else "conv" if name in CONV else "standardised"
        total = totals[kind]
        total[0], total[1] = total[0] + k, total[1] + b
        print(f"{name:24s} {k * 1e3:8.2f} {b * 1e3:12.2f} {k / b:6.2f}")
    for kind, (k, b) in totals.items():
        if b > 0:
            print(f"{'all ' + kind + ' layers':24s} {k * 1e3:8.2f} {b * 1e3:12.2f} {k / b:6.2f}")


if __name__ == "__main__":
    main()
