"""Folding a LoRA adapter into its base projection, and undoing it exactly.

The arithmetic is PEFT's `merge()` for plain LoRA, step for step, so that a merged model equals
PEFT's `merge_and_unload()` bit for bit:
- dense weights (fp32/bf16/fp16): `W.data += (B @ A) * scale`, the delta computed in the
  adapter's dtype on the weight's device. PEFT holds adapter weights in fp32 whatever the base
  dtype (`autocast_adapter_dtype`), so callers pass adapters read in fp32;
- bitsandbytes NF4/FP4 (`Params4bit`) and int8 (`Int8Params`): dequantize, add the delta,
  quantize again into a new parameter, as PEFT's `Linear4bit.merge`/`Linear8bitLt.merge` do.
  `dense=True` keeps the sum unquantized in a plain `nn.Linear` instead (no requantization
  error, at the memory of a dense layer).

Undoing never subtracts: the dense weights are copied aside (to host memory) before the add
and copied back; a quantized layer keeps its original parameter object and quantization state
aside and gets them back. Either way every base parameter is restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .peft_format import LoRAWeights


def delta_weight(weights: LoRAWeights, device: torch.device,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's `get_delta_weight` for plain LoRA: `(B @ A) * scale` `[out, in]`, in the
    adapter's dtype, into `out` when given (a reused buffer: no fresh pages per module; the
    same products, so the same bits). fan_in_fan_out never applies: it only transposes
    Conv1D bases, which the parser does not accept."""
    a = weights.lora_a.to(device)  # [r, in]
    b = weights.lora_b.to(device)  # [out, r]
    delta = torch.matmul(b, a, out=out)
    return delta.mul_(weights.scale)


class Workspace:
    """One buffer for every module's delta, grown to the largest: merging a model then
    touches fresh memory once, not once per projection."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, shape: tuple[int, int], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self._buffer
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self._buffer = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)


@dataclass
class Merged:
    """One merged projection: the module to serve it with, and how to get the base back."""

    module: nn.Module  # the base module (changed in place) or its dense replacement
    undo: Callable[[], nn.Module]  # restores the base exactly; returns the module to serve
    kept_bytes: int  # memory held aside while merged (host copies, original parameters)
    extra_bytes: int  # device memory the merged layer takes beyond the base layer's


def _param_class(module: nn.Module) -> str:
    return type(getattr(module, "weight", None)).__name__


def merge_module(module: nn.Module, weights: LoRAWeights, dense: bool = False,
                 dtype: torch.dtype | None = None, workspace: Workspace | None = None) -> Merged:
    """Fold `weights` into `module` (an nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt).

    `dense` applies to quantized modules only: the merged layer becomes an nn.Linear in
    `dtype` (the model's compute dtype) instead of being quantized again."""
    kind = _param_class(module)
    if kind == "Params4bit":
        return _merge_4bit(module, weights, dense, dtype)
    if kind == "Int8Params":
        return _merge_int8(module, weights, dense, dtype)
    return _merge_dense(module, weights, workspace)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _merge_dense(module: nn.Module, weights: LoRAWeights,
                 workspace: Workspace | None) -> Merged:
    w = module.weight
    # A host copy, page-locked on CUDA so that saving and restoring are DMA copies.
    pin = w.device.type == "cuda"
    kept = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=pin)
    kept.copy_(w.data)
    # PEFT's in-place add (`base_layer.weight.data += delta_weight`): an fp32 delta into a
    # bf16 weight adds in fp32 and rounds once, exactly as PEFT does. In place, so captured
    # CUDA graphs, which hold the weight's address, stay valid.
    out = None
    if workspace is not None:
        out = workspace.get(tuple(w.shape), weights.lora_a.dtype, w.device)
    w.data += delta_weight(weights, w.device, out)
    _weight_changed(module)

    def undo() -> nn.Module:
        w.data.copy_(kept)
        _weight_changed(module)
        return module

    return Merged(module, undo, _nbytes(kept), 0)


def _weight_changed(module: nn.Module) -> None:
    # A layer holding a copy derived from its weight (server/runner/cpu_gemm.py's oneDNN-packed
    # PackedLinear) refreshes it after the in-place change.
    repack = getattr(module, "repack", None)
    if repack is not None:
        repack()


def _dense_linear(module: nn.Module, w_data: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = w_data.shape
    linear = nn.Linear(in_features, out_features, bias=False, device=w_data.device, dtype=dtype)
    linear.weight = nn.Parameter(w_data.to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = module.bias  # shared, never changed by a merge
    return linear


def _merge_4bit(module: nn.Module, weights: LoRAWeights, dense: bool,
                dtype: torch.dtype | None) -> Merged:
    import bitsandbytes as bnb

    weight = module.weight  # Params4bit, kept whole: its bytes and quant_state
    output = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    w_data = output + delta_weight(weights, output.device)
    if dense:
        linear = _dense_linear(module, w_data, dtype or output.dtype)
        return Merged(linear, lambda: module, 0,
                      _nbytes(linear.weight) - _param_bytes(weight))
    # PEFT's Linear4bit.merge: the parameter's own attributes (quant type, block size,
    # storage type ...) make the new one. PEFT edits the old one's __dict__ as it goes; a
    # copy keeps ours untouched for the undo.
    kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
    if "bnb_quantized" in kwargs:
        kwargs["bnb_quantized"] = False
    kwargs["requires_grad"] = False
    kwargs.pop("data", None)
    # Quantizing points the layer's own `quant_state` at the new state: put it back too.
    layer_state = getattr(module, "quant_state", None)
    module.weight = bnb.nn.Params4bit(w_data.to("cpu"), **kwargs).to(weight.device)

    def undo() -> nn.Module:
        module.weight = weight
        if hasattr(module, "quant_state"):
            module.quant_state = layer_state
        return module

    return Merged(module, undo, _param_bytes(weight), 0)


def _merge_int8(module: nn.Module, weights: LoRAWeights, dense: bool,
                dtype: torch.dtype | None) -> Merged:
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    weight, state = module.weight, module.state  # Int8Params, MatmulLtState
    # bitsandbytes moves the int8 matrix and its row scales between the parameter and the
    # layer's state at the first forward: both are kept to be put back as they were.
    saved = (state.CB, state.SCB)
    if state.SCB is None:
        state.SCB = weight.SCB
    output = dequantize_bnb_weight(weight, state=state)
    delta = delta_weight(weights, output.device)
    w_data = output.to(delta.dtype).to(delta.device) + delta
    if dense:
        state.CB, state.SCB = saved
        linear = _dense_linear(module, w_data, dtype or torch.float32)
        return Merged(linear, lambda: module, 0,
                      _nbytes(linear.weight) - _param_bytes(weight))
    module.weight = bnb.nn.Int8Params(w_data.to("cpu"), requires_grad=False,
                                      has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    state.reset_grads()

    def undo() -> nn.Module:
        module.weight = weight
        state.reset_grads()
        state.CB, state.SCB = saved
        return module

    return Merged(module, undo, _param_bytes(weight), 0)


def _param_bytes(weight: torch.Tensor) -> int:
    """A quantized parameter's bytes with its quantization state's tensors."""
    total = _nbytes(weight.data)
    state = getattr(weight, "quant_state", None)
    for t in (getattr(state, "absmax", None), getattr(weight, "SCB", None)):
        if isinstance(t, torch.Tensor):
            total += _nbytes(t)
    return total
