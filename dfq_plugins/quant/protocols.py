"""Protocols A and B on an observed graph (torch.ao FX or torchao PT2E), after ``prepare``.

Neither QConfigMapping nor a PT2E quantizer can say "leave the model input in float but quantize
the first conv's weights", nor "the tensor feeding the last layer is 8-bit": FX reuses the
producer's observer for the consumer's input, and PT2E stacks a second observer behind it. So
the protocols edit the prepared graph, which both toolchains' ``convert`` read as it is:

- A and B: the observer on each graph input is removed; the first layer sees the float image
  and its weights stay quantized (convert emits q/dq for the weight only).
- B: every observer on the path into the last layer, back through reshapes and pooling, is
  widened to 8 bits (BRECQ's "last layer at W8A8": its input activations are 8-bit).
"""
from __future__ import annotations

from torch import fx, nn

# Ops that carry their input's quantization grid through unchanged (or average it).
_PASSTHROUGH = ("flatten", "view", "reshape", "mean", "adaptive_avg_pool", "avg_pool", "dropout", "squeeze",
                "contiguous", "clone")
_WEIGHTED = ("conv1d", "conv2d", "conv3d", "linear")
# Between the image and its observer: EfficientNet's "same" padding puts a pad before the stem's observer.
_INPUT_PATH = ("pad",)


def observer_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The observer or fake-quant module ``node`` calls (None for any other node)."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    observer = getattr(module, "activation_post_process", module)
    return module if hasattr(observer, "calculate_qparams") and hasattr(module, "quant_max") else None


def is_weight_observer(node: fx.Node) -> bool:
    """Whether an observer node reads a weight (a ``get_attr``) rather than an activation."""
    return bool(node.args) and getattr(node.args[0], "op", None) == "get_attr"


def _reads_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s first argument is a graph input, directly or through pads and reshapes."""
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node) and src.op != "placeholder":
        target = str(getattr(src.target, "__name__", src.target)).lower()
        if not (_is_passthrough(gm, src) or any(p in target for p in _INPUT_PATH)):
            return False
        src = src.args[0] if src.args else None
    return isinstance(src, fx.Node)


def leave_input_unquantized(gm: fx.GraphModule) -> int:
    """Remove the observers that read a graph input (through pads and reshapes); returns how many."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and observer_of(gm, node) is not None and _reads_input(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _is_weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return str(node.target).split(".")[1 if str(node.target).startswith("aten.") else 0].startswith(_WEIGHTED)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.Sequential) and len(module):  # a fused ConvReLU2d / LinearReLU
            module = module[0]
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    return False


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        name = type(gm.get_submodule(str(node.target))).__name__.lower()
    elif node.op in ("call_function", "call_method"):
        name = str(getattr(node.target, "__name__", node.target)).lower()
    else:
        return False
    return any(p.replace("_", "") in name.replace("_", "") for p in _PASSTHROUGH)


def _set_bits(module: nn.Module, quant_min: int, quant_max: int) -> None:
    for m in (module, getattr(module, "activation_post_process", None)):
        if m is None:
            continue
        m.quant_min, m.quant_max = quant_min, quant_max
        if hasattr(m, "dst_nbins"):  # histogram search sized for the range
            m.dst_nbins = quant_max - quant_min + 1


def widen_last_layer_input(gm: fx.GraphModule, act_range: tuple[int, int]) -> int:
    """Give the observers feeding the last weighted layer (through pooling/reshapes) ``act_range``."""
    weighted = [n for n in gm.graph.nodes if _is_weighted(gm, n)]
    if not weighted:
        return 0
    widened = 0
    node = weighted[-1].args[0] if weighted[-1].args else None
    while isinstance(node, fx.Node):
        if observer_of(gm, node) is not None and not is_weight_observer(node):
            _set_bits(observer_of(gm, node), *act_range)
            widened += 1
            node = node.args[0] if node.args else None
        elif _is_passthrough(gm, node):
            node = node.args[0] if node.args else None
        else:
            break
    return widened


def apply_protocol(gm: fx.GraphModule, protocol: str, act_range_8bit: tuple[int, int]) -> dict[str, int]:
    """Edit a prepared graph for ``protocol`` (``hardware``, ``A`` or ``B``); returns what changed."""
    done = {"inputs_left_float": 0, "last_layer_inputs_8bit": 0}
    if protocol in ("A", "B"):
        done["inputs_left_float"] = leave_input_unquantized(gm)
        if not done["inputs_left_float"]:
            raise RuntimeError("protocol A/B: no observer reads the model input in this graph; the toolchain "
                               "placed its input quantizer elsewhere, so the protocol cannot be applied")
    if protocol == "B":
        done["last_layer_inputs_8bit"] = widen_last_layer_input(gm, act_range_8bit)
    return done


def input_is_quantized(gm: fx.GraphModule) -> bool:
    """Whether any quantize op or observer reads a graph input, directly or through pads and
    reshapes (converted or prepared graphs)."""
    for node in gm.graph.nodes:
        observed = node.op == "call_module" and observer_of(gm, node) is not None
        quantized = node.op == "call_function" and "quantize_per" in str(node.target)
        if (observed or quantized) and _reads_input(gm, node):
            return True
    return False


__all__ = ["apply_protocol", "input_is_quantized", "is_weight_observer", "leave_input_unquantized", "observer_of",
           "widen_last_layer_input"]
