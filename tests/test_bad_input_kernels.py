"""Bad and edge-case input to the compiled kernels (issue #12): empty dimensions, geometry that
does not fit, sizes that overflow int64, infinite FIM entries, fake (meta) implementations that
must refuse what the kernels refuse, and build flags.

Inputs that used to crash the process (SIGFPE, abort) run in a child process, so that a
regression fails these tests instead of ending pytest.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fim_values import random_fim
from torch._subclasses.fake_tensor import FakeTensorMode

import fisher_fast
from fisher_fast import ops

ROOT = Path(__file__).resolve().parents[1]
INT64_MAX = 2**63 - 1

# ---------------------------------------------------------------------------------------------
# conv2d_sq_sum in a child process: (name, x shape, g shape, kernel, stride, padding, dilation,
# groups, dtype, expected) with expected either ("shape", result shape: all zeros) or
# ("error", a regular expression the message must match).
# ---------------------------------------------------------------------------------------------
CHILD_CASES: list[tuple[Any, ...]] = [
    # Empty dimensions: correct zero / empty results.
    ("no input channels", (2, 0, 5, 5), (2, 4, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 1,
     "float32", ("shape", [1, 4, 0])),
    ("no input channels, 2 groups", (2, 0, 5, 5), (2, 4, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 2,
     "float64", ("shape", [2, 2, 0])),
    ("no output channels float32", (2, 3, 5, 5), (2, 0, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 1,
     "float32", ("shape", [1, 0, 27])),
    ("no output channels float64", (2, 3, 5, 5), (2, 0, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 1,
     "float64", ("shape", [1, 0, 27])),
    ("empty width", (2, 3, 5, 0), (2, 4, 5, 0), (1, 1), (1, 1), (0, 0), (1, 1), 1,
     "float32", ("shape", [1, 4, 3])),
    # A kernel whose size product overflows int64 (it used to wrap to 0 and divide by zero).
    ("kernel size product overflows", (1, 1, 1, 1), (1, 1, 0, 0), (2**32, 2**32), (1, 1), (0, 0),
     (1, 1), 1, "float32", ("error", r"kernel_size\[0\] \* kernel_size\[1\] overflows int64")),
    ("weight columns overflow", (1, 4, 1, 1), (1, 1, 0, 0), (2**31, 2**31), (1, 1), (0, 0),
     (1, 1), 1, "float32", ("error", r"weight columns .* overflows int64")),
    # Geometry that does not fit g, and sizes past int64.
    ("g height wrong", (2, 3, 8, 8), (2, 4, 7, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, "float32",
     ("error", r"g has output height 7, but x's height 8 .* from 8 to 9")),
    ("g width wrong", (2, 3, 8, 8), (2, 4, 8, 6), (3, 3), (1, 2), (1, 1), (1, 1), 1, "float32",
     ("error", r"g has output width 6, but x's width 8 .*stride\[1\] = 2.* from 4 to 5")),
    ("padding 10^6", (1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (1, 1), (10**6, 0), (1, 1), 1, "float32",
     ("error", r"g has output height 2, .*padding\[0\] = 1000000")),
    ("dilation 2^62", (1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (1, 1), (0, 0), (2**62, 1), 1,
     "float32", ("error", r"dilation \* \(kernel_size - 1\) overflows int64")),
    ("padding past int64", (1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (1, 1), (0, INT64_MAX), (1, 1), 1,
     "float32", ("error", r"input size \+ padding overflows int64")),
    ("stride 0", (1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (1, 0), (0, 0), (1, 1), 1, "float32",
     ("error", r"stride\[1\] is 0; kernel_size, stride and dilation must be positive")),
    ("dilation 0", (1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (1, 1), (0, 0), (0, 1), 1, "float32",
     ("error", r"dilation\[0\] is 0")),
    ("kernel 0", (1, 1, 4, 4), (1, 1, 2, 2), (3, 0), (1, 1), (0, 0), (1, 1), 1, "float32",
     ("error", r"kernel_size\[1\] is 0")),
    ("negative padding", (1, 1, 4, 4), (1, 1, 2, 2), (3, 3), (1, 1), (0, -1), (1, 1), 1,
     "float32", ("error", r"padding\[1\] is -1; .*padding nonnegative")),
    ("groups 0", (1, 2, 4, 4), (1, 2, 2, 2), (3, 3), (1, 1), (0, 0), (1, 1), 0, "float32",
     ("error", r"groups \(0\) must divide")),
]  # fmt: skip

_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from fisher_fast import ops

    for name, xs, gs, k, s, p, d, groups, dtype, _ in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        x, g = torch.randn(xs, dtype=dt), torch.randn(gs, dtype=dt)
        print(json.dumps({"case": name, "started": True}), flush=True)
        try:
            out = ops.conv2d_sq_sum(x, g, k, s, p, d, groups, torch.float64)
            row = {"shape": list(out.shape), "zeros": bool((out == 0).all())}
        except RuntimeError as exc:
            row = {"error": str(exc)}
        print(json.dumps({"case": name, **row}), flush=True)
    """
)


@pytest.fixture(scope="module")
def child_results() -> dict[str, Any]:
    """Runs every case of CHILD_CASES in one child process; a crash is recorded, not fatal."""
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _CHILD, json.dumps(CHILD_CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    rows: dict[str, Any] = {}
    last = None
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        last = row["case"]
        rows[last] = row
    if proc.returncode != 0 and last is not None and "started" in rows[last]:
        rows[last] = {"crash": f"exit status {proc.returncode}: {proc.stderr[-2000:]}"}
    rows["__stderr__"] = proc.stderr
    return rows


@pytest.mark.parametrize("case", CHILD_CASES, ids=[c[0] for c in CHILD_CASES])
def test_conv2d_sq_sum_edge_input_in_child(case: tuple[Any, ...], child_results: dict) -> None:
    name, expected = case[0], case[-1]
    row = child_results.get(name)
    assert row is not None, f"not reached: the child died earlier\n{child_results['__stderr__']}"
    assert "crash" not in row, f"the op crashed the process: {row['crash']}"
    assert "started" not in row
    if expected[0] == "shape":
        assert "error" not in row, row["error"]
        assert row["shape"] == expected[1]
        assert row["zeros"]
    else:
        assert "error" in row, f"accepted, returned shape {row.get('shape')}"
        assert row["error"].startswith("fisher_fast: ")
        assert re.search(expected[1], row["error"]), row["error"]


def conv_reference(
    x: torch.Tensor, g: torch.Tensor, kernel, stride, pads, dilation, groups: int
) -> torch.Tensor:
    """Squared per-sample weight gradients summed, by float64 autograd on the explicitly padded
    input; pads = (top, bottom, left, right)."""
    c, out = x.shape[1], g.shape[1]
    xp = F.pad(x.double(), (pads[2], pads[3], pads[0], pads[1]))
    weight = torch.zeros(out, c // groups, *kernel, dtype=torch.float64)
    total = torch.zeros_like(weight)
    for xi, gi in zip(xp, g.double(), strict=True):
        w = weight.clone().requires_grad_()
        y = F.conv2d(xi[None], w, None, stride, 0, dilation, groups)
        assert y.shape[2:] == gi.shape[1:]
        (grad,) = torch.autograd.grad(y, w, gi[None])
        total += grad.square()
    return total.reshape(groups, out // groups, -1)


# Valid geometry: padding after the input as before it or one more ('same' padding of an even
# kernel), padding modes applied beforehand, and symmetric padding wider than the kernel.
ASYMMETRIC = [
    # (c, hw, out, kernel, stride, dilation, groups, pads (top, bottom, left, right))
    (3, (7, 6), 4, (4, 3), (1, 1), (1, 2), 1, (1, 2, 2, 2)),  # 'same'
    (4, (6, 6), 2, (2, 2), (1, 1), (1, 1), 2, (0, 1, 0, 1)),  # 'same', kernel 2
    (2, (5, 8), 3, (3, 3), (2, 1), (1, 1), 1, (0, 0, 0, 0)),  # pre-padded input
    (2, (3, 3), 3, (2, 2), (1, 1), (1, 1), 1, (3, 3, 2, 2)),  # symmetric, wider than the kernel
    (1, (4, 5), 2, (3, 2), (1, 2), (2, 1), 1, (2, 3, 0, 1)),  # one more after, with strides
]


@pytest.mark.parametrize("case", ASYMMETRIC, ids=str)
def test_conv2d_sq_sum_accepts_valid_after_padding(case: tuple, gen: torch.Generator) -> None:
    c, hw, out, kernel, stride, dilation, groups, pads = case
    x = torch.randn(3, c, *hw, generator=gen, dtype=torch.float64)
    probe = F.conv2d(
        F.pad(x, (pads[2], pads[3], pads[0], pads[1])),
        torch.zeros(out, c // groups, *kernel, dtype=torch.float64),
        None,
        stride,
        0,
        dilation,
        groups,
    )
    g = torch.randn(probe.shape, generator=gen, dtype=torch.float64)
    got = ops.conv2d_sq_sum(
        x, g, kernel, stride, (pads[0], pads[2]), dilation, groups, torch.float64
    )
    expected = conv_reference(x, g, kernel, stride, pads, dilation, groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-300)


def test_conv2d_sq_sum_zero_output_channels_match_reference(gen: torch.Generator) -> None:
    """Not only in the child: the empty result equals that of an im2col reference (F.conv2d has
    no weights of zero output channels)."""
    x = torch.randn(2, 3, 5, 5, generator=gen)
    g = torch.randn(2, 0, 3, 3, generator=gen)
    got = ops.conv2d_sq_sum(x, g, (3, 3), (1, 1), (0, 0), (1, 1), 1)
    patches = F.unfold(x.double(), (3, 3))  # (N, C*k*k, L)
    grads = torch.einsum("nol,nkl->nok", g.double().flatten(2), patches)
    expected = grads.square().sum(0).reshape(1, 0, 27)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected)


# ---------------------------------------------------------------------------------------------
# frechet_sums with infinite entries: as plain float64 summation gives them
# ---------------------------------------------------------------------------------------------
def frechet_reference(ref: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    a = ref.double()
    rows = []
    for other in others:
        b = other.double()
        rows.append(
            [
                a.sum().item(),
                b.sum().item(),
                (a * b).sqrt().sum().item(),
                float((~((a >= 0) & a.isfinite())).sum()),
                float((~((b >= 0) & b.isfinite())).sum()),
            ]
        )
    return torch.tensor(rows, dtype=torch.float64)


def inf_positions(n: int, gen: torch.Generator) -> list[int]:
    """Positions in each lane group of the vector paths (the first, second and third vector of a
    24-element group inside a 1024-element block, and a block's tail), drawn at random."""
    block = int(torch.randint(0, n // 1024, (1,), generator=gen)) * 1024
    group = int(torch.randint(0, 1008 // 24, (1,), generator=gen)) * 24
    lanes = [int(torch.randint(lo, lo + 8, (1,), generator=gen)) for lo in (0, 8, 16)]
    tail = 1008 + int(torch.randint(0, 16, (1,), generator=gen))
    return [block + group + lane for lane in lanes] + [block + tail]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["ref", "other", "both", "negative"])
def test_frechet_sums_infinite_entries(
    dtype: torch.dtype, where: str, gen: torch.Generator, device: str
) -> None:
    n = 5000
    ref, a, b = (random_fim(n, gen, dtype) for _ in range(3))
    positions = inf_positions(n, gen)
    value = -torch.inf if where == "negative" else torch.inf
    if where in ("ref", "both", "negative"):
        ref[positions[: 2 if where == "negative" else 4]] = value
    if where in ("other", "both"):
        a[positions[1:]] = torch.inf
    expected = frechet_reference(ref, [a, b])
    got = ops.frechet_sums([ref.to(device)], [a.to(device), b.to(device)]).cpu()
    assert not expected[:, :2].isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, equal_nan=True)


def test_frechet_sums_overflowing_sum_is_inf(gen: torch.Generator, device: str) -> None:
    """Finite float64 entries whose sum passes the float64 range sum to inf, not NaN."""
    ref = torch.full((3000,), 1e306, dtype=torch.float64)
    ref += torch.rand(3000, generator=gen, dtype=torch.float64) * 1e305
    other = random_fim(3000, gen, torch.float64)
    expected = frechet_reference(ref, [other])
    assert expected[0, 0] == torch.inf
    got = ops.frechet_sums([ref.to(device)], [other.to(device)]).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frechet_sums_negative_subnormal_is_invalid(
    dtype: torch.dtype, gen: torch.Generator, device: str
) -> None:
    """A negative subnormal entry is negative: invalid on every device (fast math flushed it to
    -0 on the GPU, where it then counted as valid)."""
    ref, other = random_fim(2000, gen, dtype), random_fim(2000, gen, dtype)
    tiny = -torch.finfo(dtype).smallest_normal / 4
    where = torch.randperm(2000, generator=gen)[:3]
    ref[where] = tiny
    other[where[:2]] = tiny
    assert (ref[where] < 0).all()  # subnormal in this dtype, not flushed on the CPU
    got = ops.frechet_sums([ref.to(device)], [other.to(device)]).cpu()
    assert got[0, 3] == 3 and got[0, 4] == 2


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: refuse what the kernels refuse, with the same messages
# ---------------------------------------------------------------------------------------------
def _conv_args(**change: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        x=torch.randn(2, 4, 6, 6),
        g=torch.randn(2, 6, 4, 4),
        kernel_size=[3, 3],
        stride=[1, 1],
        padding=[0, 0],
        dilation=[1, 1],
        groups=2,
        acc_dtype=torch.float32,
    )
    args.update(change)
    return args


def _conv(a: dict[str, Any]) -> Any:
    return torch.ops.fisher_fast.conv2d_sq_sum(*a.values())


def _per_sample(g: torch.Tensor, x: torch.Tensor, acc: torch.dtype = torch.float32) -> Any:
    return torch.ops.fisher_fast.per_sample_sq_sum(g, x, acc)


def _linear(w: Any, b: Any, g: torch.Tensor, x: torch.Tensor) -> Any:
    return torch.ops.fisher_fast.linear_sq_sum_(w, b, g, x, False)


def _frechet(ref: list, others: list) -> Any:
    return torch.ops.fisher_fast.frechet_sums(ref, others)


_G4, _X4 = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 6)
_G2, _X2 = torch.randn(5, 3), torch.randn(5, 4)
_A = torch.rand(10)
# name -> (op, args): each is refused by the CPU kernel (none of them crashed it).
REFUSED: dict[str, tuple[Any, tuple]] = {
    "conv dtypes differ": (_conv, (_conv_args(g=torch.randn(2, 6, 4, 4).double()),)),
    "conv integer input": (_conv, (_conv_args(x=torch.ones(2, 4, 6, 6, dtype=torch.long),
                                              g=torch.ones(2, 6, 4, 4, dtype=torch.long)),)),
    "conv 3-D": (_conv, (_conv_args(x=torch.randn(4, 6, 6)),)),
    "conv samples differ": (_conv, (_conv_args(g=torch.randn(1, 6, 4, 4)),)),
    "conv acc float16": (_conv, (_conv_args(acc_dtype=torch.float16),)),
    "conv groups": (_conv, (_conv_args(groups=3),)),
    "conv g size": (_conv, (_conv_args(g=torch.randn(2, 6, 3, 4)),)),
    "conv stride 0": (_conv, (_conv_args(stride=[0, 1]),)),
    "conv padding -1": (_conv, (_conv_args(padding=[0, -1]),)),
    "per_sample dtypes differ": (_per_sample, (_G4, _X4.double())),
    "per_sample T differs": (_per_sample, (_G4, _X4[:, :, :3])),
    "per_sample acc": (_per_sample, (_G4, _X4, torch.float16)),
    "per_sample 3-D": (_per_sample, (_G4[0], _X4[0])),
    "linear dtypes differ": (_linear, (torch.zeros(3, 4), None, _G2, _X2.double())),
    "linear nothing": (_linear, (None, None, _G2, _X2)),
    "linear weight shape": (_linear, (torch.zeros(4, 3), None, _G2, _X2)),
    "linear acc dtype": (_linear, (torch.zeros(3, 4, dtype=torch.half), None, _G2, _X2)),
    "linear bias dtype": (_linear, (torch.zeros(3, 4), torch.zeros(3).double(), _G2, _X2)),
    "frechet dtypes differ": (_frechet, ([_A], [_A.double()])),
    "frechet sizes differ": (_frechet, ([_A], [_A[:5]])),
    "frechet non-contiguous": (_frechet, ([_A], [torch.rand(20)[::2]])),
    "frechet count": (_frechet, ([_A, _A], [_A])),
    "frechet empty": (_frechet, ([], [_A])),
}  # fmt: skip


def _error(fn: Any, args: tuple) -> str:
    with pytest.raises(RuntimeError) as info:
        fn(*args)
    return str(info.value)


def _fake(mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, list):
        return [_fake(mode, v) for v in value]
    if isinstance(value, dict):
        return {k: _fake(mode, v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", list(REFUSED))
def test_fake_impl_refuses_what_the_kernel_refuses(name: str) -> None:
    fn, args = REFUSED[name]
    real = _error(fn, args)
    assert real.startswith("fisher_fast: ")
    with FakeTensorMode() as mode:
        fake = _error(fn, tuple(_fake(mode, a) for a in args))
    assert fake == real


MIXED_DEVICES = {
    "conv": (_conv, (_conv_args(g=torch.empty(2, 6, 4, 4, device="meta")),), "x is on cpu but g"),
    "per_sample": (_per_sample, (_G4, _X4.to("meta")), "g is on cpu but x"),
    "linear": (_linear, (torch.zeros(3, 4), None, _G2, _X2.to("meta")), "g is on cpu but x"),
    "frechet": (_frechet, ([_A.to("meta")], [_A]), "an 'other' tensor is on cpu but the reference"),
}


@pytest.mark.parametrize("name", list(MIXED_DEVICES))
def test_fake_impl_refuses_mixed_devices(name: str) -> None:
    """A tensor on "meta" with another on "cpu": refused as the kernels refuse two devices."""
    fn, args, start = MIXED_DEVICES[name]
    expected = f"fisher_fast: {start} is on meta; move both to one device"
    assert _error(fn, args) == expected
    with FakeTensorMode() as mode:  # fake tensors keep their devices
        assert _error(fn, tuple(_fake(mode, a) for a in args)) == expected


# Refused by the kernel's overflow checks (which the old kernel crashed on): the fake refuses too.
FAKE_OVERFLOW = {
    "dilation 2^62": (
        _conv_args(dilation=[2**62, 1]),
        r"dilation \* \(kernel_size - 1\) overflows",
    ),
    "kernel product": (
        _conv_args(
            x=torch.randn(1, 2, 1, 1), g=torch.randn(1, 2, 0, 0), kernel_size=[2**32, 2**32]
        ),
        r"kernel_size\[0\] \* kernel_size\[1\] overflows int64",
    ),
}


@pytest.mark.parametrize("name", list(FAKE_OVERFLOW))
def test_fake_impl_refuses_overflowing_sizes(name: str) -> None:
    args, pattern = FAKE_OVERFLOW[name]
    with FakeTensorMode() as mode:
        message = _error(_conv, (_fake(mode, args),))
    assert message.startswith("fisher_fast: ") and re.search(pattern, message), message


def test_fake_impls_accept_valid_input() -> None:
    """The fake results have the kernels' shapes and dtypes, on meta tensors and fake ones."""
    a = _conv_args()
    real = _conv(a)
    with FakeTensorMode() as mode:
        fake = _conv(_fake(mode, a))
    assert fake.shape == real.shape and fake.dtype == real.dtype
    meta = _conv({k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()})
    assert meta.shape == real.shape and meta.device.type == "meta"
    sums = _frechet([_A.to("meta")], [_A.to("meta")] * 3)
    assert sums.shape == (3, ops.FRECHET_COLUMNS) and sums.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Build: architecture guard, no fast math, hidden symbols
# ---------------------------------------------------------------------------------------------
def _code(path: Path, comment: str) -> str:
    """A file's text without its comments (whole-line and trailing)."""
    return "\n".join(line.split(comment)[0] for line in path.read_text().splitlines())


def test_no_fast_math_in_nvcc_flags() -> None:
    for path, comment in [(ROOT / "setup.py", "#"), (ROOT / "CMakeLists.txt", "#")]:
        code = _code(path, comment)
        for flag in ("--use_fast_math", "-use_fast_math", "-ftz=true", "--ftz=true"):
            assert flag not in code, f"{path.name} passes {flag} to nvcc"


def test_nvcc_gets_the_host_compiler_and_hidden_visibility() -> None:
    setup = _code(ROOT / "setup.py", "#")
    assert '"-ccbin"' in setup and "get_cxx_compiler()" in setup
    cmake = _code(ROOT / "CMakeLists.txt", "#")
    assert "CMAKE_CUDA_HOST_COMPILER" in cmake
    assert '"-fvisibility=hidden"' in setup and '"-Xcompiler=-fvisibility=hidden"' in setup
    assert "-fvisibility=hidden>" in cmake and "-Xcompiler=-fvisibility=hidden>" in cmake
    assert "-fwrapv" in cmake  # what Python's compile flags bring to setup.py's build


def _system_includes(paths: list[Path]) -> set[str]:
    """The <...> headers that these files and the project headers they include name."""
    found: set[str] = set()
    todo, seen = list(paths), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for line in path.read_text().splitlines():
            if m := re.match(r"\s*#\s*include\s*<([^>]+)>", line):
                found.add(m[1])
            elif m := re.match(r'\s*#\s*include\s*"([^"]+)"', line):
                for base in (ROOT / "csrc/include", ROOT / "csrc", path.parent):
                    if (base / m[1]).exists():
                        todo.append(base / m[1])
                        break
    return found


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler to preprocess")
@pytest.mark.parametrize("source", ["csrc/cpu/sq_sum_tiles_cpu.cpp", "csrc/cpu/frechet_cpu.cpp"])
def test_target_clones_only_on_x86_64(source: str, tmp_path: Path) -> None:
    """Preprocessed as for another architecture, the kernels ask for no x86 clones (GCC has no
    avx512f / avx2 targets on aarch64, where the build failed). System and torch headers are
    replaced by empty ones, which x86-64 headers would not survive without __x86_64__."""
    for header in _system_includes([ROOT / source]):
        (tmp_path / header).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / header).write_text("")
    cmd = ["c++", "-std=c++20", "-E", "-P", "-nostdinc", "-U__x86_64__", "-U__SSE__"]
    cmd += [f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}", f"-I{tmp_path}", str(ROOT / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "square_add" in proc.stdout or "block_sums_portable" in proc.stdout
    assert "target_clones" not in proc.stdout, f"{source}: target_clones without an x86-64 guard"
    # On x86-64 the clones are kept.
    x86 = subprocess.run(
        [c for c in cmd if not c.startswith("-U")], capture_output=True, text=True, check=True
    )
    assert "target_clones" in x86.stdout


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm to list exported symbols")
def test_library_exports_no_internal_symbols() -> None:
    """Hidden visibility: of fisher_fast's own code only the module init and build_info() are
    exported, so no other library's copy of an inline function binds to ours or ours to it."""
    library = fisher_fast._library.require().__file__
    proc = subprocess.run(
        ["nm", "-D", "-C", "--defined-only", library],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    ours = [line for line in proc.stdout.splitlines() if "fisher_fast::" in line]
    assert all("fisher_fast::build_info()" in line for line in ours), "\n".join(ours[:20])
    assert "PyInit__C" in proc.stdout
