"""A student with fake quantization whose INT8 artifacts ship the scales it was trained with.

:class:`QATModel` captures the FP32 student with ``torch.export`` (in training mode, so each
convolution's BatchNorm is matched and fused the way PT2E QAT simulates it) and prepares it with
torchao's ``prepare_qat_pt2e`` and the quantizer of the runtime it targets — the same quantizer
the PTQ exports use (:data:`SCHEMES`), so :meth:`QATModel.converted` is the graph the exporters
lower, with the scales training used and not a fresh calibration. Those scales come from
moving-average observers (torchao's ``FusedMovingAvgObsFakeQuantize``: ranges averaged over the
training batches, then frozen), not from gradients; the weights learn to live with them.

The recipe (Krishnamoorthi 2018, the PyTorch QAT tutorial): observers are calibrated on training
images before the first step (:func:`calibrate`); BatchNorm statistics are frozen for the last half
of the epochs and the observers (the scales) for the last third (:meth:`QATModel.start_epoch`,
called by the training loop); evaluation never moves a scale. A prepared graph cannot
``.train()``/``.eval()`` itself (BatchNorm and dropout are baked into the exported graph), so the
wrapper switches them with torchao's ``move_exported_model_to_train/eval``.

A QAT checkpoint stores the prepared graph's tensors (weights, BatchNorm statistics, observer
ranges, scales) and its spec names the base and the scheme: loading rebuilds the same graph from
the architecture and loads the tensors — no pickle, no code from the file.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kdedge.config import QAT_SCHEMES
from kdedge.models.dead_channels import SILENT_SCALE, silence_dead_channels
from kdedge.errors import BackendUnavailable, ModelError

__all__ = ["SCHEMES", "QATModel", "calibrate", "pt2e_quantizer", "scheme_parts"]

#: Quantizers (each the one its runtime's INT8 export uses): int8 weights symmetric per output
#: channel (``-per-tensor``: one scale per weight tensor), int8 activations per tensor. ``xnnpack``:
#: ExecuTorch's XNNPACKQuantizer (``.pte``); ``litert``: litert_torch's PT2EQuantizer (``.tflite``).
SCHEMES = QAT_SCHEMES

_BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default", "aten.cudnn_batch_norm.default")


def _torchao() -> Any:
    """torchao's PT2E API, or one line saying how to install it (it comes with ExecuTorch)."""
    try:
        from torchao.quantization import pt2e
        from torchao.quantization.pt2e import quantize_pt2e
    except ImportError:
        raise BackendUnavailable("quantization-aware training needs torchao's PT2E quantization: pip install 'kdedge-distill[executorch]' "
                                 "(torchao comes with ExecuTorch)") from None
    _export_conv_bn_patterns_once()
    return pt2e, quantize_pt2e


def _export_conv_bn_patterns_once() -> None:
    """Make torchao's conv+BatchNorm rewrites pay their pattern exports once per process, and only for convolutions the graph has.

    ``prepare_qat_pt2e`` and ``convert_pt2e`` each ``torch.export`` the same small pattern graphs on every call: for
    1d/2d convolutions and transposed convolutions, 96 of them in ``convert_pt2e`` — 36 s of a 54 s ExecuTorch export of a
    three-convolution model (measured on a 2-core EPYC). A pattern graph depends only on the pattern function, its closure
    and its example inputs' shapes, so it is kept (and handed out as a copy: the rewriter may edit it). A rewrite for a
    convolution the graph does not contain cannot match and is skipped. ExecuTorch's and litert-torch's quantizers annotate
    conv+BatchNorm by exporting their own patterns on every call (6 s per PTQ annotate): those exports are kept the same way,
    in each annotator module imported by then. When a private layout changes, nothing is patched and everything still
    works, only slower.
    """
    try:
        from torchao.quantization.pt2e import qat_utils
    except ImportError:  # pragma: no cover - torchao without QAT
        return
    if getattr(qat_utils, "_kdedge_patterns_once", False):
        from torchao.quantization.pt2e import utils as pt2e_utils

        _patch_quantizer_annotators(pt2e_utils._get_aten_graph_module_for_pattern, qat_utils._kdedge_export_once)
        return
    from torchao.quantization.pt2e import export_utils

    names = ("_get_aten_graph_module_for_pattern", "_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    if not all(callable(getattr(qat_utils, n, None)) for n in names):
        return
    export_pattern, fuse, fold = (getattr(qat_utils, n) for n in names)
    kept: dict[Any, torch.fx.GraphModule] = {}
    wrapper = getattr(export_utils, "WrapperModule", None)

    def shape_key(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, (tuple, list)):
            return tuple(shape_key(v) for v in value)
        hash(value)
        return value

    def pattern_key(pattern: Any, example_inputs: Any, is_cuda: bool, kwargs: dict[str, Any]) -> Any:
        fn = getattr(pattern, "fn", pattern)
        cells = tuple(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))
        if any(isinstance(c, torch.Tensor) for c in cells):
            raise TypeError("a captured tensor's values may shape the graph")  # exported every time, as torchao would
        return (fn.__module__, fn.__qualname__, fn.__code__, shape_key(cells), fn.__defaults__, shape_key(example_inputs), is_cuda,
                shape_key(tuple(sorted(kwargs.items()))))

    def export_once(pattern: Any, example_inputs: Any, is_cuda: bool = False, **kwargs: Any) -> torch.fx.GraphModule:
        if not isinstance(pattern, nn.Module) and wrapper is not None:
            # litert-torch 0.10's QAT conv+BatchNorm annotator passes a bare function, which torch.export refuses: torchao wraps its own
            pattern = wrapper(pattern)
        try:
            key = pattern_key(pattern, example_inputs, is_cuda, kwargs)
        except (AttributeError, TypeError):  # a pattern we cannot name: export it as torchao would
            return export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in kept:
            kept[key] = export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(kept[key])

    def only_if_present(helper: Any) -> Any:
        def run(m: torch.fx.GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> torch.fx.GraphModule:
            packet = getattr(torch.ops.aten, getattr(conv_fn, "__name__", ""), None)
            if packet is not None and not any(getattr(n.target, "overloadpacket", None) is packet for n in m.graph.nodes):
                return m
            return helper(m, conv_fn, example_inputs, is_cuda=is_cuda)

        return run

    qat_utils._get_aten_graph_module_for_pattern = export_once
    qat_utils._fuse_conv_bn_qat_helper = only_if_present(fuse)
    qat_utils._fold_conv_bn_qat_helper = only_if_present(fold)
    qat_utils._kdedge_patterns_once = True
    qat_utils._kdedge_export_once = export_once
    _patch_quantizer_annotators(export_pattern, export_once)


#: The quantizers' own conv+BatchNorm annotators export their pattern graphs the same way on every annotate (ExecuTorch's
#: XNNPACKQuantizer: 18 exports, 6 s of a 7 s PTQ of a two-layer MLP, measured), each through the name it imported.
_ANNOTATORS = ("executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils", "litert_torch.quantize.pt2e_quantizer_utils")


def _patch_quantizer_annotators(export_pattern: Any, export_once: Any) -> None:
    """The annotator modules already imported take ``export_once`` (imported later: the next :func:`_torchao` call patches them)."""
    for name in _ANNOTATORS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "_get_aten_graph_module_for_pattern", None) is export_pattern:
            module._get_aten_graph_module_for_pattern = export_once


def scheme_parts(scheme: str) -> tuple[str, bool]:
    """``("xnnpack" | "litert", per-channel weights?)`` of a scheme name."""
    return scheme.removesuffix("-per-tensor"), not scheme.endswith("-per-tensor")


def pt2e_quantizer(base: str, *, per_channel: bool = True, qat: bool = False) -> Any:
    """The PT2E quantizer the ``base`` runtime's INT8 uses, symmetric int8: ``xnnpack`` (ExecuTorch's ``XNNPACKQuantizer``) or
    ``litert`` (litert_torch's ``PT2EQuantizer``); weight scales per output channel or per tensor; for QAT or static PTQ.
    Its conv+BatchNorm pattern exports are paid once per process."""
    if base == "xnnpack":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer as quantizer, get_symmetric_quantization_config
    else:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer as quantizer, get_symmetric_quantization_config
    _export_conv_bn_patterns_once()  # its annotator is imported now
    return quantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat))


def _quantizer(scheme: str, *, qat: bool = True) -> Any:
    if scheme not in SCHEMES:
        raise ModelError(f"unknown QAT scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    base, per_channel = scheme_parts(scheme)
    try:
        return pt2e_quantizer(base, per_channel=per_channel, qat=qat)
    except ImportError:
        extra = "executorch" if base == "xnnpack" else "litert"
        raise BackendUnavailable(f"quantization-aware training for {scheme} needs its quantizer: pip install 'kdedge-distill[{extra}]'") from None


class QATModel(nn.Module):
    """``model`` with fake quantization for ``scheme``, trainable like any module.

    Args:
        model: The trained FP32 student (copied; not modified).
        input_shape: One sample's ``(C, H, W)``.
        scheme: One of :data:`SCHEMES`.
        epochs: The QAT run's length: BatchNorm statistics freeze after ``ceil(epochs / 2)``
            epochs, the observers after ``ceil(2 * epochs / 3)`` (at least one epoch each moves them).
        keep_float: Layers (module names) left in float: no fake quantization is trained for them, and every INT8
            artifact built from the model runs them in float (:func:`kdedge.sensitivity.keep_float_quantizer`).

    Raises:
        ModelError: ``torch.export`` cannot capture the model, or the scheme is unknown.
        BackendUnavailable: The scheme's quantizer is not installed.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, scheme: str = "xnnpack", epochs: int = 1,
                 keep_float: tuple[str, ...] = ()) -> None:
        super().__init__()
        from kdedge.models.float_layers import check_float_layers, keep_float_quantizer

        _, quantize_pt2e = _torchao()
        self.keep_float = check_float_layers(model, keep_float)
        quantizer = keep_float_quantizer(_quantizer(scheme), self.keep_float)
        self.scheme, self.input_shape = scheme, tuple(input_shape)
        self.set_schedule(epochs)
        # Dead BatchNorm channels are silenced first (kdedge.models.dead_channels): per tensor, their folded weights would set the
        # scale that rounds every other channel to 0 or ±1, for training and the artifacts alike; γ = 0 would be NaN in any scheme
        source, _ = silence_dead_channels(copy.deepcopy(model).cpu().eval(), self.input_shape, variance=not self.per_channel)
        source = source.to(memory_format=torch.contiguous_format).train()
        for p in source.parameters():
            p.requires_grad_(True)
        example = (torch.zeros(4, *self.input_shape),)  # BatchNorm in training mode needs more than one sample
        try:
            with _fork_rng():
                graph = torch.export.export(source, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
                self.graph = quantize_pt2e.prepare_qat_pt2e(graph, quantizer)
        except Exception as exc:  # torch.export and the quantizer raise many types; all mean "cannot prepare"
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelError(f"cannot prepare {type(model).__name__} for quantization-aware training ({type(exc).__name__}: {first}); "
                             "the model must be traceable by torch.export (kdedge --debug shows where it failed)") from exc
        self.register_buffer("_epoch", torch.zeros((), dtype=torch.long))  # the epoch being trained: its schedule survives a checkpoint
        # An observer shared by several tensors (a concatenation's inputs) is one module under several names: its tensors are
        # stored once (safetensors refuses aliases) and every name is filled from the stored one on load.
        canonical: dict[int, str] = {}
        self._aliases: dict[str, str] = {}
        for name, module in self.named_modules(remove_duplicate=False):
            if id(module) in canonical:
                self._aliases[name + "."] = canonical[id(module)] + "."
            else:
                canonical[id(module)] = name
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_before_load)
        self.train(False)

    @property
    def per_channel(self) -> bool:
        """Whether its weights have one scale per output channel (else one per tensor)."""
        return scheme_parts(self.scheme)[1]

    def set_schedule(self, epochs: int) -> None:
        """Freeze BatchNorm statistics after ``ceil(epochs / 2)`` epochs and the observers after ``ceil(2 * epochs / 3)``."""
        self.epochs = max(1, int(epochs))
        self.freeze_bn_after = math.ceil(self.epochs / 2)
        self.freeze_observers_after = math.ceil(2 * self.epochs / 3)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def start_epoch(self, epoch: int, epochs: int | None = None) -> None:
        """Called by the training loop before epoch ``epoch`` (1-based): applies the schedule's freezes from then on."""
        if epochs is not None and epochs != self.epochs:
            self.set_schedule(epochs)
        self._epoch.fill_(int(epoch))
        self.train(self.training)

    @property
    def bn_frozen(self) -> bool:
        return self.epoch > self.freeze_bn_after

    @property
    def observers_frozen(self) -> bool:
        return self.epoch > self.freeze_observers_after

    def train(self, mode: bool = True) -> QATModel:
        """Training: BatchNorm in batch mode (running statistics once frozen), observers on until frozen. Evaluation: nothing moves."""
        pt2e, _ = _torchao()
        disable_observer, enable_observer = pt2e.disable_observer, pt2e.enable_observer
        move_exported_model_to_eval, move_exported_model_to_train = pt2e.move_exported_model_to_eval, pt2e.move_exported_model_to_train
        self.training = self._applied = mode  # the prepared graph refuses .train(); these calls switch what it computes
        if mode:
            move_exported_model_to_train(self.graph)
            if self.bn_frozen:
                _freeze_batch_norm(self.graph)
            self.graph.apply(disable_observer if self.observers_frozen else enable_observer)
        else:
            move_exported_model_to_eval(self.graph)
            self.graph.apply(disable_observer)
        return self

    def resize_to(self, state: dict[str, Any], *, prefix: str = "") -> None:
        """Size the observers' tensors as ``state`` stores them: a per-channel scale or range has its size only once an observer ran."""
        for name, buf in self.named_buffers():
            stored = state.get(prefix + name)
            if "activation_post_process" in name and isinstance(stored, torch.Tensor) and stored.shape != buf.shape:
                buf.resize_(stored.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._applied != self.training:  # the flag was set without train() (kdedge._modes.evaluating restores flags directly)
            self.train(self.training)
        return self.graph(x)

    def converted(self, *, fold_quantize: bool = True) -> torch.fx.GraphModule:
        """The INT8 graph with the scales training used (quantize/dequantize pairs, BatchNorm folded): what the runtimes lower.

        ``fold_quantize``: weights stored as int8 (ExecuTorch) or as float with their Q/DQ pair (LiteRT's converter).
        """
        _, quantize_pt2e = _torchao()
        was = self.training
        self.train(False)
        try:
            prepared = copy.deepcopy(self.graph).cpu()
        finally:
            self.train(was)
        _convert_with_trained_qparams(prepared)
        with _fork_rng():
            return quantize_pt2e.convert_pt2e(prepared, fold_quantize=fold_quantize)

    def output_scale(self, graph: torch.fx.GraphModule | None = None) -> float | None:
        """The scale of the INT8 logits (one quantization step of the output), or None when the graph's output is not quantized.

        ``graph``: :meth:`converted`, if already made. Every INT8 artifact computes the converted graph's integer logits up to
        its kernels' rounding: parity is judged in these steps.
        """
        graph = graph if graph is not None else self.converted()
        out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not (isinstance(out, torch.fx.Node) and out.op == "call_function" and "dequantize_per_tensor" in str(out.target)):
            return None
        scale = out.args[1]
        if isinstance(scale, torch.fx.Node) and scale.op == "get_attr":
            scale = getattr(graph, str(scale.target))
        return float(scale) if isinstance(scale, (float, int, torch.Tensor)) else None

    #: The export formats that take the trained scales: each lowers :meth:`converted` (no calibration of its own); OpenVINO
    #: and the ORT format convert the QDQ ONNX file made from it.
    qat_formats = ("onnx-int8", "executorch-int8", "litert-int8", "openvino-int8", "ort-int8")

    def deployable(self) -> nn.Module:
        """:meth:`converted` as a module that exporters can put in eval mode (a converted graph refuses ``.eval()`` unless allowed)."""
        pt2e, _ = _torchao()
        graph = self.converted()
        pt2e.allow_exported_model_train_eval(graph)
        return graph

    def quantization(self) -> dict[str, Any]:
        """How the artifacts built from it are quantized (recorded in export.json and the manifest)."""
        base, per_channel = scheme_parts(self.scheme)
        return {"method": "qat", "scheme": self.scheme, "quantizer": "XNNPACKQuantizer (torchao pt2e, QAT)" if base == "xnnpack"
                else "litert_torch PT2EQuantizer (QAT)", "weights": f"int8 symmetric per {'output channel' if per_channel else 'tensor'}",
                "activations": "int8 per tensor; scales from the moving-average observers of quantization-aware training, frozen before its last epochs",
                **({"float_layers": list(self.keep_float)} if self.keep_float else {}),
                **({"dead_channels_silenced": self.silenced} if self.silenced else {})}

    @property
    def silenced(self) -> dict[str, list[int]]:
        """``{BatchNorm: [channel, ...]}`` silenced before training (:mod:`kdedge.models.dead_channels`), read from the graph's
        γ, so a reloaded checkpoint reports them too."""
        found: dict[str, list[int]] = {}
        for node in self.graph.graph.nodes:
            if node.op == "call_function" and str(node.target) in _BATCH_NORMS and isinstance(node.args[1], torch.fx.Node):
                gamma = self.graph.get_parameter(str(node.args[1].target))
                channels = (gamma.detach() == torch.tensor(SILENT_SCALE, dtype=gamma.dtype)).nonzero().flatten().tolist()
                if channels:
                    found[str(node.args[1].target).removesuffix(".weight")] = channels
        return found

    def schedule(self) -> dict[str, int]:
        """The freezes of the run that trains it (epochs after which BatchNorm statistics and observers stop moving)."""
        return {"epochs": self.epochs, "batchnorm_frozen_after": self.freeze_bn_after, "observers_frozen_after": self.freeze_observers_after}


def calibrate(model: QATModel, inputs: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Start the observers' ranges from ``inputs`` (batches of training images) before training: fake quantization off, BatchNorm as trained.

    The observers average each batch's range into theirs (the first batch sets it), so the ranges
    training starts from reflect the data rather than an untrained initial value. Returns the number of images seen.
    """
    pt2e, _ = _torchao()
    disable_fake_quant, enable_fake_quant, enable_observer = pt2e.disable_fake_quant, pt2e.enable_fake_quant, pt2e.enable_observer
    move_exported_model_to_eval = pt2e.move_exported_model_to_eval

    was = model.training
    seen = 0
    device = next(model.parameters()).device
    move_exported_model_to_eval(model.graph)
    model.graph.apply(enable_observer)
    model.graph.apply(disable_fake_quant)
    try:
        with torch.no_grad():
            for x in inputs:
                model.graph(x.to(device))
                seen += len(x)
    finally:
        model.graph.apply(enable_fake_quant)
        model.train(was)
    return seen


def _drop_aliases(module: QATModel, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in [k for k in state if any(k.startswith(prefix + a) for a in module._aliases)]:
        del state[key]


def _before_load(module: QATModel, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    """Every alias of a shared observer gets the stored tensors; the observers take the stored sizes."""
    for alias, canonical in module._aliases.items():
        for key in [k for k in state if k.startswith(prefix + canonical)]:
            state.setdefault(prefix + alias + key[len(prefix + canonical):], state[key])
    module.resize_to(state, prefix=prefix)


def _freeze_batch_norm(graph: torch.fx.GraphModule) -> None:
    """BatchNorm nodes normalize with their running statistics and stop updating them (PT2E has no ``freeze_bn_stats``)."""
    changed = False
    for node in graph.graph.nodes:
        if node.op == "call_function" and str(node.target) in _BATCH_NORMS and len(node.args) > 5 and node.args[5] is True:
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
            changed = True
    if changed:
        graph.recompile()


def _convert_with_trained_qparams(graph: torch.fx.GraphModule) -> None:
    """Make ``convert_pt2e`` quantize with the scales the fused fake-quantizers trained with (in place, on a copy of the graph).

    During training ``FusedMovingAvgObsFakeQuantize`` quantizes with the scale its ATen kernel derives from the running range
    (symmetric: ``max(-min/128, max/127) * 255/254``), while ``convert_pt2e`` asks the observer inside it, whose Python formula
    differs (``max(-min, max) / 127``): every symmetric weight scale moved by up to 0.4 % between training and the artifact,
    enough to re-round a share of the weights (measured: 1.4-2.5 % of argmaxes changed on a per-tensor ``dw_cnn@0.5``). torchao
    fixed it after 0.18 (pytorch/ao#4824, ``use_kernel_params``). Here each fake-quantizer's buffers are recomputed by the kernel
    from its frozen range (fake quantization on, observation off: the range does not move) and handed to the conversion, except
    where the kernel's symmetric zero point is not 0 (a channel whose weights all have one sign; measured on one of three
    default-student seeds), which keeps the observer's.
    """
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

    for module in graph.modules():
        if not isinstance(module, FusedMovingAvgObsFakeQuantize):
            continue
        observer = module.activation_post_process
        lo, hi = observer.min_val, observer.max_val
        if lo.numel() == 0 or not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            continue  # never observed: the conversion reports it as it would
        probe = torch.zeros(lo.numel() if module.is_per_channel else 1, 1, dtype=torch.float32, device=lo.device)  # per channel: one row each
        with torch.no_grad():
            torch.fused_moving_avg_obs_fake_quant(probe, torch.zeros_like(module.observer_enabled), torch.ones_like(module.fake_quant_enabled),
                                                  lo, hi, module.scale, module.zero_point, observer.averaging_constant, observer.quant_min,
                                                  observer.quant_max, 0, module.is_per_channel, module.is_symmetric_quant)
        scale, zero_point = module.scale.detach().clone(), module.zero_point.detach().clone()
        if module.is_symmetric_quant and bool((zero_point != 0).any()):
            # The kernel gives a channel whose weights all have one sign an offset zero point (127 or -127), which no runtime's
            # symmetric weights take (XNNPACK refuses to load it): those channels keep the observer's zero-point-0 scale,
            # twice the step training used on them.
            observed_scale, observed_zp = observer.calculate_qparams()
            offset = zero_point != 0
            scale = torch.where(offset, observed_scale.to(scale.dtype).reshape(scale.shape), scale)
            zero_point = torch.where(offset, observed_zp.to(zero_point.dtype).reshape(zero_point.shape), zero_point)
        module.calculate_qparams = lambda trained=(scale, zero_point): trained  # type: ignore[method-assign]


def _fork_rng() -> Any:
    """Capture and preparation draw no random numbers from the caller's stream (a resumed run rebuilds the graph)."""
    return torch.random.fork_rng(devices=[])
