"""diag_fim on third-party models, over the floor and torch.func vmap(grad), interleaved.

Models are built from small configs with random weights (no downloads): from Hugging Face
transformers a BERT-style encoder classifier, a Llama-style decoder classifier, a GPT-2-style
language model with its tied head, an MPNet encoder classifier (its relative-position bias
expanded to the batch), Mixtral and Qwen3-MoE classifiers (mixtures of 4 and 64 experts), a T5 encoder-decoder (shared embedding tied to the head, relative
position biases; the same ids on both sides) and a Gemma language model (scaled token
embedding tied to the head, padding_idx 0) (language models' per-sample loss:
cross-entropy summed over the positions);
from timm ResNet-18, EfficientNet-B0, a ViT, ConvNeXt-atto, BEiT and EVA-02 (timm needs torchvision, which imports only in
the second environment of ``make timm-check``, torch 2.14.1 with torchvision 0.29.1). Every round
calls each method once, in turn, on the same batches, after one warm-up call each; medians over
rounds, and the median over rounds of each round's ratio to that round's floor (on a machine
whose speed drifts between rounds, the steadier of the two). The floor is one forward and one backward pass of the summed loss per batch (the
parameters' batch gradient). With ``--batches B`` every method covers B batches of N samples.
diag_fim is timed twice: ``fisher_fast_new_plan`` plans on its first batch (a second, small
forward pass and the layout checks), as a first call on a model does, so one batch shows that
cost in full and more batches show how it spreads; ``fisher_fast`` is a repeated call on the
same model, which starts from the plan the last call kept (``reuse_plan``, plan_cache.py).
Models whose library does not import are listed as skipped.

    python benchmarks/real_models.py --rounds 10 [--batches 6] [--models bert vit] [--peers]
    python benchmarks/real_models.py --memory [--batches 6] [--peers]

``--peers`` adds BackPACK, Opacus and nngeometry (``make peers``; in the second environment
``pip install --no-deps -r benchmarks/requirements-peers.txt``); the language models are
handed to them wrapped to take token ids and return logits. ``--memory``
reports each method's peak resident memory above its start instead, each in a fresh process.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from per_sample_losses import class_loss, lm_loss  # beside this file

import fisher_fast

# Configuration: sizes that run in seconds on 2 CPU cores.
SEED = 0
N, T, VOCAB, CLASSES = 16, 128, 2000, 4
WIDTH, LAYERS, HEADS = 128, 2, 4
PIXELS = 64  # side of the timm models' input images
TINY_VIT = dict(img_size=PIXELS, patch_size=8, embed_dim=192, depth=12, num_heads=3)


def _classifier(config: str, model: str, **extra: Any) -> torch.nn.Module:
    """A Hugging Face sequence classifier of the benchmark's sizes (``extra``: the config's own
    fields)."""
    tf = importlib.import_module("transformers")
    cfg = getattr(tf, config)(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, num_labels=CLASSES, **extra,
    )  # fmt: skip
    return getattr(tf, model)(cfg)


def bert() -> torch.nn.Module:
    return _classifier("BertConfig", "BertForSequenceClassification", max_position_embeddings=T)


def llama() -> torch.nn.Module:
    return _classifier(
        "LlamaConfig", "LlamaForSequenceClassification", num_key_value_heads=HEADS // 2,
        max_position_embeddings=T, pad_token_id=0,
    )  # fmt: skip


def gpt2() -> torch.nn.Module:
    tf = importlib.import_module("transformers")
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=T)
    return tf.GPT2LMHeadModel(cfg)


def mpnet() -> torch.nn.Module:
    return _classifier(
        "MPNetConfig", "MPNetForSequenceClassification", max_position_embeddings=T + 2
    )


def mixtral() -> torch.nn.Module:
    return _classifier(
        "MixtralConfig", "MixtralForSequenceClassification", num_key_value_heads=HEADS // 2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=T, pad_token_id=0,
    )  # fmt: skip


def qwen3_moe() -> torch.nn.Module:
    return _classifier(
        "Qwen3MoeConfig", "Qwen3MoeForSequenceClassification", num_key_value_heads=HEADS // 2,
        head_dim=WIDTH // HEADS, moe_intermediate_size=WIDTH // 2, num_experts=64,
        num_experts_per_tok=8, max_position_embeddings=T, pad_token_id=0,
    )  # fmt: skip


def deberta_v3() -> torch.nn.Module:
    return _classifier(
        "DebertaV2Config", "DebertaV2ForSequenceClassification", max_position_embeddings=T,
        relative_attention=True, position_buckets=64, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
        position_biased_input=False,
    )  # fmt: skip


def gemma() -> torch.nn.Module:
    tf = importlib.import_module("transformers")
    cfg = tf.GemmaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2, head_dim=WIDTH // HEADS, intermediate_size=4 * WIDTH,
        max_position_embeddings=T, tie_word_embeddings=True,
    )  # fmt: skip
    return tf.GemmaForCausalLM(cfg)


class T5OnOneSequence(torch.nn.Module):
    """A T5 encoder-decoder reading the same token ids on both sides (so that every method,
    the peers included, takes one ids tensor): shared token embedding tied to the head,
    relative position biases."""

    def __init__(self) -> None:
        super().__init__()
        tf = importlib.import_module("transformers")
        cfg = tf.T5Config(
            vocab_size=VOCAB, d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=4 * WIDTH, num_layers=LAYERS,
            num_decoder_layers=LAYERS, num_heads=HEADS, decoder_start_token_id=0,
        )  # fmt: skip
        self.t5 = tf.T5ForConditionalGeneration(cfg)

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.t5(input_ids=input_ids, decoder_input_ids=input_ids)


def timm_model(name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        timm = importlib.import_module("timm")
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **config)

    return build


@dataclass(frozen=True)
class Spec:
    """A benchmark model: its builder, whether it is a language model (a token per position),
    whether it takes images (else token ids, passed as ``input_ids``) and their side in pixels."""

    build: Callable[[], torch.nn.Module]
    lm: bool = False
    images: bool = False
    pixels: int = PIXELS


MODELS: dict[str, Spec] = {
    "bert": Spec(bert),
    "llama": Spec(llama),
    "gpt2-tied": Spec(gpt2, lm=True),
    "t5": Spec(T5OnOneSequence, lm=True),
    "gemma": Spec(gemma, lm=True),
    # a relative-position bias expanded to the batch, copied and added to the logits in place
    "mpnet": Spec(mpnet),
    # DeBERTa-v3's disentangled attention: the query and key projections applied to the tokens
    # and to the shared relative-position table, which meet in matrix products
    "deberta-v3": Spec(deberta_v3),
    # mixture of experts: a top-2 router over 4 experts held as 3-D parameters (transformers'
    # default experts implementation)
    "mixtral": Spec(mixtral),
    # many small experts: a top-8 router over 64 experts
    "qwen3-moe": Spec(qwen3_moe),
    "resnet18": Spec(timm_model("resnet18"), images=True),
    "resnet18-224": Spec(timm_model("resnet18"), images=True, pixels=224),
    "efficientnet_b0": Spec(timm_model("efficientnet_b0"), images=True),
    "vit": Spec(timm_model("vit_tiny_patch16_224", img_size=PIXELS, patch_size=8), images=True),
    "convnext": Spec(timm_model("convnext_atto"), images=True),
    # BEiT and EVA-02 at the ViT's size: F.linear on the qkv Linear's weight with the query and
    # value biases concatenated (linear_calls.py); EVA-02 with rotary position embeddings
    "beit": Spec(timm_model("beit_base_patch16_224", **TINY_VIT), images=True),
    "eva02": Spec(timm_model("eva02_tiny_patch14_224", img_size=PIXELS, patch_size=8), images=True),
    # Swin V2: cosine attention with a logit scale, and a position-bias MLP run on a constant
    # coordinate table (traced from its call, broadcast_params.py)
    "swinv2": Spec(
        timm_model("swinv2_tiny_window8_256", img_size=PIXELS, window_size=8), images=True
    ),
    # weight-standardised convolutions (the weight transformed in the layer's own forward) with
    # group norms followed by an activation
    "resnetv2-bit": Spec(timm_model("resnetv2_50x1_bit"), images=True),
}


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def call(model: torch.nn.Module, x: Any) -> torch.Tensor:
    return logits(model(**x) if isinstance(x, dict) else model(x))


def methods(model: torch.nn.Module, batches: list[tuple[Any, torch.Tensor]], lm: bool) -> dict:
    loss = lm_loss if lm else class_loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def floor() -> None:
        for x, y in batches:
            torch.autograd.grad(loss(call(model, x), y).sum(), list(params.values()))

    kwargs = {"loss": lm_loss} if lm else {}

    def fisher() -> None:  # a repeated call: it starts from the plan the last call kept
        fisher_fast.diag_fim(model, batches, progress=False, **kwargs)

    def fisher_new_plan() -> None:  # a first call: the first batch is planned
        fisher_fast.diag_fim(model, batches, progress=False, reuse_plan=False, **kwargs)

    detached = {n: p.detach() for n, p in params.items()}

    def one(values: dict[str, torch.Tensor], x: Any, t: torch.Tensor) -> torch.Tensor:
        if isinstance(x, dict):
            out = torch.func.functional_call(model, values, (), {k: v[None] for k, v in x.items()})
        else:
            out = torch.func.functional_call(model, values, (x[None],))
        return loss(logits(out), t[None]).sum()

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

    def chunks(x: Any) -> list[Any]:
        if isinstance(x, dict):
            parts = {k: v.split(4) for k, v in x.items()}
            return [dict(zip(parts, vs, strict=True)) for vs in zip(*parts.values(), strict=True)]
        return list(x.split(4))

    def vmap_grad() -> None:
        for x, y in batches:
            for xc, t in zip(chunks(x), y.split(4), strict=True):
                for g in per_sample(detached, xc, t).values():
                    g.square().sum(0)

    return {
        "floor": floor,
        "fisher_fast": fisher,
        "fisher_fast_new_plan": fisher_new_plan,
        "vmap_grad": vmap_grad,
    }


def make_batches(spec: Spec, count: int) -> list[tuple[Any, torch.Tensor]]:
    if spec.images:
        return [
            (torch.randn(N, 3, spec.pixels, spec.pixels), torch.randint(0, CLASSES, (N,)))
            for _ in range(count)
        ]
    return [
        (
            {"input_ids": torch.randint(1, VOCAB, (N, T))},
            torch.randint(0, VOCAB if spec.lm else CLASSES, (N, T) if spec.lm else (N,)),
        )
        for _ in range(count)
    ]


PEERS = ("backpack_sum_grad_squared", "opacus_grad_sample", "nngeometry_diag_empirical")


class TokensToLogits(torch.nn.Module):
    """A Hugging Face model as the peers take models: token ids in, one logits tensor out,
    classes on axis 1 as ``F.cross_entropy`` reads them (a language model's (N, V, T))."""

    def __init__(self, model: torch.nn.Module, lm: bool) -> None:
        super().__init__()
        self.model, self.lm = model, lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = logits(self.model(input_ids=ids))
        return out.transpose(1, 2) if self.lm else out


def peer_methods(model: torch.nn.Module, batches: list[tuple[Any, torch.Tensor]], lm: bool) -> dict:
    """The peer libraries' empirical diagonal Fisher (fim_baselines.py) over the same batches
    (a language model's loss: cross-entropy averaged over the positions, which costs what the
    sum costs). Each peer works on a copy of the model: one that fails may leave hooks behind."""
    import fim_baselines  # beside this file

    text = isinstance(batches[0][0], dict)
    wrapped = TokensToLogits(model, lm) if text else model
    inputs = [(x["input_ids"] if text else x, y) for x, y in batches]

    def run(method: Callable) -> Callable[[], None]:
        own = copy.deepcopy(wrapped)

        def call() -> None:
            for x, y in inputs:
                method(own, x, y)

        return call

    return {name: run(fim_baselines.METHODS[name].fn) for name in PEERS}


def all_methods(spec: Spec, model: torch.nn.Module, batches: list, peers: bool) -> dict:
    calls = methods(model, batches, spec.lm)
    if peers:
        calls.update(peer_methods(model, batches, spec.lm))
    return calls


def measure_memory(args: argparse.Namespace) -> None:
    """Each method's peak memory in a fresh process of its own: its second call, measured as
    compare_fim.py measures (garbage collected, malloc_trim, VmHWM reset, peak above the
    resident memory before the call)."""
    for name in args.models:
        print(f"{name}: {args.batches} batch(es) of N={N}, peak resident memory above the start")
        results: dict[str, str] = {}
        methods = ("floor", "fisher_fast", "fisher_fast_new_plan", "vmap_grad")
        for method in (*methods, *(PEERS if args.peers else ())):
            command = [sys.executable, __file__, "--models", name, "--batches", str(args.batches)]
            command += ["--threads", str(args.threads), "--memory-of", method]
            command += ["--peers"] if args.peers else []
            done = subprocess.run(command, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            results[method] = lines[-1] if done.returncode == 0 and lines else "fails"
        floor = float(results["floor"]) if results["floor"] != "fails" else float("nan")
        for method, value in results.items():
            if value in ("fails", "skipped"):
                print(f"  {method:<26} {value}")
            else:
                print(f"  {method:<26} {float(value):8.1f} MiB  {float(value) / floor:6.2f}x floor")


def memory_of(args: argparse.Namespace) -> None:
    (name,) = args.models
    spec = MODELS[name]
    torch.manual_seed(SEED)
    model = spec.build().eval()
    calls = all_methods(spec, model, make_batches(spec, args.batches), args.peers)
    if args.memory_of not in calls:
        print("skipped")
        return
    from compare_fim import peak_memory_bytes  # beside this file

    calls[args.memory_of]()  # warm-up: one-time allocations (thread pools, kernel code)
    peak = peak_memory_bytes(calls[args.memory_of])
    print("skipped" if peak is None else f"{peak / 2**20:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=1, help="batches of N samples per call")
    parser.add_argument("--peers", action="store_true", help="also BackPACK, Opacus, nngeometry")
    parser.add_argument("--memory", action="store_true", help="peak memory instead of time")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # one method, in a child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_of(args)
    if args.memory:
        return measure_memory(args)
    for name in args.models:
        spec = MODELS[name]
        torch.manual_seed(SEED)
        try:
            model = spec.build().eval()
        except ImportError as error:
            print(f"{name}: skipped ({error})")
            continue
        batches = make_batches(spec, args.batches)
        lm = spec.lm
        calls = all_methods(spec, model, batches, args.peers)
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
        x, y = batches[0]
        small = ({k: v[:4] for k, v in x.items()} if isinstance(x, dict) else x[:4], y[:4])
        kwargs = {"loss": lm_loss} if lm else {}
        paths = fisher_fast.diag_fim(model, small, progress=False, **kwargs).meta["paths"]
        slow = sorted({p for p in paths.values() if p.startswith("per-sample")})
        print(
            f"{name}: {args.batches} batch(es) of N={N}, "
            + (f"{spec.pixels}x{spec.pixels} px" if spec.images else f"T={T}")
            + f", {args.threads} threads, "
            f"{args.rounds} rounds, medians (and the median of each round's ratio to its own "
            "floor, steadier on a machine whose speed drifts)"
        )
        for m in calls:
            if m in failed:
                print(f"  {m:<26} fails: {failed[m]}")
            else:
                median = statistics.median(times[m])
                per_round = statistics.median(
                    t / f for t, f in zip(times[m], times["floor"], strict=True)
                )
                print(
                    f"  {m:<26} {median * 1e3:9.1f} ms  {median / floor:6.2f}x floor"
                    f"  (rounds: {per_round:.2f}x)"
                )
        print(f"  per-sample paths: {slow}")


if __name__ == "__main__":
    main()
