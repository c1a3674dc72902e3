"""The fuzz models: a random CNN per seed, then per family what graphopt must optimize, refuse or
convert (another dtype, an int64 input, in-place updates of the input, hooks, buffers updated in
forward, ONNX bytes). See :func:`fuzz_case`."""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphopt.testing.cnn import random_cnn
from graphopt.testing.cnn_spec import EXTENDED_KINDS

# family -> (weight in a profile, words one of which a refusal's message must contain; None:
# graphopt must optimize the model, a refusal is a defect)
FAMILIES: dict[str, tuple[int, tuple[str, ...] | None]] = {
    "cnn": (40, None),  # float32, EXTENDED_KINDS
    "float64": (14, None),
    "half": (4, None),  # float16 or bfloat16
    "int-input": (5, None),  # a second, int64 input (an embedding index)
    "inplace-input": (8, ("in-place", "in place", "inplace", "mutat", "modif")),
    "hooks": (8, ("hook",)),  # forward hooks / pre-hooks on submodules or the model
    "onnx": (4, None),  # exported to ONNX with BatchNorm unfolded, the bytes given to graphopt
    # forward updates a buffer in place: to be refused (or kept, state and all)
    "state-update": (3, ("buffer", "state", "in place", "in-place", "mutat", "updat")),
    # not drawn by default (weight 0) until graphopt handles it; fuzz(..., families=[...])
    "export-fallback": (0, None),  # FX cannot trace it (item assignment): torch.export
}
# grad modes capture and the pipeline run under; "inference_built": the model and its inputs
# were made under inference_mode (inference tensors), graphopt runs outside it
_GRAD_MODES = ("grad", "no_grad", "inference_mode", "inference_mode", "inference_built")


@dataclass
class FuzzCase:
    """One fuzz model: what goes to :func:`graphopt.frontends.torch.capture` (``source``: the
    module, or ONNX bytes), the reference module, example inputs and fresh inputs of another
    batch size, and the grad mode that capture and the pipeline run under."""

    seed: int
    family: str
    model: nn.Module
    source: Any
    inputs: tuple[torch.Tensor, ...]
    other_inputs: tuple[torch.Tensor, ...]
    mode: str  # "grad" | "no_grad" | "inference_mode" | "inference_built"
    spec: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def __repr__(self) -> str:
        body = "\n  ".join(str(s) for s in self.spec)
        shapes = [f"{tuple(x.shape)} {x.dtype}" for x in self.inputs]
        return (
            f"FuzzCase(seed={self.seed}, family={self.family!r}, mode={self.mode!r}, "
            f"inputs={shapes}{', ' + self.note if self.note else ''},\n  {body})"
        )


class _MutatesInput(nn.Module):
    """Updates its input in place, then runs the CNN: capture must refuse (or keep it)."""

    def __init__(self, inner: nn.Module, op: str) -> None:
        super().__init__()
        self.inner, self.op = inner, op
        self.act = nn.ReLU(inplace=True)
        self.alias = nn.Identity()

    def forward(self, x: torch.Tensor) -> Any:
        if self.op == "mul_":
            x.mul_(2.0)
        elif self.op == "add_":
            x.add_(0.5)
        elif self.op == "iadd":
            x += 1.0
        elif self.op == "relu_":
            torch.relu_(x)
        elif self.op == "slice":
            x[:, :1].mul_(-1.0)
        elif self.op == "relu_module":  # nn.ReLU(inplace=True) on the input
            x = self.act(x)
        elif self.op == "via_identity":  # an alias of the input (Identity returns x itself)
            self.alias(x).mul_(3.0)
        return self.inner(x)


class _UpdatesState(nn.Module):
    """Counts its calls in a buffer, updated in place in forward, and scales its input by it:
    graphopt must refuse, or return a graph whose state is the model's (not advanced by the
    runs graphopt made itself)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> Any:
        self.calls.add_(1.0)
        return self.inner(x * (1.0 + 0.1 * self.calls).to(x.dtype))


class _NeedsExport(nn.Module):
    """Item assignment, which symbolic tracing cannot capture: capture falls back to
    torch.export (the graph must still take other batch sizes, or capture must say it won't)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Any:
        y = x.clone()
        y[:, 0] = 0.5
        return self.inner(y)


class _WithIndex(nn.Module):
    """A CNN with a second, int64 input: an embedding row added to every position."""

    def __init__(self, inner: nn.Module, channels: int, dims: int, rows: int, seed: int) -> None:
        super().__init__()
        self.inner, self.dims = inner, dims
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(rows, channels, generator=gen))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> Any:
        row = self.table[index]  # (N, C), gathered at run time
        return self.inner(x + row.view(index.shape[0], -1, *[1] * self.dims).to(x.dtype))


class _ScaleOutput:
    """A forward hook that changes the module's output."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # the model itself, returning extra outputs
            return tuple(o * self.scale for o in output)
        return output * self.scale


class _ShiftInput:
    """A forward pre-hook that changes the module's input."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (args[0] + self.shift, *args[1:])


class _Observe:
    """A forward hook that only observes (returns None): dropping it changes no output."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1


def _add_hooks(model: nn.Module, rng: random.Random) -> str:
    """Register 1-2 hooks on random submodules (or the model itself); returns where."""
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm | nn.Linear)
    ]
    placed = []
    for _ in range(rng.randint(1, 2)):
        name, module = rng.choice([("<model>", model), *candidates])
        hook = rng.choice(["scale", "shift", "observe"])
        if hook == "scale":
            module.register_forward_hook(_ScaleOutput(rng.choice([2.0, -0.5])))
        elif hook == "shift":
            module.register_forward_pre_hook(_ShiftInput(rng.choice([1.0, -0.25])))
        else:
            module.register_forward_hook(_Observe())
        placed.append(f"{hook}@{name}")
    return "hooks=" + "+".join(placed)


def _fresh(x: torch.Tensor, batch: int, seed: int, rows: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *x.shape[1:])
    if x.dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(x.dtype)
    return torch.randint(0, max(rows, 1), shape, generator=gen).to(x.dtype)


def _onnx_bytes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """TorchScript export with BatchNorm kept as its own node and a dynamic batch axis."""
    names = [f"x{i}" for i in range(len(inputs))]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            f,
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=names,
            dynamic_axes={n: {0: "N"} for n in names},
        )
    return f.getvalue()


def fuzz_case(
    seed: int, family: str | None = None, *, max_layers: int = 5, mode: str | None = None
) -> FuzzCase:
    """The fuzz model of ``seed`` (the family and grad mode drawn from the seed unless given).

    A random CNN of :data:`EXTENDED_KINDS`, then per family (:data:`FAMILIES`): ``cnn``
    (float32), ``float64``, ``half`` (float16 or bfloat16), ``int-input`` (a second, int64
    input indexing an embedding), ``inplace-input`` (``x.mul_(2)``, ``x += 1``, ``relu_``, a
    slice or an alias of the input updated in place: to be refused), ``hooks`` (forward hooks
    and pre-hooks that change values or only observe, on submodules or the model: to be
    refused or kept), ``onnx`` (the model exported with BatchNorm unfolded and a dynamic batch,
    the bytes given to capture), ``state-update`` (a buffer updated in place in forward: to be
    refused) and ``export-fallback`` (see :class:`_NeedsExport`; drawn only when named).

    Every model is tiny (at most 8 channels, 8 wide), so one costs milliseconds. The same seed
    always gives the same model, inputs, family and grad mode: a failure's seed is its repro.
    """
    rng = random.Random(seed * 7919 + 17)
    names = list(FAMILIES)
    drawn = rng.choices(names, weights=[FAMILIES[f][0] for f in names])[0]
    family = family or drawn  # drawn either way: a given family changes nothing else
    if family not in FAMILIES:
        raise ValueError(f"unknown fuzz family {family!r}; use one of {', '.join(FAMILIES)}")
    drawn_mode = rng.choice(_GRAD_MODES)
    mode = mode or drawn_mode  # drawn either way, like the family
    if mode not in _GRAD_MODES:
        raise ValueError(f"unknown grad mode {mode!r}; use one of {', '.join(set(_GRAD_MODES))}")
    if family == "state-update" and mode == "inference_built":
        mode = "inference_mode"  # torch forbids updating an inference-mode buffer outside it
    dtype = {"float64": torch.float64, "half": rng.choice([torch.float16, torch.bfloat16])}.get(
        family, torch.float32
    )
    # a model this family cannot express (no float16 avg_pool3d on CPU, a BatchNorm without
    # running statistics that the ONNX exporter refuses) is drawn again from a derived seed
    onnx_bytes = None
    for attempt in range(8):
        kinds = EXTENDED_KINDS
        if attempt >= 4:  # what the exporter refuses most: shape ops, BN without statistics
            kinds = tuple(k for k in EXTENDED_KINDS if k not in ("shape", "bn"))
        with torch.inference_mode(mode == "inference_built"):
            case = random_cnn(
                seed + 1_000_003 * attempt,
                max_layers=max_layers,
                kinds=kinds,
                dtype=dtype,
                max_size=8,
            )
        if family not in ("half", "onnx"):  # float32/float64 models always run and trace
            break
        if family == "onnx" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
            for m in case.model.modules()
        ):
            continue  # the TorchScript exporter refuses batch statistics with a dynamic batch
        try:
            with torch.no_grad():
                case.model(*case.inputs)
            if family == "onnx":
                onnx_bytes = _onnx_bytes(case.model, case.inputs)
            break
        except Exception:  # noqa: BLE001 - any failure: draw another model
            continue
    model: nn.Module = case.model
    inputs = case.inputs
    batch = inputs[0].shape[0]
    other = (_fresh(inputs[0], batch + 2, seed + 2),)
    note = ""
    source: Any = model
    with torch.inference_mode(mode == "inference_built"):
        model, source, inputs, other, note = _wrap_for_family(
            family, model, inputs, other, case.dims, seed, rng, onnx_bytes
        )
    return FuzzCase(seed, family, model, source, inputs, other, mode, case.spec, note)


def _wrap_for_family(
    family: str,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    other: tuple[torch.Tensor, ...],
    dims: int,
    seed: int,
    rng: random.Random,
    onnx_bytes: bytes | None,
) -> tuple[nn.Module, Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], str]:
    """(model, what capture gets, inputs, other inputs, note) for ``family``."""
    batch = inputs[0].shape[0]
    note = ""
    source: Any = model
    if family == "inplace-input":
        op = rng.choice(["mul_", "add_", "iadd", "relu_", "slice", "relu_module", "via_identity"])
        model = source = _MutatesInput(model, op).eval()
        note = f"input op={op}"
    elif family == "hooks":
        note = _add_hooks(model, rng)
    elif family == "state-update":
        model = source = _UpdatesState(model).eval()
    elif family == "export-fallback":
        model = source = _NeedsExport(model).eval()
    elif family == "int-input":
        rows = rng.randint(2, 6)
        model = source = _WithIndex(model, inputs[0].shape[1], dims, rows, seed).eval()
        index = torch.randint(0, rows, (batch,), generator=torch.Generator().manual_seed(seed))
        inputs = (inputs[0], index)
        other = (other[0], _fresh(index, batch + 2, seed + 3, rows))
    elif family == "onnx":
        source = onnx_bytes if onnx_bytes is not None else _onnx_bytes(model, inputs)
    return model, source, inputs, other, note
