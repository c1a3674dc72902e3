"""Frontends: how a model gets into graphopt's IR (a torch.fx GraphModule).

``torch``: capture of an ``nn.Module``; ``onnx``: import of an ONNX model.
"""
