"""diag_fim on timm's vision models, against a float64 per-sample autograd loop.

Models built from small configs (random weights, no downloads), BatchNorm with non-trivial
running statistics, data in two batches, in float64 (error ≤ 1e-10) and float32 (≤ 1e-5).

timm needs torchvision, which does not import beside the CPU build of torch this project's
main environment uses, so these tests run in a second environment (``make timm-check``: torch
2.14.1 with torchvision 0.29.1, on the CPU). Elsewhere they are skipped, unless
``FISHER_FAST_REQUIRE_TIMM=1`` (set by ``make timm-check``) turns the missing import into a
failure.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fim_reference import (
    batchnorm_stats_randomised,
    float32_bound,
    max_relative_error,
    reference_fim_batches,
)
from torch import nn

import fisher_fast
from fisher_fast.fim.coupled_samples import CoupledGradientsWarning

N, CLASSES = 4, 3


def _timm() -> Any:
    if os.environ.get("FISHER_FAST_REQUIRE_TIMM") == "1":
        import timm  # a failure here is the point: the second environment must have timm

        return timm
    return pytest.importorskip("timm")


def _model(name: str, **config: Any) -> nn.Module:
    return _timm().create_model(name, pretrained=False, num_classes=CLASSES, **config)


def _vit_config(**extra: Any) -> dict[str, Any]:
    return dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, **extra)


SWIN_CONFIG: dict[str, Any] = dict(  # block 1 of stage 0: shifted windows (the mask added)
    img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(2, 1), num_heads=(1, 2)
)


def _fused_swin() -> nn.Module:
    """Swin with its experimental fused attention: the bias table's gather, plus the shifted
    windows' mask, is scaled_dot_product_attention's attention mask."""
    model = _model("swin_tiny_patch4_window7_224", **SWIN_CONFIG)
    for module in model.modules():
        if hasattr(module, "relative_position_bias_table"):
            module.fused_attn = True
    return model


# name -> (model factory, input side in pixels)
def _resnetv2_bit() -> nn.Module:
    """BiT's ResNet-V2: weight-standardised convolutions (StdConv2d) after GroupNormAct."""
    _timm()
    layers = importlib.import_module("timm.layers")
    resnetv2 = importlib.import_module("timm.models.resnetv2")
    return resnetv2.ResNetV2(
        layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), stem_chs=16, num_classes=CLASSES,
        stem_type="fixed", norm_layer=functools.partial(layers.GroupNormAct, num_groups=4),
        conv_layer=functools.partial(layers.StdConv2d, eps=1e-8),
    )  # fmt: skip


def _nf_resnet() -> nn.Module:
    """A normaliser-free ResNet: ScaledStdConv2d, a learned gain per output channel; its deep
    stem and final convolution are followed by SiLU in place, which changes their outputs."""
    _timm()
    nfnet = importlib.import_module("timm.models.nfnet")
    config = nfnet.NfCfg(
        depths=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_chs=16, stem_type="deep_quad",
        bottle_ratio=0.25, group_size=None, act_layer="silu", attn_layer=None, num_features=64,
    )  # fmt: skip
    return nfnet.NormFreeNet(config, num_classes=CLASSES)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: _model("resnet18"), 32),
    "efficientnet_b0": (lambda: _model("efficientnet_b0"), 32),
    "vit": (lambda: _model("vit_tiny_patch16_224", **_vit_config()), 16),
    "deit_distilled": (
        lambda: _model("deit_tiny_distilled_patch16_224", **_vit_config()),
        16,
    ),
    "convnext": (lambda: _model("convnext_atto"), 32),
    "convnextv2": (lambda: _model("convnextv2_atto"), 32),
    "beit": (lambda: _model("beit_base_patch16_224", **_vit_config()), 16),
    "beit_no_qkv_bias": (
        lambda: _model("beit_base_patch16_224", **_vit_config(qkv_bias=False)),
        16,
    ),
    "eva02": (lambda: _model("eva02_tiny_patch14_224", **_vit_config()), 16),
    "swinv2": (lambda: _model("swinv2_tiny_window8_256", **SWIN_CONFIG), 32),
    "cait": (lambda: _model("cait_xxs24_224", **_vit_config()), 16),
    "swin": (lambda: _model("swin_tiny_patch4_window7_224", **SWIN_CONFIG), 32),
    "swin_fused": (_fused_swin, 32),
    "mobilenetv3": (lambda: _model("mobilenetv3_small_050"), 32),
    "regnet": (lambda: _model("regnetx_002"), 32),
    "poolformerv2": (lambda: _model("poolformerv2_s12"), 32),  # norms with no bias
    "resnetv2_bit": (_resnetv2_bit, 32),
    "nf_resnet": (_nf_resnet, 32),
    # batch norms read as tokens (a transpose after the norm): PyTorch's CPU backward of a
    # batch of one is wrong there, for the tests' reference loop as for diag_fim
    "xcit": (lambda: _model("xcit_nano_12_p16_224", img_size=32, depth=2), 32),
}


def _problem(name: str, dtype: torch.dtype, gen: torch.Generator) -> tuple[nn.Module, list]:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    factory, side = MODELS[name]
    model = batchnorm_stats_randomised(factory().to(dtype).eval(), gen)
    data = [
        (torch.randn(N, 3, side, side, generator=gen, dtype=dtype), torch.randint(CLASSES, (N,)))
        for _ in range(2)
    ]
    return model, data


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_the_per_sample_loop(name: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    model, data = _problem(name, dtype, gen)
    reference = reference_fim_batches(model, data)  # before diag_fim: some models cache in eval
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    assert set(fim.names) == set(reference), "every trainable parameter gets an entry"
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    if dtype == torch.float32 and errors[worst] > bound:  # the model's own float32 rounding?
        bound = float32_bound(model, data, reference)
    assert errors[worst] <= bound, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"


# parameter -> the path that must handle it (the fast path where a rule applies)
FAST_PATHS: dict[str, dict[str, str]] = {
    "efficientnet_b0": {  # BatchNormAct2d (SiLU, in place) and the depthwise/SE convolutions
        "bn1.weight": "rule norm_act_rule",
        "blocks.1.0.bn2.bias": "rule norm_act_rule",
        "blocks.1.0.conv_dw.weight": "rule conv_rule",
    },
    "vit": {  # timm's LayerNorm subclass; the class token and position embedding
        "blocks.0.norm1.weight": "rule layer_norm_rule",
        "cls_token": "broadcast use expanded to the samples",
        "pos_embed": "broadcast use expanded to the samples",
    },
    "deit_distilled": {"dist_token": "broadcast use expanded to the samples"},
    "convnext": {  # LayerNorm2d on (N, C, H, W); the layer-scale gain used in the block
        "stem.1.weight": "rule channels_first_layer_norm_rule",
        "stages.0.blocks.0.norm.weight": "rule channels_first_layer_norm_rule",
        "stages.0.blocks.0.gamma": "broadcast use expanded to the samples",
    },
    "convnextv2": {  # the global response norm's gains, in torch.addcmul
        "stages.0.blocks.0.mlp.grn.weight": "broadcast use expanded to the samples",
        "stages.0.blocks.0.mlp.grn.bias": "broadcast use expanded to the samples",
    },
    "beit": {  # layer scale; F.linear(x, qkv.weight, cat((q_bias, k_bias, v_bias))) routed
        "blocks.0.gamma_1": "broadcast use expanded to the samples",  # through qkv, the biases
        "blocks.0.attn.qkv.weight": "rule linear_rule",  # traced together to their sum
        "blocks.0.attn.q_bias": "broadcast use expanded to the samples",
        "blocks.1.attn.v_bias": "broadcast use expanded to the samples",
        "blocks.0.attn.relative_position_bias_table": "broadcast use expanded to the samples",
    },
    "eva02": {  # the same routed call, with rotary position embeddings
        "blocks.0.attn.qkv.weight": "rule linear_rule",
        "blocks.1.attn.q_bias": "broadcast use expanded to the samples",
        "blocks.1.attn.v_bias": "broadcast use expanded to the samples",
    },
    "beit_no_qkv_bias": {  # the bias table as scaled_dot_product_attention's mask
        "blocks.0.attn.relative_position_bias_table": "broadcast use expanded to the samples",
        "blocks.0.attn.qkv.weight": "rule linear_rule",
    },
    "swin": {  # the bias tables added to the logits of (N·windows, heads, T, T), with the mask
        "layers.0.blocks.0.attn.relative_position_bias_table": "broadcast use expanded to the samples",
        "layers.0.blocks.1.attn.relative_position_bias_table": "broadcast use expanded to the samples",
        "layers.1.blocks.0.attn.relative_position_bias_table": "broadcast use expanded to the samples",
    },
    "swinv2": {  # the position-bias MLP on a constant table, traced from cpb_mlp's call
        # through the ReLU (in place) to the logits; the logit scale (with one head, (1, 1, 1),
        # traced rather than expanded whole as a class token); q/v biases via the cat
        "layers.0.blocks.1.attn.cpb_mlp.0.weight": "broadcast use expanded to the samples",
        "layers.0.blocks.1.attn.cpb_mlp.0.bias": "broadcast use expanded to the samples",
        "layers.0.blocks.1.attn.cpb_mlp.2.weight": "broadcast use expanded to the samples",
        "layers.0.blocks.1.attn.logit_scale": "broadcast use expanded to the samples",
        "layers.1.blocks.0.attn.logit_scale": "broadcast use expanded to the samples",
        "layers.0.blocks.1.attn.q_bias": "broadcast use expanded to the samples",
        "layers.1.blocks.0.attn.v_bias": "broadcast use expanded to the samples",
        "layers.1.blocks.0.attn.qkv.weight": "rule linear_rule",
    },
    "swin_fused": {
        "layers.0.blocks.0.attn.relative_position_bias_table": "broadcast use expanded to the samples",
        "layers.0.blocks.1.attn.relative_position_bias_table": "broadcast use expanded to the samples",
    },
    "cait": {  # layer scale, in the patch blocks and the class-token blocks
        "blocks.1.gamma_2": "broadcast use expanded to the samples",
        "blocks_token_only.0.gamma_1": "broadcast use expanded to the samples",
    },
    "mobilenetv3": {"classifier.weight": "rule linear_rule"},  # timm's Linear subclass
    "regnet": {"stem.bn.weight": "rule norm_act_rule"},
    "resnetv2_bit": {  # weight standardisation; group norms then ReLU
        "stem.conv.weight": "rule standardised_conv_rule",
        "stages.1.blocks.0.conv2.weight": "rule standardised_conv_rule",
        "stages.1.blocks.0.norm2.weight": "rule norm_act_rule",
    },
    "nf_resnet": {  # scaled weight standardisation with a gain
        "stages.2.0.conv2.weight": "rule standardised_conv_rule",
        "stages.2.0.conv2.gain": "rule standardised_conv_rule",
        "stages.2.0.downsample.conv.bias": "rule standardised_conv_rule",
        "stem.conv2.gain": "rule standardised_conv_rule",
        "final_conv.weight": "rule standardised_conv_rule",
    },
    # the planning batch's check runs samples alone through its batch norms read as tokens;
    # a Fourier position encoding's projection, repeated for the batch; layer scales
    "xcit": {
        "cls_token": "broadcast use expanded to the samples",
        "pos_embed.token_projection.weight": "broadcast use expanded to the samples",
        "blocks.0.gamma1": "broadcast use expanded to the samples",
        "blocks.0.attn.temperature": "broadcast use expanded to the samples",
        "cls_attn_blocks.0.gamma1": "broadcast use expanded to the samples",
    },
}


@pytest.mark.parametrize("name", list(FAST_PATHS))
def test_timm_layers_take_the_fast_paths(name: str, gen: torch.Generator) -> None:
    model, data = _problem(name, torch.float32, gen)
    paths = fisher_fast.diag_fim(model, data[:1], progress=False).meta["paths"]
    for parameter, path in FAST_PATHS[name].items():
        assert paths[parameter] == path, f"{parameter}: {paths[parameter]}"


@pytest.mark.parametrize("name", ["levit_128s", "efficientvit_m0"])
def test_an_eval_mode_bias_cache_is_refused_by_name(name: str) -> None:
    """LeViT and EfficientViT keep their gathered attention biases in ``attention_bias_cache``
    in eval mode; the gradient would reach the biases in one pass only (module_state.py)."""
    model = _model(name, img_size=64).eval()
    data = (torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="attention_bias_cache"):
        fisher_fast.diag_fim(model, data, progress=False)


def test_a_model_that_mixes_samples_is_refused() -> None:
    """GC ViT repeats its (N, ...) global query over the (N·windows, ...) windows with the wrong
    layout (timm 1.0), so a sample's output depends on the others in its batch: refused
    (coupled_samples.py), not a number that matches no definition."""
    model = _model("gcvit_xxtiny", img_size=64).eval()
    data = (torch.randn(4, 3, 64, 64), torch.randint(CLASSES, (4,)))
    with pytest.raises(ValueError, match="depends on the other samples in its batch"):
        fisher_fast.diag_fim(model, data, progress=False)


def test_a_model_whose_gradients_mix_samples_is_rerun_whole_per_sample(
    gen: torch.Generator,
) -> None:
    """CSATv2 attends across the batch with queries, keys and values that are the same for
    every sample: its outputs are per sample, its gradients are not (1.8e-3 relative error,
    silently, before the check of coupled_samples.py). Now exact, the whole model per sample."""
    model = batchnorm_stats_randomised(_model("csatv2").double().eval(), gen)
    data = [(torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.randint(CLASSES, (3,)))]
    with pytest.warns(CoupledGradientsWarning, match="depend on each other in the backward pass"):
        fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors
