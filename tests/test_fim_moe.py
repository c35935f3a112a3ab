"""Mixture-of-experts models: the experts and router rules against a float64 per-sample loop.

Hugging Face MoE models (small configs, random weights) keep their experts as 3-D parameters
indexed by expert (rules/experts.py) and route each token with a router whose weight enters
only through its logits (rules/router.py). Each model is compared with the loop on data in two
batches and must take the rules, not the per-sample re-run of the MoE block; modules that only
look like them (other math, the weight used twice) must take the exact generic path.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fim_reference import float32_bound, max_relative_error, reference_fim, relative_error
from fim_reference import reference_fim_batches as loop
from torch import nn

import fisher_fast
from fisher_fast.fim.rules import experts as experts_rule

VOCAB, T, N = 40, 7, 5
SMALL = dict(
    vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0,
    experts_implementation="eager",
)  # fmt: skip


def _tf() -> Any:
    return pytest.importorskip("transformers")


def _lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


def mixtral() -> nn.Module:
    tf = _tf()
    return tf.MixtralForCausalLM(
        tf.MixtralConfig(**SMALL, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
    )


def qwen2_moe() -> nn.Module:
    """Routed experts beside a shared expert with a gate of its own."""
    tf = _tf()
    cfg = tf.Qwen2MoeConfig(
        **SMALL, intermediate_size=20, moe_intermediate_size=12,
        shared_expert_intermediate_size=18, num_experts=6, num_experts_per_tok=2,
    )  # fmt: skip
    return tf.Qwen2MoeForCausalLM(cfg)


def olmoe() -> nn.Module:
    tf = _tf()
    cfg = tf.OlmoeConfig(**SMALL, intermediate_size=12, num_experts=8, num_experts_per_tok=3)
    return tf.OlmoeForCausalLM(cfg)


def deepseek_v3() -> nn.Module:
    """Group-limited routing with a score-correction bias, a dense first layer, a shared
    expert; the router casts its weight to float32 (so the model runs in float32 here)."""
    tf = _tf()
    cfg = tf.DeepseekV3Config(
        **{**SMALL, "num_key_value_heads": 2}, intermediate_size=20, moe_intermediate_size=12,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=4, n_shared_experts=1,
    )  # fmt: skip
    return tf.DeepseekV3ForCausalLM(cfg)


def gpt_oss() -> nn.Module:
    """Experts stored transposed, with biases, gate and up interleaved and clamped (its own
    ``_apply_gate``); a router with a bias; attention sinks."""
    tf = _tf()
    cfg = tf.GptOssConfig(
        **SMALL, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        layer_types=["full_attention", "sliding_attention"], sliding_window=4,
    )  # fmt: skip
    return tf.GptOssForCausalLM(cfg)


MODELS: dict[str, tuple[Callable[[], nn.Module], torch.dtype]] = {
    "mixtral": (mixtral, torch.float64),
    "qwen2_moe": (qwen2_moe, torch.float64),
    "olmoe": (olmoe, torch.float64),
    "deepseek_v3": (deepseek_v3, torch.float32),
    "gpt_oss": (gpt_oss, torch.float64),
}


def _batches() -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    out = []
    for _ in range(2):
        ids = torch.randint(1, VOCAB, (N, T))
        out.append(({"input_ids": ids}, ids))
    return out


def _moe_paths(fim: fisher_fast.DiagFIM) -> dict[str, str]:
    moe = ("experts", "gate.weight", "router.")
    return {k: v for k, v in fim.meta["paths"].items() if any(m in k for m in moe)}


@pytest.mark.parametrize("name", list(MODELS))
def test_moe_models_match_the_loop_through_the_rules(name: str) -> None:
    torch.manual_seed(random.randrange(2**31))
    build, dtype = MODELS[name]
    model = build().to(dtype).eval()
    data = _batches()
    fim = fisher_fast.diag_fim(model, data, loss=_lm_loss, dtype=torch.float64, progress=False)
    paths = _moe_paths(fim)
    assert all(p.startswith("rule ") for p in paths.values()), paths
    assert {"rule experts_rule", "rule router_rule"} <= set(paths.values())
    reference = loop(model, data)
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    if dtype == torch.float32 and errors[worst] > bound:
        bound = float32_bound(model, data, reference)
    assert errors[worst] <= bound, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"


class FloatRouter(nn.Module):
    """A top-k router computing in its weight's dtype throughout (Mixtral's takes the softmax in
    float32, whose rounding differs between passes weighted differently, 1e-8 of the FIM in a
    float64 model): the router rule recognises it by its name and verifies it."""

    def __init__(self, experts: int, hidden: int, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.5)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(rows, self.weight)
        top, index = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index


class _MoEClassifier(nn.Module):
    """Token embedding, one MoE layer (``calls`` times, the same router and experts each time:
    their per-sample gradients are sums over the calls), mean over tokens, a linear head."""

    def __init__(self, calls: int = 1) -> None:
        super().__init__()
        tf = _tf()
        cfg = tf.MixtralConfig(**SMALL, intermediate_size=12, num_local_experts=4)
        self.calls = calls
        self.embed = nn.Embedding(VOCAB, 16)
        self.router = FloatRouter(4, 16)
        self.experts = tf.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
        nn.init.normal_(self.experts.gate_up_proj, std=0.3)
        nn.init.normal_(self.experts.down_proj, std=0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for _ in range(self.calls):
            rows = torch.tanh(h).reshape(-1, h.shape[-1])
            _, weights, index = self.router(rows)
            h = h + self.experts(rows, index, weights).reshape(h.shape)
        return self.head(h.mean(1))


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_the_rules_in_every_backward_pass_of_a_batch(fisher: str) -> None:
    """ "exact" and "mc" run one backward pass per class or draw: the rules add each."""
    torch.manual_seed(random.randrange(2**31))
    model = _MoEClassifier().double().eval()
    x, y = torch.randint(0, VOCAB, (N, T)), torch.randint(0, 3, (N,))
    draws = fisher_fast.sample_labels(model(x), 3, torch.Generator().manual_seed(7))
    fim = fisher_fast.diag_fim(
        model, (x, y), fisher=fisher, mc_samples=3, generator=torch.Generator().manual_seed(7),
        dtype=torch.float64, progress=False, batch_size=3,
    )  # fmt: skip
    assert set(_moe_paths(fim).values()) == {"rule experts_rule", "rule router_rule"}
    reference = reference_fim(model, x, y, fisher=fisher, labels=draws)
    assert relative_error(fim.flat, reference) <= 1e-10


def test_an_experts_module_and_its_router_called_twice() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _MoEClassifier(calls=2).double().eval()
    x, y = torch.randint(0, VOCAB, (N, T)), torch.randint(0, 3, (N,))
    fim = fisher_fast.diag_fim(model, (x, y), dtype=torch.float64, progress=False, batch_size=3)
    assert set(_moe_paths(fim).values()) == {"rule experts_rule", "rule router_rule"}
    assert relative_error(fim.flat, reference_fim(model, x, y)) <= 1e-10


def _halved_experts(module: nn.Module) -> None:
    """Changes the module's class to one whose forward returns half the experts' output."""
    base = type(module)

    class Halved(base):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return 0.5 * base.forward(self, *args, **kwargs)

    module.__class__ = Halved


def _router_reading_its_weight_twice(module: nn.Module) -> None:
    base = type(module)

    class TwiceRouter(base):  # type: ignore[misc, valid-type]
        def forward(self, hidden_states: torch.Tensor) -> Any:
            logits, scores, index = base.forward(self, hidden_states)
            return logits, scores * (1 + self.weight.sum().tanh()), index

    module.__class__ = TwiceRouter


@pytest.mark.parametrize(
    "change", [_halved_experts, _router_reading_its_weight_twice], ids=["experts", "router"]
)
def test_look_alikes_with_other_math_take_the_exact_generic_path(
    change: Callable[[nn.Module], None],
) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = mixtral().double().eval()
    layer = model.model.layers[0].mlp
    changed = layer.experts if change is _halved_experts else layer.gate
    change(changed)
    data = _batches()
    fim = fisher_fast.diag_fim(model, data, loss=_lm_loss, dtype=torch.float64, progress=False)
    name = next(n for n, m in model.named_modules() if m is changed)
    changed_paths = {v for k, v in fim.meta["paths"].items() if k.startswith(name + ".")}
    assert changed_paths and all(p.startswith("per-sample gradients") for p in changed_paths)
    assert fim.meta["paths"]["model.layers.1.mlp.experts.down_proj"] == "rule experts_rule"
    errors = max_relative_error(fim, loop(model, data))
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.parametrize("budget", [1, 2**30], ids=["one expert", "all"])
def test_experts_squared_a_group_at_a_time_under_a_work_budget(
    budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The padded rows of all experts at once may not fit the work budget: the experts are
    squared a group at a time, each group's squares added into its slice of the accumulator."""
    monkeypatch.setattr(experts_rule, "DEFAULT_CHUNK_BYTES", budget)
    sizes: list[int] = []
    groups = experts_rule._groups
    monkeypatch.setattr(
        experts_rule, "_groups", lambda *a: [sizes.append(len(g)) or g for g in groups(*a)]
    )
    torch.manual_seed(random.randrange(2**31))
    model = _MoEClassifier(calls=2).double().eval()
    x, y = torch.randint(0, VOCAB, (N, T)), torch.randint(0, 3, (N,))
    fim = fisher_fast.diag_fim(model, (x, y), dtype=torch.float64, progress=False, batch_size=3)
    assert relative_error(fim.flat, reference_fim(model, x, y)) <= 1e-10
    assert set(sizes) == ({1} if budget == 1 else {4}), sizes


def test_expert_groups_fill_the_budget() -> None:
    """Consecutive experts are grouped while n · group size · longest cell · row bytes fits."""

    class Cells:
        def __init__(self, most: list[int]) -> None:
            self.most = most

    cells = [Cells([2, 2, 2, 2, 1]), Cells([0, 1, 0, 0, 3])]
    # longest cell of a group: the sum over calls of each call's most in the group
    groups = experts_rule._groups(cells, 1, 1, 9)  # type: ignore[arg-type]
    assert [list(g) for g in groups] == [[0, 1, 2], [3], [4]]
    assert [list(g) for g in experts_rule._groups(cells, 1, 1, 1)] == [[0], [1], [2], [3], [4]]


def test_a_router_in_training_mode_takes_the_generic_path() -> None:
    """A router in training mode may draw noise (jitter on its logits) that a re-run of its
    forward would draw anew: the rule is not used there (``mode="keep"`` keeps the mode)."""
    torch.manual_seed(random.randrange(2**31))
    model = mixtral().double().train()  # no dropout and no jitter in this config: deterministic
    data = _batches()
    fim = fisher_fast.diag_fim(
        model, data, loss=_lm_loss, dtype=torch.float64, progress=False, mode="keep"
    )
    paths = _moe_paths(fim)
    routers = [p for k, p in paths.items() if k.endswith("mlp.gate.weight")]
    assert routers and all(p.startswith("per-sample gradients") for p in routers)
    assert paths["model.layers.0.mlp.experts.down_proj"] == "rule experts_rule"
    errors = max_relative_error(fim, loop(model, data))
    assert max(errors.values()) <= 1e-10, errors
