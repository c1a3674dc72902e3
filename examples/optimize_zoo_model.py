"""Optimize a zoo model for this CPU, check it, save it. Run: python examples/optimize_zoo_model.py"""

import torch

import graphopt
from graphopt import zoo

entry = zoo.get("mobilenetv2")
result = graphopt.optimize(entry.model, "cpu", example_inputs=entry.example_inputs)
print(result.report)

x = torch.randn(4, 3, 224, 224)
with torch.no_grad():
    print(
        "max |optimized - original| on a batch of 4:",
        float((result(x) - entry.model(x)).abs().max()),
    )
result.save("mobilenetv2.opt.onnx")
print("saved mobilenetv2.opt.onnx")
