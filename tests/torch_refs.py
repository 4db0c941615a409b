"""The PyTorch references of the parity tests and benchmarks, built from our configs.

Importing this module first lets timm import where torchvision cannot (no matching CPU build:
importing the installed torchvision fails with `RuntimeError: operator torchvision::nms does not
exist`). timm imports torchvision at load time only for its data pipeline and a few layer
utilities; the model code used here (`timm.models.eva.Eva.forward_features`) executes no
torchvision code. So, only if the real package does not import, register a minimal stand-in
holding exactly the names timm's module-level imports need. transformers and diffusers are
imported first with torchvision marked absent (they need none of it).
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

import functools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from timm.models.eva import Eva  # noqa: E402

from emu2_jax.data import images as image_lib  # noqa: E402
from emu2_jax.models.eva_vit import VisionConfig  # noqa: E402
from emu2_jax.models.llama import LlamaConfig  # noqa: E402


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch module's state dict as the numpy mapping our converters take."""
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def timm_eva(cfg: VisionConfig, seed: int = 0, qkv_fused: bool = True) -> Eva:
    """timm's Eva built as the tower described by `cfg` (SPEC.md §1), with random weights everywhere.

    timm 1.0.x: `use_post_transformer_norm` switches the final `norm` (otherwise on by default when there
    is no fc_norm); num_classes=0 / global_pool='' / use_fc_norm=False remove the head and pooled norm.
    """
    torch.manual_seed(seed)
    ref_grid = None if cfg.rope_ref_grid is None else (cfg.rope_ref_grid,) * 2
    model = Eva(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=cfg.qkv_bias,
                qkv_fused=qkv_fused, use_post_norm=cfg.post_norm, use_rot_pos_emb=cfg.use_rope,
                ref_feat_shape=ref_grid, swiglu_mlp=cfg.swiglu, scale_mlp=cfg.sub_ln,
                scale_attn_inner=cfg.sub_ln, num_classes=0, global_pool="", use_fc_norm=False,
                use_post_transformer_norm=cfg.final_norm,
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.layer_norm_eps)).eval()
    # timm initialises LayerNorms and q/v biases trivially; randomise all so that every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name in ("cls_token", "pos_embed"):
                p.normal_(0.0, 0.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))  # 1 / sqrt(fan_in)
    return model


def hf_llama(config: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random transformers LLaMA matching `config`, with non-trivial RMSNorm weights."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_cache_length, tie_word_embeddings=False,
        initializer_range=0.1,  # larger than the default 0.02 so logits are far from zero
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # HF initialises these to ones
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
    return model


def emu2_reference(config, seed: int = 0) -> torch.nn.ModuleDict:
    """Emu2 assembled from the references (timm EVA, transformers LLaMA, bias-free linear
    projections), its state dict in the native checkpoint layout (`visual.`, `decoder.lm.`,
    `project_up.weight`, `project_down.weight`)."""
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "visual": timm_eva(config.vision, seed=seed),
        "decoder": torch.nn.ModuleDict({"lm": hf_llama(config.llm, seed=seed)}),
        "project_up": torch.nn.Linear(config.vision.width, config.llm.hidden_size, bias=False),
        "project_down": torch.nn.Linear(config.llm.hidden_size, config.vision.width, bias=False),
    })


def reference_pixels(images: torch.Tensor) -> torch.Tensor:
    """The batch's uint8 pixel rows [B, M, S, S * 3] (which ours CLIP-normalises on device) as the
    references' encoder input: float32 NCHW [B * M, 3, S, S], CLIP-normalised on the host by
    `images.normalize` (the release's ToTensor + Normalize)."""
    b, m, size = images.shape[:3]
    return torch.from_numpy(image_lib.normalize(images.numpy().reshape(b * m, size, size, 3))).permute(0, 3, 1, 2)


def emu2_reference_forward(modules: torch.nn.ModuleDict, batch: dict, config) -> dict[str, torch.Tensor]:
    """Emu2's forward as the official code computes it (SPEC.md §2, §4) for rows whose images are all
    valid still images: EVA patch tokens -> avg_pool2d -> project_up into the `<image>` positions ->
    LLaMA -> logits, and project_down of the final-norm hidden state regressing the next visual slot."""
    tokens = batch["tokens"]
    b, m = batch["images"].shape[:2]
    grid, side = config.vision.grid_size, int(config.n_query ** 0.5)
    pixels = reference_pixels(batch["images"])
    patches = modules["visual"].forward_features(pixels)[:, 1:]
    pooled = torch.nn.functional.avg_pool2d(patches.transpose(1, 2).reshape(b * m, -1, grid, grid),
                                            grid // side).flatten(2).transpose(1, 2)
    llm = modules["decoder"]["lm"]
    is_image = (tokens == config.image_token_id)[..., None]
    embeds = llm.get_input_embeddings()(tokens)
    embeds = embeds.masked_scatter(is_image, modules["project_up"](pooled).reshape(-1, embeds.shape[-1]))
    visual_at = torch.zeros(*tokens.shape, pooled.shape[-1]).masked_scatter(
        is_image, pooled.detach().reshape(-1, pooled.shape[-1]))
    out = llm(inputs_embeds=embeds, output_hidden_states=True)
    nll = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["targets"].flatten().long(),
                                            reduction="none").reshape(tokens.shape)
    text_loss = (nll * batch["text_loss_mask"]).sum() / batch["text_loss_mask"].sum().clamp(min=1)
    pred = modules["project_down"](out.hidden_states[-1])
    target = torch.nn.functional.pad(visual_at[:, 1:], (0, 0, 0, 1))
    mse = ((pred - target) ** 2).mean(-1)
    image_loss = (mse * batch["image_loss_mask"]).sum() / batch["image_loss_mask"].sum().clamp(min=1)
    return {"logits": out.logits, "visual_pred": pred, "text_loss": text_loss, "image_loss": image_loss,
            "loss": text_loss + image_loss}
