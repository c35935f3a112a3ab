"""diag_fim on Hugging Face models, over the floor and torch.func vmap(grad), interleaved.

Models are built from small configs with random weights (no downloads): a BERT-style encoder
classifier, a Llama-style decoder classifier and a GPT-2-style language model with its tied
head (per-sample loss: cross-entropy summed over the positions). Every round calls each method
once, in turn, on the same batches, after one warm-up call each; medians over rounds. The floor
is one forward and one backward pass of the summed loss per batch (the parameters' batch
gradient). With ``--batches B`` every method covers B batches of N samples: diag_fim plans on its
first batch (a second, small forward pass and the layout checks), so one batch shows that cost
in full and more batches show how it spreads.

    python benchmarks/real_models.py --rounds 10 [--batches 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf

import fisher_fast

# Configuration: sizes that run in seconds on 2 CPU cores.
SEED = 0
N, T, VOCAB, CLASSES = 16, 128, 2000, 4
WIDTH, LAYERS, HEADS = 128, 2, 4


def bert() -> torch.nn.Module:
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, max_position_embeddings=T, num_labels=CLASSES,
    )  # fmt: skip
    return tf.BertForSequenceClassification(cfg)


def llama() -> torch.nn.Module:
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2, intermediate_size=4 * WIDTH, max_position_embeddings=T,
        num_labels=CLASSES, pad_token_id=0,
    )  # fmt: skip
    return tf.LlamaForSequenceClassification(cfg)


def gpt2() -> torch.nn.Module:
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=T)
    return tf.GPT2LMHeadModel(cfg)


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def class_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], bool]] = {
    "bert": (bert, False),
    "llama": (llama, False),
    "gpt2-tied": (gpt2, True),
}


def methods(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lm: bool
) -> dict[str, Any]:
    loss = lm_loss if lm else class_loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def floor() -> None:
        for ids, y in batches:
            torch.autograd.grad(loss(model(input_ids=ids).logits, y).sum(), list(params.values()))

    def fisher() -> None:
        kwargs = {"loss": lm_loss} if lm else {}
        data = [({"input_ids": ids}, y) for ids, y in batches]
        fisher_fast.diag_fim(model, data, progress=False, **kwargs)

    detached = {n: p.detach() for n, p in params.items()}

    def one(values: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, values, (), {"input_ids": x[None]}).logits
        return loss(out, t[None]).sum()

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

    def vmap_grad() -> None:
        for ids, y in batches:
            for x, t in zip(ids.split(4), y.split(4), strict=True):
                for g in per_sample(detached, x, t).values():
                    g.square().sum(0)

    return {"floor": floor, "fisher_fast": fisher, "vmap_grad": vmap_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=1, help="batches of N samples per call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        build, lm = MODELS[name]
        torch.manual_seed(SEED)
        model = build().eval()
        batches = [
            (
                torch.randint(1, VOCAB, (N, T)),
                torch.randint(0, VOCAB if lm else CLASSES, (N, T) if lm else (N,)),
            )
            for _ in range(args.batches)
        ]
        ids, y = batches[0]
        calls = methods(model, batches, lm)
        times: dict[str, list[float]] = {m: [] for m in calls}
        failed: dict[str, str] = {}
        for m, fn in calls.items():  # warm-up
            try:
                fn()
            except Exception as error:
                failed[m] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
        for _ in range(args.rounds):
            for m, fn in calls.items():
                if m in failed:
                    continue
                start = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - start)
        floor = statistics.median(times["floor"])
        paths = fisher_fast.diag_fim(
            model,
            ({"input_ids": ids[:4]}, y[:4]),
            progress=False,
            **({"loss": lm_loss} if lm else {}),
        ).meta["paths"]
        slow = sorted({p for p in paths.values() if not p.startswith("rule")})
        print(
            f"{name}: {args.batches} batch(es) of N={N}, T={T}, {args.threads} threads, "
            f"{args.rounds} rounds, medians"
        )
        for m in calls:
            if m in failed:
                print(f"  {m:<12} fails: {failed[m]}")
            else:
                median = statistics.median(times[m])
                print(f"  {m:<12} {median * 1e3:9.1f} ms  {median / floor:6.2f}x floor")
        print(f"  per-sample paths: {slow}")


if __name__ == "__main__":
    main()
