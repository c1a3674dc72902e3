"""Import an ONNX model as a ``torch.fx.GraphModule``.

``import_onnx(model)`` walks the ONNX graph in order and hands every node to a converter looked up
in a table (``op_type -> function``); ``SUPPORTED_OPS`` is the set of the table's keys.  A
converter receives a :class:`~graphopt.frontends.onnx.context.Ctx` (the node, its attributes and
inputs, and helpers that emit FX nodes) and returns the values of the node's outputs.

Values flowing between converters are one of three kinds:

* ``torch.Tensor`` -- a constant known at import time (initializers, ``Constant`` nodes, and the
  results of nodes whose inputs are all constant: every emit helper evaluates eagerly when none of
  its arguments is an FX node, so constant subgraphs are folded away).  Constants that reach a
  runtime op become buffers of the root module, read through ``get_attr``.
* ``torch.fx.Node`` -- a runtime tensor.
* :class:`~graphopt.frontends.onnx.values.Sym` -- a "shape value": a small 1-D (or 0-D) integer tensor kept as a Python list
  whose items are ints or FX nodes such as ``x.size(0)``.  ``Shape`` produces these and
  ``Gather``/``Slice``/``Concat``/``Unsqueeze``/``Squeeze``/``Cast``/arithmetic keep them
  symbolic, so that the ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains that torch's
  exporter emits for a dynamic batch become ``x.reshape(x.size(0), -1)`` -- which keeps working
  for any batch size and stays dynamic when the GraphModule is exported to ONNX again.

Conv, ConvTranspose, BatchNormalization, Gemm and MatMul-by-a-constant become real ``nn.Conv*d``,
``nn.ConvTranspose*d``, ``nn.BatchNorm*d`` and ``nn.Linear`` submodules (``call_module``), so graph
passes written for traced PyTorch models apply to imported ONNX models too.  A ``MatMul`` whose only
consumer is an ``Add`` of a 1-D constant becomes one ``nn.Linear`` with a bias.

The GraphModule comes back in eval mode.  ONNX's BatchNormalization (``training_mode=0``) is an
inference op, so its modules are :class:`OnnxBatchNorm2d` (and 1d/3d): ``nn.BatchNorm*d``
subclasses that stay in eval mode whatever ``.train()`` says -- running statistics, never updated.

Dtypes and shapes follow the ONNX spec, not torch's promotion: ``Pow`` has the base's type,
integer ``Div`` truncates, ``ReduceSum``/``ReduceMean`` keep integer types, 0-D values stay 0-D.
uint16/32/64 (which torch stores but cannot compute with) are computed in int64 and wrapped back
for arithmetic, comparisons, Max/Min/Clip and ReduceSum/Max/Min; float8 (storage only in torch)
is accepted by Cast and data movement.  Any other op on these dtypes, and graph inputs of types
torch lacks (int4, string, ...), are refused at import with a :class:`CaptureError` naming the node
-- rather than a NotImplementedError when the graph runs.  :func:`to_numpy` / :func:`from_numpy`
convert bfloat16 and float8 tensors to and from the ml_dtypes arrays that ONNX Runtime and
``onnx.reference`` use.

Placeholders carry the ONNX input's declared shape and dtype in ``node.meta["onnx_shape"]`` (dims
are ints, strings for symbolic dims, or None) and ``node.meta["onnx_dtype"]`` (a ``torch.dtype``;
``node.meta["onnx_elem_type"]`` holds the ONNX enum) and its name in ``node.meta["onnx_name"]``.
Every graph input gets a placeholder, in order, used or not.  ``gm.meta`` records the ONNX input
names (``"onnx_input_names"``), output names (``"onnx_output_names"``) and the opset
(``"onnx_opset"``); the output node's ``meta["onnx_output_names"]`` repeats the output names,
since graph passes keep node meta but may build a new GraphModule.

Note for re-export: ``torch.onnx.export(gm, ..., dynamo=False, dynamic_axes=...)`` needs
``input_names`` and ``output_names`` passed explicitly (the TorchScript exporter otherwise mistakes
the GraphModule's ``graph`` attribute for a TorchScript graph).

The package:

    load.py        reading and validating a file, bytes or ModelProto (:func:`load_onnx`)
    values.py      dtypes, tensors and shape values (:func:`from_numpy`, Sym; :func:`to_numpy` is
                   the backends' own, re-exported)
    context.py     the graph under construction (ImportState) and a node's view of it (Ctx)
    importer.py    the graph walk (:func:`import_onnx`)
    runtime.py     functions the imported graph calls when it runs
    ops/           the converters, grouped by kind, and their table (:data:`SUPPORTED_OPS`)
"""

from __future__ import annotations

from graphopt.backends.arrays import to_numpy
from graphopt.frontends.onnx.importer import import_onnx
from graphopt.frontends.onnx.load import ModelSource, load_onnx
from graphopt.frontends.onnx.ops import SUPPORTED_OPS
from graphopt.frontends.onnx.ops.normalization import (
    OnnxBatchNorm1d,
    OnnxBatchNorm2d,
    OnnxBatchNorm3d,
)
from graphopt.frontends.onnx.values import from_numpy

__all__ = [
    "SUPPORTED_OPS",
    "ModelSource",
    "OnnxBatchNorm1d",
    "OnnxBatchNorm2d",
    "OnnxBatchNorm3d",
    "from_numpy",
    "import_onnx",
    "load_onnx",
    "to_numpy",
]
