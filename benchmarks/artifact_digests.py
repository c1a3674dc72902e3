"""Digests of optimize()'s artifacts on zoo models: a refactor that changes no behaviour leaves
every digest as it was, so the latency figures of the other benchmarks cannot move.

    python benchmarks/artifact_digests.py                      # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/artifact_digests.py   # another one

A digest covers every node (op, inputs, outputs, attributes) and every initializer's name and
bytes of the ONNX model the artifact runs. digits_cnn goes through int8 (2 batches of 8 seeded
random inputs), the others through the default fp32 pipeline.
"""

from __future__ import annotations

import argparse
import hashlib

import onnx
import torch

import graphopt
from graphopt import zoo

MODELS = ["resnet18", "mobilenetv2", "mobileone_s0", "repvgg_a0", "dbb_resnet18", "acnet_resnet18"]
MODELS += ["vit_s", "digits_cnn"]


def digest(proto: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for n in proto.graph.node:
        attrs = sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute)
        h.update(f"{n.op_type}{list(n.input)}{list(n.output)}{attrs}".encode())
    for t in sorted(proto.graph.initializer, key=lambda t: t.name):
        h.update(t.name.encode() + onnx.numpy_helper.to_array(t).tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    args = parser.parse_args()
    print(f"graphopt from {graphopt.__file__}")
    for name in args.models:
        zm = zoo.get(name)
        options = {}
        if name == "digits_cnn":
            gen = torch.Generator().manual_seed(0)
            shape = zm.example_inputs[0].shape[1:]
            calib = [(torch.randn((8, *shape), generator=gen),) for _ in range(2)]
            options = {"precision": "int8", "calibration_data": calib}
        result = graphopt.optimize(
            zm.model, "cpu", example_inputs=zm.example_inputs, measure=False, **options
        )
        proto = result.artifact.proto
        print(f"{name:<16} {len(proto.graph.node):>4} nodes  {digest(proto)}", flush=True)


if __name__ == "__main__":
    main()
