"""Keras 2.0 face-attribute models (.h5) to ONNX with h5py, numpy and onnx only: no TensorFlow.

Two kinds of file (see docs/keras-attribute-models.md in the shared docs):
- mini_XCEPTION emotion and gender files hold a full model (`model_config` JSON + `model_weights`); the
  graph is rebuilt from the config, so only the layer kinds that model uses are accepted.
- the SSR-Net age file holds weights only; its architecture is written out here (`SSR_net(64, [3,3,3],
  1.0, 1.0)` from shamangary/SSR-Net) with a fixed name -> role table, and its `merge_age` Lambda is
  expressed in ONNX ops.

Both graphs take `input` as NHWC float32 [N, 64, 64, C] exactly like Keras and transpose to NCHW once.
Only the files whose sha256 is in the registry are accepted: the conversion was verified on those bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamer.errors import ModelError
from streamer.models.registry import MODELS, sha256_of

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # opset 17 needs IR >= 8; keeps the file loadable by older onnxruntime builds
SIZE = 64

# The files this conversion was verified on (pinned in the registry).
MINI_XCEPTION_SHA256 = frozenset({MODELS["emotion"].sha256, MODELS["gender"].sha256})
SSRNET_AGE_SHA256 = frozenset({MODELS["age"].sha256})

# SSR-Net: Keras 2.0.x BatchNormalization default; the weights-only file does not store it.
SSRNET_BN_EPSILON = 1e-3


# ---------------------------------------------------------------------------------------------
# small ONNX graph builder


class _Graph:
    """Collects nodes and initializers; every helper returns the name of the tensor it made."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray, dtype: type = np.float32) -> str:
        name = self._fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], hint: str | None = None, output: str | None = None, **attrs
    ) -> str:
        out = output or self._fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def conv(self, x: str, weight_oihw: np.ndarray, bias: np.ndarray | None, hint: str, **attrs) -> str:
        inputs = [x, self.const(f"{hint}_W", weight_oihw)]
        if bias is not None:
            inputs.append(self.const(f"{hint}_B", bias))
        return self.op("Conv", inputs, hint, **attrs)

    def batchnorm(self, x: str, gamma, beta, mean, var, epsilon: float, hint: str) -> str:
        values = (gamma, beta, mean, var)
        params = [self.const(f"{hint}_{p}", v) for p, v in zip(("scale", "B", "mean", "var"), values)]
        return self.op("BatchNormalization", [x, *params], hint, epsilon=float(epsilon))

    def dense(self, x: str, kernel: np.ndarray, bias: np.ndarray, hint: str) -> str:
        # Keras stores the kernel as (in, out): usable by MatMul as it is.
        y = self.op("MatMul", [x, self.const(f"{hint}_W", kernel)], f"{hint}_matmul")
        return self.op("Add", [y, self.const(f"{hint}_B", bias)], hint)

    def flatten_hwc(self, x: str, hint: str) -> str:
        # Keras flattens channels-last (H, W, C); undo our NCHW layout first or the next Dense reads
        # its rows in the wrong order (it still runs, with wrong numbers).
        nhwc = self.op("Transpose", [x], f"{hint}_nhwc", perm=[0, 2, 3, 1])
        return self.op("Flatten", [nhwc], hint, axis=1)

    def model(self, name: str, channels: int, outputs: dict[str, int], doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SIZE, SIZE, channels])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", k]) for o, k in outputs.items()],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="streamer.models.convert.keras_h5",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def _same_pads(size: tuple[int, int], kernel: Sequence[int], strides: Sequence[int], dilation: Sequence[int]):
    """TensorFlow "same": out = ceil(in/stride); the odd extra pixel goes at the bottom/right."""
    begin, end, out = [], [], []
    for n, k, s, d in zip(size, kernel, strides, dilation):
        o = -(-n // s)
        total = max((o - 1) * s + (k - 1) * d + 1 - n, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
        out.append(o)
    return begin + end, (out[0], out[1])


def _valid_size(size: tuple[int, int], kernel: Sequence[int], strides: Sequence[int], dilation: Sequence[int]):
    out = tuple((n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(size, kernel, strides, dilation))
    return [0, 0, 0, 0], (out[0], out[1])


def _pads(padding: str, size, kernel, strides, dilation):
    if padding == "same":
        return _same_pads(size, kernel, strides, dilation)
    if padding == "valid":
        return _valid_size(size, kernel, strides, dilation)
    raise ValueError(f"padding {padding!r} (expected 'same' or 'valid')")


def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)


def _save(model: onnx.ModelProto, target: Path) -> None:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target))


def _check_sha256(source: Path, allowed: Collection[str] | None, kind: str) -> None:
    if not source.is_file():
        raise ModelError(f"{kind}: file not found: {source}")
    if allowed is None:
        return
    actual = sha256_of(source)
    if actual not in allowed:
        raise ModelError(
            f"{kind}: {source} has sha256 {actual[:12]}..., expected "
            f"{' or '.join(h[:12] + '...' for h in allowed)}; only the verified files are converted"
        )


def _open_h5(source: Path, kind: str):
    import h5py

    try:
        return h5py.File(source, "r")
    except OSError as exc:
        raise ModelError(f"{kind}: {source} is not a readable HDF5 file ({exc})") from exc


def _weights(group, layer: str, shapes: Sequence[tuple[int, ...]], where: str) -> list[np.ndarray]:
    """The arrays of one layer in `weight_names` order (never h5py's alphabetical order), shape-checked."""
    if layer not in group:
        raise ModelError(f"{where}: no weights for layer {layer!r}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group[layer].attrs.get("weight_names", [])]
    arrays = [np.asarray(group[layer][n], dtype=np.float32) for n in names]
    got = [a.shape for a in arrays]
    if got != [tuple(s) for s in shapes]:
        raise ModelError(f"{where}: layer {layer!r} has weights {got}, expected {[tuple(s) for s in shapes]}")
    return arrays


# ---------------------------------------------------------------------------------------------
# mini_XCEPTION (full-model files)

_MINI_XCEPTION_LAYERS = {
    "InputLayer", "Conv2D", "SeparableConv2D", "BatchNormalization", "Activation",
    "MaxPooling2D", "Add", "GlobalAveragePooling2D",
}  # fmt: skip
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def convert_mini_xception(
    source: Path, target: Path, *, allowed_sha256: Collection[str] | None = MINI_XCEPTION_SHA256
) -> None:
    """Convert the emotion or gender mini_XCEPTION .hdf5 (Keras 2.0.5 full model) to ONNX.

    Output `probabilities` [N, K]: K = 7 emotions or 2 genders, in the file's class order.
    `allowed_sha256=None` accepts another mini_XCEPTION file (a retrained one); its layers are still checked.
    """
    source = Path(source)
    kind = "mini_XCEPTION"
    _check_sha256(source, allowed_sha256, kind)
    with _open_h5(source, kind) as h5:
        try:
            config = json.loads(h5.attrs["model_config"])
            weights = h5["model_weights"]
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{kind}: {source} holds no Keras model_config/model_weights ({exc})") from exc
        try:
            model, classes = _build_mini_xception(config, weights, f"{kind} ({source.name})")
        except (KeyError, TypeError, ValueError, IndexError, OSError) as exc:
            raise ModelError(f"{kind}: unexpected layer structure in {source}: {exc}") from exc
    _save(model, target)
    log.info("converted %s (%d classes) to %s", source.name, classes, target)


def _build_mini_xception(config: dict, weights, where: str) -> tuple[onnx.ModelProto, int]:
    if config.get("class_name") != "Model":
        raise ModelError(f"{where}: model_config is a {config.get('class_name')!r}, expected 'Model'")
    body = config["config"]
    layers = body["layers"]
    if len(body["input_layers"]) != 1 or len(body["output_layers"]) != 1:
        raise ModelError(f"{where}: expected one input and one output layer")
    output_layer = body["output_layers"][0][0]

    g = _Graph()
    tensors: dict[str, str] = {}  # keras layer name -> onnx tensor
    shapes: dict[str, tuple[int, int, int]] = {}  # keras layer name -> (H, W, C), or (C,) after pooling
    counts: dict[str, int] = {}
    for layer in layers:
        cls, name, cfg = layer["class_name"], layer["name"], layer["config"]
        if cls not in _MINI_XCEPTION_LAYERS:
            raise ModelError(f"{where}: layer {name!r} is a {cls}, which this converter does not handle")
        counts[cls] = counts.get(cls, 0) + 1
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise ModelError(f"{where}: layer {name!r} is {cfg['data_format']}, expected channels_last")
        nodes = layer["inbound_nodes"]
        if cls == "InputLayer":
            if nodes or tensors:
                raise ModelError(f"{where}: expected the input layer first and alone")
            shape = cfg["batch_input_shape"]
            if shape[1:3] != [SIZE, SIZE] or shape[3] not in (1, 3):
                raise ModelError(f"{where}: input shape {shape}, expected [None, {SIZE}, {SIZE}, 1|3]")
            tensors[name] = g.op("Transpose", ["input"], "input_nchw", perm=[0, 3, 1, 2])
            shapes[name] = (SIZE, SIZE, shape[3])
            channels = shape[3]
            continue
        if len(nodes) != 1:
            raise ModelError(f"{where}: layer {name!r} is called {len(nodes)} times, expected once")
        inputs = [entry[0] for entry in nodes[0]]
        if cls != "Add" and len(inputs) != 1:
            raise ModelError(f"{where}: layer {name!r} has {len(inputs)} inputs, expected 1")
        x, shape = tensors[inputs[0]], shapes[inputs[0]]
        if cls != "Activation" and len(shape) != 3:
            raise ModelError(f"{where}: layer {name!r} ({cls}) follows a flat tensor")
        h, w, c = shape if len(shape) == 3 else (0, 0, shape[0])

        if cls in ("Conv2D", "SeparableConv2D"):
            k, s, d = cfg["kernel_size"], cfg["strides"], cfg["dilation_rate"]
            filters, use_bias = cfg["filters"], cfg["use_bias"]
            pads, (oh, ow) = _pads(cfg["padding"], (h, w), k, s, d)
            spatial = dict(kernel_shape=list(k), strides=list(s), dilations=list(d), pads=pads)
            bias_shape = [(filters,)] if use_bias else []
            if cls == "Conv2D":
                kernel, *bias = _weights(weights, name, [(k[0], k[1], c, filters), *bias_shape], where)
                y = g.conv(x, _hwio_to_oihw(kernel), bias[0] if bias else None, name, **spatial)
            else:
                m = cfg["depth_multiplier"]
                depthwise, pointwise, *bias = _weights(
                    weights, name, [(k[0], k[1], c, m), (1, 1, c * m, filters), *bias_shape], where
                )
                # (kh, kw, Cin, M) -> (Cin*M, 1, kh, kw); output channel c*M + m as in TF
                dw = depthwise.transpose(2, 3, 0, 1).reshape(c * m, 1, k[0], k[1])
                y = g.conv(x, dw, None, f"{name}_depthwise", group=c, **spatial)
                y = g.conv(y, _hwio_to_oihw(pointwise), bias[0] if bias else None, name, kernel_shape=[1, 1])
            activation = cfg.get("activation", "linear")
            if activation != "linear":
                if activation not in _ACTIVATIONS:
                    raise ModelError(f"{where}: layer {name!r} has activation {activation!r}")
                y = g.op(_ACTIVATIONS[activation], [y], f"{name}_{activation}")
            tensors[name], shapes[name] = y, (oh, ow, filters)
        elif cls == "BatchNormalization":
            if cfg["axis"] not in (-1, 3):
                raise ModelError(f"{where}: layer {name!r} normalises axis {cfg['axis']}, expected channels")
            want = [(c,)] * (int(cfg["scale"]) + int(cfg["center"]) + 2)
            arrays = _weights(weights, name, want, where)
            gamma = arrays.pop(0) if cfg["scale"] else np.ones(c, np.float32)
            beta = arrays.pop(0) if cfg["center"] else np.zeros(c, np.float32)
            mean, var = arrays
            tensors[name] = g.batchnorm(x, gamma, beta, mean, var, cfg["epsilon"], name)
            shapes[name] = (h, w, c)
        elif cls == "Activation":
            activation = cfg["activation"]
            if activation == "softmax":
                if len(shape) != 1:
                    raise ModelError(f"{where}: softmax on a feature map ({name!r}) is not supported")
                tensors[name] = g.op("Softmax", [x], name, axis=-1)
            elif activation in _ACTIVATIONS:
                tensors[name] = g.op(_ACTIVATIONS[activation], [x], name)
            else:
                raise ModelError(f"{where}: layer {name!r} has activation {activation!r}")
            shapes[name] = shape
        elif cls == "MaxPooling2D":
            k = cfg["pool_size"]
            s = cfg["strides"] or k
            pads, (oh, ow) = _pads(cfg["padding"], (h, w), k, s, (1, 1))
            # padded cells never win a max, which is what TF "same" does
            tensors[name] = g.op("MaxPool", [x], name, kernel_shape=list(k), strides=list(s), pads=pads)
            shapes[name] = (oh, ow, c)
        elif cls == "Add":
            if len(inputs) < 2 or len({shapes[i] for i in inputs}) != 1:
                raise ModelError(f"{where}: layer {name!r} adds {[shapes[i] for i in inputs]}")
            y = tensors[inputs[0]]
            for other in inputs[1:]:
                y = g.op("Add", [y, tensors[other]], name if other == inputs[-1] else None)
            tensors[name], shapes[name] = y, shape
        elif cls == "GlobalAveragePooling2D":
            pooled = g.op("GlobalAveragePool", [x], f"{name}_pool")
            tensors[name] = g.op("Flatten", [pooled], name, axis=1)
            shapes[name] = (c,)

    if output_layer not in tensors or len(shapes[output_layer]) != 1:
        raise ModelError(f"{where}: output layer {output_layer!r} does not give a class vector")
    last = next(layer for layer in layers if layer["name"] == output_layer)
    if last["class_name"] != "Activation" or last["config"]["activation"] != "softmax":
        raise ModelError(f"{where}: output layer {output_layer!r} is not a softmax")
    classes = shapes[output_layer][0]
    g.op("Identity", [tensors[output_layer]], output="probabilities")
    doc = f"mini_XCEPTION from Keras model {body.get('name')!r}; layers {counts}"
    return g.model("mini_xception", channels, {"probabilities": classes}, doc), classes


# ---------------------------------------------------------------------------------------------
# SSR-Net age (weights-only file)

_SSR_STAGES = 3
_SSR_BINS = 3  # stage_num = [3, 3, 3]
_SSR_LAMBDA_LOCAL = 1.0
_SSR_LAMBDA_D = 1.0
_SSR_V = 101.0

# Verified role table (keras-attribute-models.md 5.2): layers with equal shapes (dense_1/dense_2,
# conv2d_9/11/13, ...) could be swapped without any error, so the names are pinned here. Note that
# in this trained file the mix branch (s-mix * x-mix) is 0 after its ReLUs on every reference face,
# so p_k and eta_k are constants and the age comes from the delta layers; a swap of dense_1/dense_2
# (4/5, 7/8) would not show in the parity test, the other swaps do.
_SSR_X_STREAM = ("conv2d_1", "conv2d_2", "conv2d_3", "conv2d_4")  # 32 filters, ReLU, average pool
_SSR_S_STREAM = ("conv2d_5", "conv2d_6", "conv2d_7", "conv2d_8")  # 16 filters, tanh, max pool
_SSR_X_BN = ("batch_normalization_1", "batch_normalization_2", "batch_normalization_3", "batch_normalization_4")
_SSR_S_BN = ("batch_normalization_5", "batch_normalization_6", "batch_normalization_7", "batch_normalization_8")
# per stage: (source block index, pool size, s conv, x conv, s mix, x mix, feat, pred, local, delta)
_SSR_STAGE_ROLES = (
    (3, None, "conv2d_9", "conv2d_10", "dense_1", "dense_2", "dense_3", "pred_age_stage1", "local_delta_stage1", "delta_s1"),
    (1, 4, "conv2d_11", "conv2d_12", "dense_4", "dense_5", "dense_6", "pred_age_stage2", "local_delta_stage2", "delta_s2"),
    (0, 8, "conv2d_13", "conv2d_14", "dense_7", "dense_8", "dense_9", "pred_age_stage3", "local_delta_stage3", "delta_s3"),
)  # fmt: skip


def convert_ssrnet_age(
    source: Path, target: Path, *, allowed_sha256: Collection[str] | None = SSRNET_AGE_SHA256
) -> None:
    """Convert the SSR-Net age weights (Keras 2.0.6, weights only) to ONNX: input raw BGR 0..255
    [N, 64, 64, 3], output `age` [N, 1] in years (not clamped).

    `allowed_sha256=None` accepts other weights for the same architecture (layer names and shapes checked).
    """
    source = Path(source)
    _check_sha256(source, allowed_sha256, "SSR-Net age")
    with _open_h5(source, "SSR-Net age") as h5:
        if "model_config" in h5.attrs or "layer_names" not in h5.attrs:
            raise ModelError(f"SSR-Net age: {source} is not a Keras weights-only file")
        saved = {n.decode() if isinstance(n, bytes) else str(n) for n in h5.attrs["layer_names"]}
        expected = _ssrnet_expected_layers()
        if not expected <= saved:
            raise ModelError(f"SSR-Net age: {source} lacks layers {sorted(expected - saved)}")
        try:
            model = _build_ssrnet_age(h5, f"SSR-Net age ({source.name})")
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ModelError(f"SSR-Net age: unexpected weights in {source}: {exc}") from exc
    _save(model, target)
    log.info("converted %s to %s", source.name, target)


def _ssrnet_expected_layers() -> set[str]:
    names = set(_SSR_X_STREAM + _SSR_S_STREAM + _SSR_X_BN + _SSR_S_BN)
    for roles in _SSR_STAGE_ROLES:
        names.update(roles[2:])
    return names


def _build_ssrnet_age(h5, where: str) -> onnx.ModelProto:
    g = _Graph()
    x = s = g.op("Transpose", ["input"], "input_nchw", perm=[0, 3, 1, 2])
    xs, ss = [], []  # block outputs x1, x2, x3(unused), x4 / s1, s2, s3, s4
    cin_x, cin_s = 3, 3
    for block in range(4):
        for stream, conv, bn, filters, cin, act in (
            ("x", _SSR_X_STREAM[block], _SSR_X_BN[block], 32, cin_x, "Relu"),
            ("s", _SSR_S_STREAM[block], _SSR_S_BN[block], 16, cin_s, "Tanh"),
        ):
            kernel, bias = _weights(h5, conv, [(3, 3, cin, filters), (filters,)], where)
            gamma, beta, mean, var = _weights(h5, bn, [(filters,)] * 4, where)
            inp = x if stream == "x" else s
            y = g.conv(inp, _hwio_to_oihw(kernel), bias, conv, kernel_shape=[3, 3])
            y = g.batchnorm(y, gamma, beta, mean, var, SSRNET_BN_EPSILON, bn)
            y = g.op(act, [y], f"{conv}_{act.lower()}")
            if block < 3:  # 2x2 pooling (floor) after the first three blocks
                pool = "AveragePool" if stream == "x" else "MaxPool"
                y = g.op(pool, [y], f"{conv}_pool", kernel_shape=[2, 2], strides=[2, 2])
            if stream == "x":
                x = y
                xs.append(y)
            else:
                s = y
                ss.append(y)
        cin_x, cin_s = 32, 16
    sizes = (31, 14, 6, 4)  # block outputs: 64 -conv-> 62 -pool-> 31 -> 29 -> 14 -> 12 -> 6 -> 4

    preds, deltas, locals_ = [], [], []
    for roles in _SSR_STAGE_ROLES:
        block, pool, s_conv, x_conv, s_mix, x_mix, feat_name, pred_name, local_name, delta_name = roles
        side = sizes[block] if pool is None else sizes[block] // pool
        flat = side * side * 10
        sides = []
        for stream, conv, pool_op, src, cin in (
            ("s", s_conv, "MaxPool", ss[block], 16),
            ("x", x_conv, "AveragePool", xs[block], 32),
        ):
            kernel, bias = _weights(h5, conv, [(1, 1, cin, 10), (10,)], where)
            y = g.conv(src, _hwio_to_oihw(kernel), bias, conv, kernel_shape=[1, 1])
            y = g.op("Relu", [y], f"{conv}_relu")
            if pool is not None:
                y = g.op(pool_op, [y], f"{conv}_pool", kernel_shape=[pool, pool], strides=[pool, pool])
            sides.append(g.flatten_hwc(y, f"{conv}_flat"))
        a, b = sides
        kernel, bias = _weights(h5, delta_name, [(flat, 1), (1,)], where)
        delta = g.dense(g.op("Mul", [a, b]), kernel, bias, delta_name)
        deltas.append(g.op("Tanh", [delta], f"{delta_name}_tanh"))
        mixed = []
        for mix, src in ((s_mix, a), (x_mix, b)):  # Dropout before the mix Dense is the identity here
            kernel, bias = _weights(h5, mix, [(flat, _SSR_BINS), (_SSR_BINS,)], where)
            mixed.append(g.op("Relu", [g.dense(src, kernel, bias, mix)], f"{mix}_relu"))
        kernel, bias = _weights(h5, feat_name, [(_SSR_BINS, 2 * _SSR_BINS), (2 * _SSR_BINS,)], where)
        feat = g.op("Relu", [g.dense(g.op("Mul", mixed), kernel, bias, feat_name)], f"{feat_name}_relu")
        kernel, bias = _weights(h5, pred_name, [(2 * _SSR_BINS, _SSR_BINS), (_SSR_BINS,)], where)
        # stage probabilities are ReLU outputs, not a softmax
        preds.append(g.op("Relu", [g.dense(feat, kernel, bias, pred_name)], f"{pred_name}_relu"))
        kernel, bias = _weights(h5, local_name, [(2 * _SSR_BINS, _SSR_BINS), (_SSR_BINS,)], where)
        locals_.append(g.op("Tanh", [g.dense(feat, kernel, bias, local_name)], f"{local_name}_tanh"))

    g.op("Identity", [_merge_age(g, preds, deltas, locals_)], output="age")
    doc = "SSR-Net age, SSR_net(64, [3,3,3], lambda_local=1.0, lambda_d=1.0), weights from shamangary/SSR-Net"
    return g.model("ssrnet_age", 3, {"age": 1}, doc)


def _merge_age(g: _Graph, preds: list[str], deltas: list[str], locals_: list[str]) -> str:
    """SSR-Net's `merge_age` Lambda: soft stagewise regression with dynamic range and shifted bins.

    age = V * sum_k (sum_i (i + l*eta_k[i]) * p_k[i]) / prod_{j<=k} s_j (1 + d*delta_j); the division is
    done step by step like the original so the rounding follows Keras.
    """
    index = g.const("bin_index", np.arange(_SSR_BINS, dtype=np.float32).reshape(1, _SSR_BINS))
    lam_local = g.const("lambda_local", np.array(_SSR_LAMBDA_LOCAL, np.float32))
    lam_d = g.const("lambda_d", np.array(_SSR_LAMBDA_D, np.float32))
    one = g.const("one", np.array(1.0, np.float32))
    bins = g.const("stage_bins", np.array(float(_SSR_BINS), np.float32))
    axes = g.const("axes", np.array([1], np.int64), dtype=np.int64)
    divisors = [
        g.op("Mul", [bins, g.op("Add", [one, g.op("Mul", [lam_d, delta])])], f"divisor{k + 1}")
        for k, delta in enumerate(deltas)
    ]
    total = None
    for k in range(_SSR_STAGES):
        shifted = g.op("Add", [index, g.op("Mul", [lam_local, locals_[k]])], f"bins{k + 1}")
        term = g.op("ReduceSum", [g.op("Mul", [shifted, preds[k]]), axes], f"stage{k + 1}", keepdims=1)
        for divisor in divisors[: k + 1]:
            term = g.op("Div", [term, divisor], f"stage{k + 1}_scaled")
        total = term if total is None else g.op("Add", [total, term], "stage_sum")
    return g.op("Mul", [total, g.const("V", np.array(_SSR_V, np.float32))], "age_years")
