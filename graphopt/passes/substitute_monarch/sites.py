"""The layers substitute-monarch tries (Linear modules, 1x1 convs, functional linears with a
constant weight), the inputs that reach them when the graph runs, and putting a substitute in
a layer's place (the pass's only mutation)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.fx.names import fetch_attr, free_name

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_MODULES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}


@dataclass
class Site:
    """A layer the pass may replace: its node, its weight as an ``n_out x n_in`` matrix, and
    where that weight lives (a module, or the ``get_attr`` nodes of a functional linear)."""

    node: fx.Node
    name: str
    op: str
    weight: torch.Tensor  # (n_out, n_in)
    bias: torch.Tensor | None
    input_node: fx.Node
    module: nn.Module | None = None  # call_module layers
    spatial_dims: int = 0  # 1x1 convs: how many spatial axes follow the channels
    attr_nodes: tuple[fx.Node, ...] = ()  # functional linear: its get_attr inputs

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def find_sites(gm: fx.GraphModule, min_features: int) -> tuple[list[Site], Counter]:
    """The Linear / 1x1 conv layers worth trying, and the refusals of the others by reason."""
    stats: Counter = Counter()
    sites: list[Site] = []
    calls: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[id(gm.get_submodule(node.target))] += 1
    names: Counter = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    owners: Counter = Counter()
    for module in {id(m): m for m in gm.modules()}.values():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            owners[id(t)] += 1
    reads: Counter = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    counted: set[int] = set()
    for node in gm.graph.nodes:
        site, reason = _as_site(gm, node)
        if site is None and not reason:
            continue
        if reason:
            stats[f"skipped:{reason}"] += 1
            continue
        if site.module is not None:
            tensors = [t for t in (site.module.weight, site.module.bias) if t is not None]
            shared = (
                calls[id(site.module)] > 1
                or names[id(site.module)] > 1
                or any(owners[id(t)] > 1 for t in tensors)
            )
        else:
            shared = any(len(n.users) > 1 or reads[n.target] > 1 for n in site.attr_nodes)
        if shared:  # one weight, several uses: substituting it would change all of them
            if site.module is None or id(site.module) not in counted:  # once per layer
                stats["skipped:shared-weight"] += 1
                counted.add(id(site.module))
        elif site.weight.dtype not in (torch.float32, torch.float64):
            stats["skipped:dtype"] += 1
        elif min(site.in_features, site.out_features) < min_features:
            stats["skipped:too-small"] += 1
        else:
            sites.append(site)
    return sites, stats


def _as_site(gm: fx.GraphModule, node: fx.Node) -> tuple[Site | None, str]:
    """(site, "") for a candidate layer, (None, reason) for a refused one, (None, "") else."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) in LINEAR_MODULES:  # subclasses may override forward (LoRA...)
            return Site(node, node.target, "Linear", m.weight, m.bias, node.args[0], m), ""
        if type(m) in CONV_MODULES and all(k == 1 for k in m.kernel_size):
            pointwise = (
                all(v == 1 for v in m.stride)
                and all(v == 1 for v in m.dilation)
                and m.groups == 1
                and not isinstance(m.padding, str)
                and all(v == 0 for v in m.padding)
            )
            if not pointwise:  # stride / padding / groups: not one matrix on every pixel
                return None, "not-pointwise"
            d = len(m.kernel_size)
            weight = m.weight.reshape(m.out_channels, m.in_channels)
            return (
                Site(node, node.target, f"{type(m).__name__}(1x1)", weight, m.bias,
                      node.args[0], m, spatial_dims=d),
                "",
            )  # fmt: skip
        return None, ""
    if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
        return None, ""
    values = dict(zip(("input", "weight", "bias"), node.args, strict=False))
    values.update(node.kwargs)
    weight_node, bias_node = values.get("weight"), values.get("bias")
    attr_nodes = tuple(n for n in (weight_node, bias_node) if isinstance(n, fx.Node))
    if not isinstance(weight_node, fx.Node) or any(n.op != "get_attr" for n in attr_nodes):
        return None, "weight-not-constant"
    weight = fetch_attr(gm, weight_node.target)
    bias = fetch_attr(gm, bias_node.target) if isinstance(bias_node, fx.Node) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None, "weight-not-constant"
    return (
        Site(node, node.name, "F.linear", weight, bias, values["input"], attr_nodes=attr_nodes),
        "",
    )


# ------------------------------------------------------------------------------------------------
# the layers' inputs, by running the graph


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps (up to ``rows`` rows of) each site's input, channels last."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], rows: int) -> None:
        super().__init__(gm)
        self.sites = {s.node: s for s in sites}
        self.rows = rows
        self.seen: dict[fx.Node, list[torch.Tensor]] = {s.node: [] for s in sites}
        self.count: Counter = Counter()
        self.first_shape: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        site = self.sites.get(n)
        if site is not None and self.count[n] < self.rows and site.input_node in self.env:
            x = self.env[site.input_node].detach()
            self.first_shape.setdefault(n, tuple(x.shape))
            if site.spatial_dims:
                x = x.movedim(1, -1)
            flat = x.reshape(-1, site.in_features)[: self.rows - self.count[n]]
            self.seen[n].append(flat.clone())
            self.count[n] += flat.shape[0]
        return super().run_node(n)

    def full(self) -> bool:
        return all(self.count[n] >= self.rows for n in self.sites)


def record_inputs(
    gm: fx.GraphModule, sites: Sequence[Site], batches: Iterable[tuple[Any, ...]], rows: int
) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, tuple[int, ...]]]:
    recorder = _Recorder(gm, sites, rows)
    with torch.no_grad():
        for batch in batches:
            recorder.run(*batch)
            if recorder.full():
                break
    found = {n: torch.cat(parts) for n, parts in recorder.seen.items() if parts}
    return found, recorder.first_shape


# ------------------------------------------------------------------------------------------------
# rewriting


def apply(gm: fx.GraphModule, site: Site, module: nn.Module) -> None:
    """Put ``module`` in place of the layer at ``site`` (the only mutation of the pass).

    The substitute trains like the layer it replaces (``requires_grad``, train/eval mode), so a
    fine-tuning hook sees it as a normal part of the graph.
    """
    training = site.module.training if site.module is not None else gm.training
    module.requires_grad_(site.weight.requires_grad).train(training)
    if site.module is not None:
        *path, name = site.node.target.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        setattr(owner, name, module)
        return
    name = free_name(gm, f"{site.node.name}_substitute", bare=True, start=1)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_module(name, (site.input_node,))
    new.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new)
    gm.graph.erase_node(site.node)
    for attr in site.attr_nodes:
        if not attr.users:
            gm.graph.erase_node(attr)
            *path, leaf = attr.target.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)
