"""Lets timm import where torchvision cannot (no matching CPU build: importing the installed
torchvision fails with `RuntimeError: operator torchvision::nms does not exist`).

timm imports torchvision at load time only for its data pipeline and a few layer utilities; the
model code our parity tests run (e.g. `timm.models.eva.Eva.forward_features`) executes no
torchvision code. So, only if the real package does not import, register a minimal stand-in holding
exactly the names timm's module-level imports need. This runs before any test module imports timm.
transformers and diffusers are imported first with torchvision marked absent (they need none of it).
"""
import enum
import sys
import types

try:
    import torchvision  # noqa: F401
except Exception:  # ImportError, or the RuntimeError above
    for _name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[_name]  # drop a half-initialised import
    # transformers and diffusers probe for torchvision once (and cache the answer); a stand-in would
    # look present to them, so let them see it absent, then install the stand-in for timm.
    sys.modules["torchvision"] = None
    try:
        import diffusers
        import transformers
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        for _cls in ("UNet2DConditionModel", "AutoencoderKL", "EulerDiscreteScheduler", "DDPMScheduler"):
            getattr(diffusers, _cls)  # resolve diffusers' lazy imports while torchvision is absent
        transformers.LlamaForCausalLM  # noqa: B018 (same, for transformers)
    finally:
        del sys.modules["torchvision"]
    _STAND_IN = {
        "torchvision": [],
        "torchvision.datasets": ["CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"],
        "torchvision.ops": [],
        "torchvision.ops.misc": ["FrozenBatchNorm2d"],
        "torchvision.transforms": ["ToTensor"],
        "torchvision.transforms.functional": [],
    }
    for _name, _attrs in _STAND_IN.items():
        _module = types.ModuleType(_name)
        for _attr in _attrs:  # placeholder classes: timm subclasses / isinstance-checks some of them
            setattr(_module, _attr, type(_attr, (), {}))
        sys.modules[_name] = _module
        if "." in _name:
            _parent, _child = _name.rsplit(".", 1)
            setattr(sys.modules[_parent], _child, _module)
    sys.modules["torchvision.transforms.functional"].InterpolationMode = enum.Enum(
        "InterpolationMode", {m.upper(): m for m in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")})
