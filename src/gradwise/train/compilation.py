"""`train.compile`: torch.compile around what the training step calls, its backend checked before training.

The engine compiles its forward module (the model, or the DDP/FSDP module around it); evaluation, the
diagnostics' hooks and checkpoints use the model itself, so state_dict keys are the model's own and a
compiled run resumes an eager one and back. The first step of each fit traces and generates code; the
`CompileWarmup` callback reports its wall time apart from the steps'.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from gradwise.config.schema import TrainConfig
from gradwise.errors import ConfigError

DEBUG_BACKENDS = ("eager", "aot_eager")  # trace only / trace and differentiate, no code generation
# backends torch lists whose compiler is a package of its own: checked before training, not at its first step
BACKEND_PACKAGES = {"tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla", "onnxrt": "onnxruntime",
                    "tensorrt": "torch_tensorrt", "torch_tensorrt": "torch_tensorrt",
                    "ipex": "intel_extension_for_pytorch"}


def compile_forward(module: nn.Module, tc: TrainConfig) -> nn.Module:
    """`module` compiled as `tc.compile_mode` / `tc.compile_backend` say (compilation happens at its first call)."""
    import torch._dynamo

    allowed = [*torch._dynamo.list_backends(), *DEBUG_BACKENDS]
    if tc.compile_backend not in allowed:
        raise ConfigError(f"config error: train.compile_backend={tc.compile_backend!r} is not a torch.compile "
                          f"backend here (allowed: {', '.join(sorted(allowed))})")
    package = BACKEND_PACKAGES.get(tc.compile_backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"config error: train.compile_backend={tc.compile_backend!r} needs the {package} package, "
                          "which is not installed (inductor, the default, needs nothing more)")
    mode = None if tc.compile_mode == "default" else tc.compile_mode
    return torch.compile(module, mode=mode, backend=tc.compile_backend)
