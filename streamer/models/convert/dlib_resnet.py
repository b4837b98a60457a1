"""dlib's face recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) to ONNX, without dlib.

The file format and the network are described in docs/dlib-resnet-format.md (shared docs). In short:
dlib serialises the network recursively, so the file holds (A) the loss layer and one version code per
layer wrapper, top-down; (B) the input layer; (C) each layer's parameters, bottom-up. Tag and skip
wrappers are both written as the code 1 and carry no ids, so the architecture cannot be read from the
file: it is hard-coded below (from dlib's `dnn_face_recognition_ex.cpp`) and checked against region A.
Every byte of the file must be consumed, which catches any misreading.

The ONNX graph takes `image` float32 [N,150,150,3] (NHWC, RGB, 0..255; an aligned dlib chip) and returns
`descriptor` float32 [N,128], the raw (not normalised) fc output that dlib compares by Euclidean distance.
The loss layer's distance threshold is stored in the model's metadata (`distance_threshold`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.errors import ModelError

INPUT_NAME = "image"
OUTPUT_NAME = "descriptor"
OPSET = 17
# Metadata keys written into the ONNX file (read back by streamer.infer.embedders).
META_THRESHOLD = "distance_threshold"
META_MARGIN = "loss_margin"
META_METRIC = "metric"
META_MODEL = "model"
MODEL_ID = "dlib_resnet_v1"

# -- the architecture ---------------------------------------------------------------------------
# Tokens bottom-up (input side first): ("con", filters, stride), ("affine",), ("relu",),
# ("max_pool",), ("avg_pool",), ("avg_pool_all",), ("fc",), ("add_prev", tag), ("tag", id), ("skip", id).


def _block(filters: int, stride: int) -> list[tuple]:
    return [("con", filters, stride), ("affine",), ("relu",), ("con", filters, 1), ("affine",)]


def _ares(filters: int) -> list[tuple]:
    # relu<add_prev1<block<N,1,tag1<SUBNET>>>>
    return [("tag", 1), *_block(filters, 1), ("add_prev", 1), ("relu",)]


def _ares_down(filters: int) -> list[tuple]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<SUBNET>>>>>>>
    return [
        ("tag", 1),
        *_block(filters, 2),
        ("tag", 2),
        ("skip", 1),
        ("avg_pool",),
        ("add_prev", 2),
        ("relu",),
    ]


ARCHITECTURE: tuple[tuple, ...] = tuple(
    [("con", 32, 2), ("affine",), ("relu",), ("max_pool",)]
    + _ares(32) * 3
    + _ares_down(64) + _ares(64) * 3
    + _ares_down(128) + _ares(128) * 2
    + _ares_down(256) + _ares(256) * 2
    + _ares_down(256)
    + [("avg_pool_all",), ("fc",)]
)

# What dlib wrote for this model in region A (top-down), quoted from the format notes; the hard-coded
# architecture must reproduce it.
EXPECTED_WRAPPER_CODES = (
    "2222211222221222222212222222122211222221222222212222222122211222221222222212222222122222221222"
    "112222212222222122222221222222212223"
)

# Version strings accepted per layer kind (the 2017 file uses the first of each; newer dlib writes
# the others when a network is re-saved).
_VERSIONS = {
    "con": ("con_4", "con_5", "con_6"),
    "affine": ("affine_", "affine_2", "bn_con2"),
    "relu": ("relu_", "relu_2"),
    "max_pool": ("max_pool_2",),
    "avg_pool": ("avg_pool_2",),
    "avg_pool_all": ("avg_pool_2",),
    "add_prev": ("add_prev_",),
    "fc": ("fc_2", "fc_3"),
}


def expected_wrapper_codes(final_wrapper_version: int = 3) -> str:
    """Region A's codes implied by ARCHITECTURE: 2 per layer, 1 per tag/skip, the bottom layer's last."""
    codes = ["1" if token[0] in ("tag", "skip") else "2" for token in reversed(ARCHITECTURE)]
    codes[-1] = str(final_wrapper_version)
    return "".join(codes)


# -- reading dlib's serialisation ------------------------------------------------------------------


class _Reader:
    """dlib's `serialize.h` primitives over an in-memory file; every misread raises ModelError."""

    def __init__(self, data: bytes, source: Path) -> None:
        self.data = data
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> ModelError:
        return ModelError(
            f"{self.source} is not a dlib face recognition ResNet file this converter understands: "
            f"{what} (at byte {self.pos} of {len(self.data)})"
        )

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends early (needs {n} more bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in special:
            return special[exponent]
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        length = self.int()
        if not 0 <= length <= 1 << 16:
            raise self.fail(f"implausible string length {length}")
        return self._take(length).decode("ascii", errors="replace")

    def bool(self) -> bool:
        byte = self._take(1)
        if byte not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {byte!r}")
        return byte == b"1"

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise self.fail(f"tensor version {version}, expected 2")
        shape = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.fail(f"negative tensor shape {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise self.fail(f"alias tensor version {version}, expected 1")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def expect_version(self, kind: str) -> str:
        version = self.string()
        if version not in _VERSIONS[kind]:
            raise self.fail(f"layer version {version!r} where the architecture has a {kind} layer")
        return version


@dataclass
class Layer:
    """One computing layer's inference parameters, in the form the graph builder needs."""

    kind: str
    weight: np.ndarray | None = None  # conv OIHW, fc [in, out], affine gamma
    bias: np.ndarray | None = None  # conv bias, affine beta
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    window: tuple[int, int] = (0, 0)
    relu: bool = False  # con_6 may fuse a ReLU
    identity: bool = False  # a disabled affine/relu


@dataclass
class ParsedNetwork:
    channel_means: tuple[float, float, float]  # R, G, B
    size: tuple[int, int]
    margin: float
    distance_threshold: float
    layers: list[Layer] = field(default_factory=list)  # one per non-tag/skip token of ARCHITECTURE


def _read_loss(reader: _Reader) -> tuple[float, float]:
    version = reader.string()
    if version == "loss_metric_2":
        return reader.float(), reader.float()
    if version == "loss_metric_":
        return 0.1, 0.75  # dlib's fixed values for the old loss version
    raise reader.fail(f"loss layer {version!r}, expected loss_metric_2 (a face descriptor network)")


def _read_con(reader: _Reader, version: str, filters: int, stride: int) -> Layer:
    params = reader.tensor().reshape(-1)
    num_filters = reader.int()
    kernel = (reader.int(), reader.int())
    strides = (reader.int(), reader.int())
    pads = (reader.int(), reader.int())
    weight_shape = reader.alias()
    bias_shape = reader.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        reader.float()
    use_bias = reader.bool() if version in ("con_5", "con_6") else True
    use_relu = reader.bool() if version == "con_6" else False
    if num_filters != filters or strides != (stride, stride) or weight_shape[0] != filters:
        raise reader.fail(
            f"convolution with {num_filters} filters stride {strides}, expected {filters} stride {stride}"
        )
    n_weight = int(np.prod(weight_shape))
    n_bias = filters if use_bias else 0
    if params.size != n_weight + n_bias or weight_shape[2:] != kernel:
        raise reader.fail(f"convolution params of {params.size} values do not fit filters {weight_shape}")
    if use_bias and bias_shape != (1, filters, 1, 1):
        raise reader.fail(f"convolution bias shape {bias_shape}")
    bias = params[n_weight:] if use_bias else np.zeros(filters, np.float32)
    return Layer(
        "con",
        weight=params[:n_weight].reshape(weight_shape),
        bias=bias,
        stride=strides,
        pad=pads,
        relu=use_relu,
    )


def _read_affine(reader: _Reader, version: str) -> Layer:
    params = reader.tensor().reshape(-1)
    reader.alias()
    reader.alias()
    if version == "bn_con2":
        # A training-time batch norm: fold its running statistics into gamma and beta like dlib does.
        for _ in range(2):  # batch means and inverse stds
            reader.tensor()
        running_mean = reader.tensor().reshape(-1)
        running_var = reader.tensor().reshape(-1)
        reader.int()
        reader.int()
        for _ in range(4):
            reader.float()
        eps = reader.float()
        gamma, beta = np.split(params, 2)
        scale = gamma / np.sqrt(running_var + eps)
        return Layer("affine", weight=scale.astype(np.float32), bias=(beta - scale * running_mean).astype(np.float32))
    mode = reader.int()
    disabled = reader.bool() if version == "affine_2" else False
    if mode != 0:
        raise reader.fail(f"affine layer in fc mode ({mode}) inside the convolutional trunk")
    if params.size % 2:
        raise reader.fail(f"affine params of odd length {params.size}")
    gamma, beta = np.split(params, 2)
    return Layer("affine", weight=gamma, bias=beta, identity=disabled)


def _read_pool(reader: _Reader, kind: str) -> Layer:
    window = (reader.int(), reader.int())
    stride = (reader.int(), reader.int())
    pad = (reader.int(), reader.int())
    if kind == "avg_pool_all":
        if window != (0, 0):
            raise reader.fail(f"final average pool window {window}, expected the whole image (0x0)")
    elif window == (0, 0) or pad != (0, 0):
        raise reader.fail(f"pool window {window} pad {pad}, expected an unpadded window")
    return Layer(kind, stride=stride, pad=pad, window=window)


def _read_fc(reader: _Reader, version: str) -> Layer:
    num_outputs = reader.int()
    num_inputs = reader.int()
    params = reader.tensor().reshape(-1)
    weight_shape = reader.alias()
    reader.alias()
    bias_mode = reader.int()
    for _ in range(4):
        reader.float()
    use_bias = reader.bool() if version == "fc_3" else True
    has_bias = bias_mode == 0 and use_bias
    n_weight = num_inputs * num_outputs
    if weight_shape[:2] != (num_inputs, num_outputs) or params.size != n_weight + (num_outputs if has_bias else 0):
        raise reader.fail(f"fc params of {params.size} values do not fit {num_inputs}x{num_outputs}")
    # dlib stores the matrix [in][out] and computes x @ W (not the transposed Gemm convention).
    weight = params[:n_weight].reshape(num_inputs, num_outputs)
    bias = params[n_weight:] if has_bias else None
    return Layer("fc", weight=weight, bias=bias)


def _read_layer(reader: _Reader, token: tuple) -> Layer:
    kind = token[0]
    version = reader.expect_version(kind)
    if kind == "con":
        return _read_con(reader, version, token[1], token[2])
    if kind == "affine":
        return _read_affine(reader, version)
    if kind == "relu":
        disabled = reader.bool() if version == "relu_2" else False
        return Layer("relu", identity=disabled)
    if kind in ("max_pool", "avg_pool", "avg_pool_all"):
        return _read_pool(reader, kind)
    if kind == "add_prev":
        return Layer("add_prev")
    if kind == "fc":
        return _read_fc(reader, version)
    raise AssertionError(kind)


def parse(source: Path) -> ParsedNetwork:
    """Read the whole file into inference parameters, checking structure and that no byte is left."""
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {source}: {exc.strerror}") from exc
    reader = _Reader(data, Path(source))

    # Region A: the loss wrapper, its loss layer, then one version code per wrapper, top-down.
    if reader.int() != 1:
        raise reader.fail("loss wrapper version is not 1")
    margin, threshold = _read_loss(reader)
    codes = "".join(str(reader.int()) for _ in range(len(ARCHITECTURE)))
    if codes[-1] not in "23" or codes[:-1] + "3" != expected_wrapper_codes(3):
        raise reader.fail(
            "the layer structure is not dlib_face_recognition_resnet_model_v1's "
            f"(wrapper codes {codes!r})"
        )
    final_version = int(codes[-1])
    # Region B: the input layer.
    if reader.string() != "input_rgb_image_sized":
        raise reader.fail("input layer is not input_rgb_image_sized")
    means = (reader.float(), reader.float(), reader.float())
    size = (reader.int(), reader.int())
    parsed = ParsedNetwork(channel_means=means, size=size, margin=margin, distance_threshold=threshold)

    # Region C: layer details bottom-up, each followed by its wrapper's own fields.
    first = True
    for token in ARCHITECTURE:
        if token[0] in ("tag", "skip"):
            continue  # tag and skip wrappers write nothing here
        parsed.layers.append(_read_layer(reader, token))
        for _ in range(3):  # setup called, gradient stale, output disabled: training state
            reader.bool()
        reader.tensor()  # input gradient
        reader.tensor()  # cached output
        reader.tensor()  # bottom wrapper: grad_final; the others: parameter gradient
        if first and final_version == 3 and reader.int() != 1:
            raise reader.fail("sample expansion factor is not 1")
        first = False
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} unread bytes after the last layer")
    return parsed


# -- building the ONNX graph -----------------------------------------------------------------------


class _GraphBuilder:
    """Collects nodes and initialisers, tracking the static (C, H, W) of each value for padded adds."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self.counter = 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _pad_to(graph: _GraphBuilder, value: str, shape: tuple[int, int, int], target: tuple[int, int, int]) -> str:
    """Zero-pad at the end of C, H and W: dlib's add_prev adds mismatched shapes this way (no broadcast)."""
    if shape == target:
        return value
    extra = [t - s for s, t in zip(shape, target)]
    pads = graph.const("pads", np.array([0, 0, 0, 0, 0, *extra], dtype=np.int64))
    return graph.node("Pad", [value, pads])


def build_model(net: ParsedNetwork, source_sha256: str | None = None):
    """An onnx.ModelProto computing the same descriptor as dlib on 150x150 RGB chips."""
    from onnx import TensorProto, checker, helper

    graph = _GraphBuilder()
    rows, cols = net.size
    x = graph.node("Transpose", [INPUT_NAME], perm=[0, 3, 1, 2])
    means = np.array(net.channel_means, np.float32).reshape(1, 3, 1, 1)
    x = graph.node("Sub", [x, graph.const("mean", means)])
    # dlib divides by 256 (not 255); a power of two, so the multiply is exact.
    x = graph.node("Mul", [x, graph.const("scale", np.array(1 / 256, np.float32))])
    shape = (3, rows, cols)

    tags: dict[int, tuple[str, tuple[int, int, int]]] = {}
    layers = iter(net.layers)
    for token in ARCHITECTURE:
        kind = token[0]
        if kind == "tag":
            tags[token[1]] = (x, shape)
            continue
        if kind == "skip":
            x, shape = tags[token[1]]
            continue
        layer = next(layers)
        if kind == "con":
            assert layer.weight is not None and layer.bias is not None
            kh, kw = layer.weight.shape[2:]
            x = graph.node(
                "Conv",
                [x, graph.const("w", layer.weight), graph.const("b", layer.bias)],
                kernel_shape=[kh, kw],
                strides=list(layer.stride),
                pads=[layer.pad[0], layer.pad[1], layer.pad[0], layer.pad[1]],
            )
            shape = (
                layer.weight.shape[0],
                1 + (shape[1] + 2 * layer.pad[0] - kh) // layer.stride[0],
                1 + (shape[2] + 2 * layer.pad[1] - kw) // layer.stride[1],
            )
            if layer.relu:
                x = graph.node("Relu", [x])
        elif kind == "affine":
            if not layer.identity:
                assert layer.weight is not None and layer.bias is not None
                x = graph.node("Mul", [x, graph.const("gamma", layer.weight.reshape(1, -1, 1, 1))])
                x = graph.node("Add", [x, graph.const("beta", layer.bias.reshape(1, -1, 1, 1))])
        elif kind == "relu":
            if not layer.identity:
                x = graph.node("Relu", [x])
        elif kind in ("max_pool", "avg_pool"):
            op = "MaxPool" if kind == "max_pool" else "AveragePool"
            x = graph.node(op, [x], kernel_shape=list(layer.window), strides=list(layer.stride))
            shape = (
                shape[0],
                1 + (shape[1] - layer.window[0]) // layer.stride[0],
                1 + (shape[2] - layer.window[1]) // layer.stride[1],
            )
        elif kind == "avg_pool_all":
            x = graph.node("GlobalAveragePool", [x])
            x = graph.node("Flatten", [x], axis=1)
            shape = (shape[0], 1, 1)
        elif kind == "add_prev":
            other, other_shape = tags[token[1]]
            target = tuple(max(a, b) for a, b in zip(shape, other_shape))
            x = graph.node(
                "Add", [_pad_to(graph, x, shape, target), _pad_to(graph, other, other_shape, target)]
            )
            shape = target  # type: ignore[assignment]
        elif kind == "fc":
            assert layer.weight is not None
            x = graph.node("MatMul", [x, graph.const("fc_w", layer.weight)])
            if layer.bias is not None:
                x = graph.node("Add", [x, graph.const("fc_b", layer.bias)])
            dim = layer.weight.shape[1]
    graph.nodes[-1].output[0] = OUTPUT_NAME

    onnx_graph = helper.make_graph(
        graph.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", rows, cols, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", dim])],
        graph.initializers,
    )
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="streamer.models.convert.dlib_resnet",
        doc_string="dlib face recognition ResNet v1 (CC0, Davis King); input: aligned 150x150 RGB chip, "
        "0..255, NHWC; output: raw 128-D descriptor, compare by Euclidean distance",
    )
    model.ir_version = 8
    meta = {
        META_MODEL: MODEL_ID,
        META_METRIC: "euclidean",
        # float32 in the file: print it as float32 so 0.6 reads back as 0.6, not 0.6000000238
        META_THRESHOLD: str(np.float32(net.distance_threshold)),
        META_MARGIN: str(np.float32(net.margin)),
    }
    if source_sha256:
        meta["source_sha256"] = source_sha256
    helper.set_model_props(model, meta)
    checker.check_model(model)
    return model


def convert(source: Path, target: Path) -> None:
    """Convert dlib's .dat to an ONNX file at `target` (raises ModelError for a file it cannot read)."""
    import hashlib

    import onnx

    net = parse(Path(source))
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    model = build_model(net, source_sha256=digest)
    onnx.save_model(model, str(target))


def read_threshold(onnx_path: Path) -> float:
    """The calibrated distance threshold stored in a converted file's metadata."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(META_MODEL) != MODEL_ID or META_THRESHOLD not in props:
        raise ModelError(f"{onnx_path} is not a dlib ResNet converted by streamer (no {META_THRESHOLD} metadata)")
    return float(props[META_THRESHOLD])
