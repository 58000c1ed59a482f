"""ONNX models: an onnxruntime session wrapped as a Classifier (logits only, no gradients).

ONNX is what often ships to production, so certifying the exported graph (not the PyTorch
module it came from) certifies what is deployed. onnxruntime gives no input gradients:
gradient metrics are reported as not applicable, and a parity check
(:mod:`robust_cert.metrics.parity`) compares the graph with its source model.

The ``onnx`` package is optional here: with it, the opset is recorded and external weight
files are included in the hash; without it, onnxruntime alone loads and runs the graph.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import torch

from robust_cert.errors import ModelError
from robust_cert.models.base import Classifier
from robust_cert.models.torch import probe_num_classes

log = logging.getLogger(__name__)

#: Default largest number of rows sent to onnxruntime in one call (bounds its memory use).
DEFAULT_MAX_BATCH = 1024

#: onnxruntime input element types accepted, with the numpy dtype fed to each.
_FLOAT_INPUTS = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


def from_onnx(
    model,
    *,
    device: torch.device,
    sha256: str | None = None,
    name: str = "model",
    input_shape: tuple[int, ...] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Classifier:
    """Load an ONNX classifier into onnxruntime and wrap it as a Classifier.

    Args:
        model: path to a ``.onnx`` file (str or Path), its bytes, or an ``onnx.ModelProto``.
        device: where the caller keeps its tensors. With ``cuda`` and an onnxruntime that has
            ``CUDAExecutionProvider`` the graph runs on that GPU; otherwise on CPU, and the
            Classifier's device is CPU so the engine does not move data back and forth.
        sha256: identity to record; default the SHA-256 of the ``.onnx`` bytes (followed by
            each external weight file, in name order, when the ``onnx`` package can list them).
        name: model name for the certificate (default ``"model"``).
        input_shape: per-sample shape (no batch dimension) for graph dimensions that are
            symbolic; must agree with the dimensions the graph fixes. Default: the graph's.
        max_batch: most rows per onnxruntime call (default 1024); larger batches are split.

    Guarantees: the graph has one float input of shape ``(batch, *input_shape)`` and its first
    output is float ``(batch, classes)`` with at least 2 classes (checked by a probe run).
    A batch dimension fixed in the graph (e.g. 1) is honoured by running chunks of exactly
    that size, the last one padded by repeating its final row and the padding dropped.
    ``forward`` accepts a float tensor on any device and returns float32 logits on the same
    device. Raises ModelError with a one-line reason for a missing file, a file that is not
    ONNX, an opset or IR version onnxruntime cannot run, several inputs, a non-float input,
    or an output that is not 2-D.
    """
    import onnxruntime as ort

    if max_batch < 1:
        raise ModelError(f"max_batch must be >= 1, got {max_batch}")
    source, payload, digest, proto, uri = _read(model)
    opset = _opset(proto)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                     "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the count the certificate records
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only; warnings about old opsets would flood logs
    try:
        session = ort.InferenceSession(payload, sess_options=opts, providers=providers)
    except Exception as exc:
        raise ModelError(_explain_load_error(source, exc, opset, ort.__version__)) from None
    used = session.get_providers()
    run_device = device if used[0] == "CUDAExecutionProvider" else torch.device("cpu")
    if run_device != device:
        log.info("%s runs on onnxruntime's CPU provider, not on %s", source, device)

    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"{source}: the graph has {len(inputs)} inputs ({names}); "
                         "a classifier takes exactly one")
    inp = inputs[0]
    if inp.type not in _FLOAT_INPUTS:
        raise ModelError(f"{source}: input {inp.name!r} is {inp.type}; a float tensor is needed")
    batch_dim, shape = _input_dims(source, inp, input_shape)
    out = session.get_outputs()[0]
    if out.shape and len(out.shape) != 2:  # [] or None: rank unknown, the probe decides
        raise ModelError(f"{source}: output {out.name!r} has shape {_fmt(out.shape)}; "
                         "expected (batch, classes), 2-D")
    if out.type not in _FLOAT_INPUTS:
        raise ModelError(f"{source}: output {out.name!r} is {out.type}; float logits are needed")

    forward = OrtForward(session, inp.name, out.name, _FLOAT_INPUTS[inp.type],
                         batch_dim, max_batch)
    num_classes = forward.num_classes = probe_num_classes(forward, shape, run_device)
    return Classifier(
        forward=forward,
        input_shape=shape,
        num_classes=num_classes,
        sha256=sha256 or digest,
        format="onnx",
        differentiable=False,
        device=run_device,
        name=name,
        uri=uri,
        extra={"opset": opset, "onnxruntime": ort.__version__, "providers": used},
    )


class OrtForward:
    """Callable ``Tensor -> Tensor`` running an onnxruntime session in bounded chunks.

    ``batch_dim`` is the graph's fixed batch size, or None when it is dynamic; chunks are of
    that size (padded) or of at most ``max_batch`` rows.
    """

    def __init__(self, session, input_name: str, output_name: str, dtype,
                 batch_dim: int | None, max_batch: int):
        self.session, self.input_name, self.output_name = session, input_name, output_name
        self.dtype, self.batch_dim, self.max_batch = dtype, batch_dim, max_batch
        self.num_classes = 0  # set once known, to shape the answer for an empty batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.dtype,
                                                                             copy=False)
        step = self.batch_dim or self.max_batch
        chunks = []
        for start in range(0, arr.shape[0], step):
            part = arr[start:start + step]
            rows = part.shape[0]
            if self.batch_dim and rows < self.batch_dim:
                pad = [(0, self.batch_dim - rows)] + [(0, 0)] * (part.ndim - 1)
                part = np.pad(part, pad, mode="edge")
            out = self.session.run([self.output_name], {self.input_name: part})[0]
            chunks.append(np.asarray(out)[:rows])
        if not chunks:  # an empty batch: onnxruntime is not asked about zero rows
            return torch.zeros((0, self.num_classes), dtype=torch.float32, device=x.device)
        logits = np.concatenate(chunks).astype(np.float32, copy=False)
        return torch.from_numpy(np.ascontiguousarray(logits)).to(x.device)


def _read(model):
    """(source label, what onnxruntime loads, sha256, ModelProto or None, uri)."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"ONNX model file not found: {path}")
        data = path.read_bytes()
        proto = _parse(str(path), data)
        h = hashlib.sha256(data)
        for loc in _external_locations(proto):  # weights saved beside the graph
            ext = path.parent / loc
            if ext.is_file():
                h.update(f"\n{loc}\n".encode())
                h.update(ext.read_bytes())
        # onnxruntime loads from the path so that external weight files are found
        return str(path), str(path), h.hexdigest(), proto, str(path.resolve())
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        proto = _parse("ONNX bytes", data)
        return "ONNX bytes", data, hashlib.sha256(data).hexdigest(), proto, None
    if type(model).__name__ == "ModelProto" and hasattr(model, "SerializeToString"):
        data = model.SerializeToString()
        return "ONNX ModelProto", data, hashlib.sha256(data).hexdigest(), model, None
    raise ModelError(f"expected an .onnx path, bytes or onnx.ModelProto, got "
                     f"{type(model).__name__}")


def _parse(source: str, data: bytes):
    """The ModelProto (external weights not loaded), or None without the onnx package."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        proto = onnx.load_model_from_string(data)  # external weights stay on disk
    except Exception:
        raise ModelError(f"{source}: not an ONNX model (protobuf parsing failed)") from None
    if not proto.HasField("graph"):
        raise ModelError(f"{source}: not an ONNX model (no graph)")
    return proto


def _opset(proto) -> int | None:
    """The default-domain (ai.onnx) opset the graph is stamped with."""
    if proto is None:
        return None
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def _external_locations(proto) -> list[str]:
    """Sorted file names of tensors stored outside the .onnx file (subgraphs included)."""
    if proto is None:
        return []
    locs: set[str] = set()

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors(attr.g)
                for sub in attr.graphs:
                    yield from tensors(sub)

    for t in tensors(proto.graph):
        if t.data_location == 1:  # TensorProto.EXTERNAL
            locs.update(e.value for e in t.external_data if e.key == "location")
    return sorted(locs)


def _explain_load_error(source: str, exc: Exception, opset: int | None, ort_version: str) -> str:
    msg = str(exc)
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    if "INVALID_PROTOBUF" in msg or "protobuf parsing failed" in msg or "No graph" in msg:
        return f"{source}: not an ONNX model (onnxruntime cannot parse it)"
    if "IR version" in msg:
        m = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", msg)
        detail = f" {m[1]}; it supports up to {m[2]}" if m else ""
        return f"{source}: onnxruntime {ort_version} cannot run this ONNX IR version{detail}"
    m = re.search(r"is till opset (\d+)", msg)
    if m or "official released onnx opset" in msg:
        stamped = f" {opset}" if opset is not None else ""
        upto = f"; it supports up to opset {m[1]}" if m else ""
        return f"{source}: onnxruntime {ort_version} cannot run opset{stamped}{upto}"
    if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
        at = f" at opset {opset}" if opset is not None else ""
        detail = re.sub(r"^.*?NOT_IMPLEMENTED : ", "", first)
        return f"{source}: onnxruntime {ort_version} cannot run this graph{at}: {detail}"
    return f"{source}: onnxruntime cannot load the model: {first}"


def _input_dims(source: str, inp, input_shape) -> tuple[int | None, tuple[int, ...]]:
    """(fixed batch size or None, per-sample shape) of the graph input."""
    dims = list(inp.shape or [])
    if not dims:
        raise ModelError(f"{source}: input {inp.name!r} has no batch dimension (shape "
                         f"{_fmt(inp.shape)}); expected (batch, ...)")
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    rest = dims[1:]
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        fixed = [(i, d) for i, d in enumerate(rest) if isinstance(d, int) and d > 0]
        if len(input_shape) != len(rest) or any(input_shape[i] != d for i, d in fixed):
            raise ModelError(f"{source}: input {inp.name!r} has shape {_fmt(inp.shape)}, which "
                             f"does not fit the expected per-sample shape {input_shape}")
        return batch, input_shape
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ModelError(f"{source}: input {inp.name!r} has shape {_fmt(inp.shape)} with "
                         "symbolic per-sample dimensions; pass input_shape")
    return batch, tuple(rest)


def _fmt(shape) -> str:
    if shape is None:
        return "unknown"
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"
