"""A deep copy of a module graph, as ``copy.deepcopy`` makes it, 1.4-1.7x faster
(``benchmarks/bench_backup_copy.py``: fuzz CNNs 1.38x, mobileone_s0 1.52x, resnet18 1.72x).

The pass manager copies the graph before every pass (the rollback backup), and on the small
graphs of the fuzz profiles and of most users' first runs the copy cost more than the passes:
``copy.deepcopy`` rebuilds each submodule through ``__reduce_ex__`` and deep-copies every one of
its ~20 bookkeeping attributes (a dozen empty hook dictionaries per module). :func:`deep_copy`
copies a plain ``nn.Module``'s ``__dict__`` itself: numbers, strings and empty containers as
they are (what ``deepcopy`` returns for them too), tensors and everything else through
``copy.deepcopy`` with one shared memo, so tied weights stay tied and an object reached twice is
copied once. A ``GraphModule`` is copied by torch's own ``__deepcopy__`` (the graph's
``graph_copy`` and a recompile), after its submodules are in the memo. A module
class that customises copying or pickling (``__deepcopy__``, ``__reduce_ex__``,
``__getstate__``) is left to ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, TypeVar

import torch
from torch import fx, nn

M = TypeVar("M", bound=nn.Module)

# what copy.deepcopy returns unchanged (its atomic types), and the torch ones it treats alike
_ATOMS = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        type,
        range,
        type(Ellipsis),
        type(NotImplemented),
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
    }
)


def deep_copy(module: M) -> M:
    """What ``copy.deepcopy(module)`` returns (an independent module with the same values,
    tied tensors tied, training flags and hooks kept), faster for ``nn.Module`` trees."""
    return _module(module, {})


def _plain(cls: type) -> bool:
    """A module class that copies as nn.Module does: no copy or pickle hooks of its own but
    ``__setstate__`` (conv's fills in ``padding_mode``), which ``deepcopy`` calls too."""
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is nn.Module.__reduce_ex__
        and cls.__reduce__ is nn.Module.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and cls.__new__ is nn.Module.__new__
    )


def _module(m: nn.Module, memo: dict[int, Any]) -> Any:
    done = memo.get(id(m))
    if done is not None:
        return done
    if isinstance(m, fx.GraphModule):
        for child in m._modules.values():
            if child is not None:
                _module(child, memo)
        return copy.deepcopy(m, memo)  # torch's: graph_copy, then __init__ and recompile
    cls = type(m)
    if not _plain(cls):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    new.__setstate__({k: _value(v, memo) for k, v in m.__dict__.items()})
    return new


def _value(v: Any, memo: dict[int, Any]) -> Any:
    t = type(v)
    if t in _ATOMS:
        return v
    if isinstance(v, nn.Module):
        return _module(v, memo)
    if (t is dict or t is OrderedDict) and all(type(k) in _ATOMS for k in v):
        done = memo.get(id(v))
        if done is not None:
            return done
        new = t()
        memo[id(v)] = new
        for k, x in v.items():
            new[k] = _value(x, memo)
        return new
    if t is set and not v:
        return set()
    if t is tuple and all(type(x) in _ATOMS for x in v):
        return v
    return copy.deepcopy(v, memo)
