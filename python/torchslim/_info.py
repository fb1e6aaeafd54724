"""torchslim.info(): versions, CPU features, the ISA in use, and every backend's availability."""

from __future__ import annotations

import platform

import torch

from torchslim import _ext
from torchslim.ops import _registry
from torchslim.ops.int8 import _triton_available


def info() -> dict[str, object]:
    """What torchslim can run here and, for each backend that is missing, why."""
    import torchslim

    out: dict[str, object] = {
        "torchslim": torchslim.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if _ext._C is not None:
        out["build"] = dict(_ext._C.build_info())
        out["cpu_features"] = {k: v for k, v in _ext._C.cpu_features().items() if v}
        out["cpu_isa"] = _ext._C.isa()
        out["cpu_isa_best"] = _ext._C.best_isa()
        out["cpu_kernel_paths"] = dict(_ext._C.cpu_kernel_paths())
    backends = {
        "cpu": _ext.cpu_available(),
        "cuda": _ext.cuda_available(),
        "triton": _triton_available(),
        "reference": None,
    }
    out["backends"] = {
        name: ("available" if why is None else why) for name, why in backends.items()
    }
    out["forced_backend"] = _registry.forced_backend()
    out["strict"] = _registry.strict_mode()
    out["ops"] = sorted(_registry.registered_ops())
    return out


def format_info(data: dict[str, object]) -> str:
    width = max(len(k) for k in data)
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            inner = max((len(str(k)) for k in value), default=0)
            lines.extend(f"  {k:<{inner}}  {v}" for k, v in value.items())
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
