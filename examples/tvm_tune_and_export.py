"""Tune a model with TVM through graphopt, export a shared library, run it without graphopt.

    python examples/tvm_tune_and_export.py            # digits_cnn, 2 minutes of tuning
    python examples/tvm_tune_and_export.py resnet18 10

The first run tunes (progress bar) into the per-target database under the cache directory; run
it again and the records are applied without tuning. The report lists any task left untuned.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import graphopt
from graphopt import zoo


def main(name: str = "digits_cnn", minutes: float = 2.0) -> None:
    entry = zoo.get(name)
    result = graphopt.optimize(
        entry.model, "cpu", entry.example_inputs, backend="tvm", tune_minutes=minutes,
        progress=True,
    )  # fmt: skip
    print(result.report)

    out = Path(tempfile.mkdtemp())
    lib = result.save(out / f"{name}.so")
    x = entry.example_inputs[0].numpy()
    np.save(out / "x.npy", x)
    # a fresh process with TVM's runtime only: no graphopt, no torch model
    script = (
        "import numpy as np, tvm.runtime\n"
        "from tvm.runtime.vm import VirtualMachine\n"
        f"vm = VirtualMachine(tvm.runtime.load_module({str(lib)!r}), tvm.cpu())\n"
        f"y = vm['main'](tvm.runtime.tensor(np.load({str(out / 'x.npy')!r})))[0].numpy()\n"
        f"np.save({str(out / 'y.npy')!r}, y)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    y = np.load(out / "y.npy")
    expected = entry.model(entry.example_inputs[0]).detach().numpy()
    print(f"\n{lib}: max |difference| to the torch model in a fresh process: "
          f"{np.abs(y - expected).max():.2e}")  # fmt: skip


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["digits_cnn"]), *(float(a) for a in sys.argv[2:3]))
