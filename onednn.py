"""oneDNN's GEMM for the linear layers of a model on an x86 CPU, where it runs faster than torch's default linear
(bench/bench_generate.py and bench/bench_train.py print both): fp32, and bf16 for sampling a bf16 model (AMX where
the CPU has it; bf16 needs AVX512 or AVX-NE-CONVERT). Products differ by float rounding only.

    with onednn.packed_linears(model): ...    # sampling: weights (LoRA merged in) reordered once, no gradients
    with onednn.trained_linears(model): ...   # training: forward and backward through oneDNN, weights as they are

Elsewhere (GPU, 4-bit, DoRA, other CPUs; bf16 training) the layers run as they are.
"""
import contextlib

import torch

# on the x86 CPUs it was measured on; elsewhere the modules run as they are
AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
# oneDNN's bf16 GEMM needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; on other CPUs bf16 layers run as they are
BF16 = AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _linear(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_weight(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) that module(x) applies, for a plain fp32 or bf16 CPU nn.Linear or a peft LoRA layer over one
    (whose weight is W + the active adapters' B A * scaling, computed now, in W's dtype); None for anything else
    (4-bit, DoRA, GPU...)."""
    base = getattr(module, "base_layer", None)
    linear = base if base is not None and hasattr(module, "lora_A") else module
    weight = linear.weight if type(linear) is torch.nn.Linear else None
    if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if linear is module:
        return module.weight, module.bias
    if module.merged:
        return None
    if not module.disable_adapters:
        for name in module.active_adapters:
            if name in module.lora_A:
                if name in getattr(module, "lora_variant", {}):  # DoRA and other variants: not a plain sum
                    return None
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, linear.bias


@torch.no_grad()
def pack_linears(model) -> dict:
    """{module: x -> module(x)} for the linear layers of a model on a CPU, with weights reordered once (per sample()
    call) for oneDNN's GEMM. A row's product does not depend on how many rows come with it (weights reordered
    for 128 rows; tests/test_generate.py checks it). Costs one more copy of the weights while sampling. Modules left
    out (GPU, 4-bit, DoRA; bf16 where the CPU lacks oneDNN's bf16 GEMM) are called as they are."""
    if not AVAILABLE:
        return {}
    packed, inside_lora = {}, set()
    for module in model.modules():  # parents come before their children
        if module in inside_lora:  # a LoRA layer's own base and A/B layers are never called on their own here
            continue
        if hasattr(module, "lora_A"):
            inside_lora.update(set(module.modules()) - {module})
        found = linear_weight(module)
        if found is None:
            continue
        weight, bias = found
        if weight.dtype == torch.bfloat16 and not BF16:
            continue
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight, 128)
        packed[module] = (lambda w, b: lambda x: _linear(x, w, b))(reordered, bias)
    return packed


@contextlib.contextmanager
def _swapped_forwards(forwards: dict):
    """Inside, each module's forward is the given function; afterwards its own again (an instance forward, such as
    an accelerate hook, comes back too)."""
    saved = {module: module.__dict__.get("forward") for module in forwards}
    for module, fn in forwards.items():
        module.forward = fn
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def packed_linears(model):
    """Inside, the linear layers that pack_linears covers run through its kernels: in the model's own forward
    (prefill; decoding of other families) and in generate's written-out decode step alike."""
    return _swapped_forwards(pack_linears(model))


class _TrainedLinear(torch.autograd.Function):
    """y = x W^T + b with forward and backward through oneDNN's fp32 GEMM (torch.ops.mkldnn._linear_pointwise):
    dx = dy W, dW = dy^T x, db = sum dy. x [..., in], W [out, in] -> y [..., out]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _linear(grad, weight.t(), None)  # [..., in]
        flat = grad.reshape(-1, grad.shape[-1])  # [M, out]
        if ctx.needs_input_grad[1]:
            dw = _linear(flat.t().contiguous(), x.reshape(-1, x.shape[-1]).t(), None)  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = flat.sum(0)
        return dx, dw, db


def trained_linears(model):
    """Inside, the model's fp32 CPU torch.nn.Linear layers (not their subclasses, e.g. 4-bit ones) train through
    _TrainedLinear; their weights are used as they are (they change every step)."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
              and m.weight.dtype == torch.float32] if AVAILABLE else []
    return _swapped_forwards({m: (lambda m: lambda x: _TrainedLinear.apply(x, m.weight, m.bias))(m) for m in layers})
