"""``graphopt.tune_mode``: a copy of a model for fine-tuning with frozen BatchNorm, in Tune mode.

    >>> import graphopt
    >>> model.eval()                                  # freeze BatchNorm: Eval mode
    >>> tuned = graphopt.tune_mode(model)             # same function and gradients, less memory
    >>> tuned.train()                                 # dropout on; BatchNorm stays frozen
    >>> opt = torch.optim.SGD(tuned.parameters(), lr=0.01, momentum=0.9)
    >>> loss_fn(tuned(x), y).backward(); opt.step()
    >>> model.load_state_dict(tuned.state_dict())     # the checkpoint fits the original model

Tune mode (the ``tune-conv-bn`` pass, "Efficient ConvBN Blocks for Transfer Learning and
Beyond", ICLR 2024) computes every Conv + BatchNorm block as one convolution whose weight and
bias are folded from the conv and BN parameters in each forward pass. The result trains exactly
like the original model with its BatchNorms in eval mode (outputs and gradients equal up to
float rounding), with memory and speed close to Deploy mode's (BatchNorm folded once):
``benchmarks/bench_tune_mode.py`` measures all three.

What is guaranteed:

* the user's model is never changed (it is deep-copied);
* the result is an ``fx.GraphModule`` with the original module paths: the same state_dict keys
  (parameters and buffers the forward never reads are carried over, tensors the tracer adds are
  not saved), so ``model.load_state_dict(tuned.state_dict())`` works with ``strict=True``; its
  parameters are the copy's conv and BN parameters themselves, with their ``requires_grad``;
* every BatchNorm with running statistics is frozen: tuned blocks and the other BatchNorms
  (``frozen_batch_norm``) normalise with the running statistics even after ``.train()``, which
  only switches dropout and the like; the BN modules' ``training`` flag is then ignored. The
  running statistics are never updated. BatchNorms without running statistics
  (``track_running_stats=False``) use batch statistics, in train and eval mode alike, as before;
  BatchNorm subclasses with their own ``forward`` are left as they are;
* it works with ``torch.compile`` (forward and backward; dynamo traces the custom autograd
  function of a tuned block). Not supported: double backward (it raises, never returns a wrong
  second derivative).

A model whose BatchNorms are in training mode is refused with a :class:`GraphoptError`: Tune
mode *is* Eval mode's computation, and silently freezing BatchNorms that were set to learn
their statistics would change the training. Call ``model.eval()`` (or ``.eval()`` on the
BatchNorm layers) first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from graphopt._util import first_line
from graphopt.core.pass_infra import PassContext
from graphopt.errors import CaptureError, GraphoptError, graphopt_errors_only
from graphopt.frontends.inputs import as_tensors, check_runs
from graphopt.frontends.torch import LeafTracer, copy_model, failing_line
from graphopt.passes.tune_conv_bn import TuneConvBN
from graphopt.pipeline import PassManager

__all__ = ["tune_mode"]

log = logging.getLogger(__name__)

#: where ``tune_mode`` leaves the pass statistics on the returned module (``gm.meta[STATS]``)
STATS = "graphopt.tune_conv_bn"


@graphopt_errors_only
def tune_mode(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """A copy of ``model`` for fine-tuning in Tune mode (see the module docstring).

    ``example_inputs``, when given, are run through the original and the tuned module and the
    outputs compared under the pass's ``exact`` contract (a mismatch raises
    :class:`VerificationError`). ``leaf_modules`` / ``concrete_args`` help symbolic tracing as
    in :func:`graphopt.capture`. The pass statistics (``tuned``, ``frozen``,
    ``skipped:<reason>``) are in ``result.meta["graphopt.tune_conv_bn"]``.

    >>> tuned = graphopt.tune_mode(model.eval(), (torch.randn(2, 3, 224, 224),))
    >>> tuned.meta["graphopt.tune_conv_bn"]
    {'tuned': 53}
    """
    if not isinstance(model, nn.Module):
        raise GraphoptError(
            f"tune_mode takes a torch.nn.Module; got {type(model).__name__}. (An ONNX model "
            "cannot be fine-tuned in PyTorch.)"
        )
    training = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    if training:
        shown = ", ".join(training[:3]) + (
            f" and {len(training) - 3} more" if len(training) > 3 else ""
        )
        raise GraphoptError(
            f"tune_mode computes Eval mode (BatchNorm frozen at its running statistics), but "
            f"{len(training)} BatchNorm layer(s) are in training mode: {shown}. Call "
            "model.eval() first (or .eval() on the BatchNorm layers only), then tune_mode(model); "
            "call .train() on the returned module for dropout: its BatchNorms stay frozen."
        )
    inputs = as_tensors(example_inputs) if example_inputs is not None else None
    # the copy is made for training: under torch.inference_mode() its parameters would be
    # inference tensors, which autograd cannot save ("Inference tensors cannot be saved for
    # backward" at the first loss.backward()); made outside it, they are normal parameters
    with torch.inference_mode(False):
        model = copy_model(model, "tune_mode works")
    if inputs is not None:
        check_runs(model, inputs)
    gm = _trace(model, leaf_modules, concrete_args)
    _match_state_dict(gm, model)
    # verify in eval mode (dropout off); the user's per-module flags are restored afterwards
    flags = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        result = PassManager([TuneConvBN(freeze_bn=True)], strict=True).run(
            gm, PassContext(sample_inputs=inputs)
        )
    finally:
        for m, flag in flags.items():
            m.training = flag
    gm = result.graph
    stats = dict(result.records[0].stats)
    gm.meta[STATS] = stats
    if not stats.get("tuned"):
        log.warning("tune_mode found no Conv + BatchNorm block to tune (%s)", stats or "no BN")
    else:
        log.info("tune_mode: %s", stats)
    return gm


def _trace(model: nn.Module, leaf_modules, concrete_args) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model  # already a graph (a copy): its call_module nodes are what the pass needs
    try:
        tracer = LeafTracer(leaf_modules)
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        where, owner = failing_line(exc)
        leaf = f"leaf_modules=[{owner}]" if owner else "leaf_modules=[TheModuleClass]"
        raise CaptureError(
            f"tune_mode could not trace the model: symbolic tracing failed at {where}\n"
            f"  tracing error: {first_line(exc)}\n"
            "Tune mode needs an FX graph that keeps Conv and BatchNorm as modules (torch.export's "
            "aten graphs do not). How to fix it:\n"
            f"  - keep the module with that line opaque: tune_mode(model, {leaf});\n"
            "  - if the branch depends on a non-tensor argument, fix it with "
            "concrete_args={'flag': True};\n"
            "  - or rewrite data-dependent control flow with torch.where / torch.cond."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _match_state_dict(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make ``gm.state_dict()`` have exactly ``model.state_dict()``'s keys.

    The tracer copies only what the forward reads, and registers every tensor read by a
    ``get_attr`` (non-persistent buffers, constants it created) as a persistent buffer.
    """
    want = model.state_dict(keep_vars=True)
    have = gm.state_dict(keep_vars=True)
    for key in want.keys() - have.keys():
        # never read by the forward: carried over, so a checkpoint saved from gm is complete
        *path, name = key.split(".")
        try:
            value = getattr(model.get_submodule(".".join(path)), name)
        except AttributeError:
            continue  # extra state written by a custom _save_to_state_dict: nothing to carry
        if not isinstance(value, torch.Tensor):
            continue
        owner = _module_at(gm, path)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(name, value)
        else:
            owner.register_buffer(name, value)
    for key in have.keys() - want.keys():
        # a tensor the original does not save: read by the graph, not written to checkpoints
        *path, name = key.split(".")
        owner = gm.get_submodule(".".join(path))
        if name in owner._buffers:
            owner._non_persistent_buffers_set.add(name)


def _module_at(root: nn.Module, path: list[str]) -> nn.Module:
    """The submodule at ``path``, creating empty containers on the way."""
    module = root
    for part in path:
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module
