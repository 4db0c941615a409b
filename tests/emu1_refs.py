"""PyTorch reference of the released Emu (v1) (BAAI's `Emu1/models/modeling_emu.py`), built from
library blocks, with its state dict in the release's exact key layout.

- `visual`: timm's `Eva` as a pre-norm EVA-CLIP tower without final norm or head, whose
  `forward_features` returns every token (CLS first), as the release's `EVAVisionTransformer
  .forward_features` does. The release's tower also holds a pooled-output `norm` and a `head`
  that Emu never calls: the state dict gets random `visual.norm.*` / `visual.head.*` for them.
- `ln_visual`: `nn.LayerNorm(eps=1e-6)`.
- `cformer`: the release's `CausalFormer` is a transformers `T5Stack` decoder (`T5ForConditionalGeneration
  (t5-base).decoder`, relu MLP) whose cross-attention `k` / `v` read the encoder width
  (`config.encoder_width`; the release's modified modeling_t5 builds them so). Here: transformers'
  own `T5Stack` with those two Linear layers replaced by encoder-width ones, which is all the release
  changes; plus `causal_tokens` [1, N, W] and the biased `projection` W -> D.
- `decoder.lm`: transformers' `LlamaForCausalLM` plus `stu_regress_head` (D -> D, no bias) on it.
  With `lora_rank`, q/k/v/o become `LoraLinear` (y = x W^T + (alpha / r) (x A^T) B^T: PEFT's LoRA
  forward, minimal transcription since peft is not installed) and the keys move under
  `decoder.lm.base_model.model.` as PEFT's wrapper puts them.
"""
import numpy as np
import torch

from tests.torch_refs import hf_llama, reference_pixels, state_dict_np, timm_eva

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraLinear(torch.nn.Linear):
    """PEFT's LoRA Linear (eval, no dropout): keys `weight`, `lora_A.weight`, `lora_B.weight`."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=False)
        with torch.no_grad():
            self.weight.copy_(base.weight)
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.2)  # PEFT starts B at zero; random so the merge matters
        self.scale = alpha / rank

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) + self.lora_B(self.lora_A(x)) * self.scale


class CausalFormer(torch.nn.Module):
    def __init__(self, cfg, vision_width: int, llm_width: int):
        super().__init__()
        # Imported here, after tests.torch_refs made transformers importable without torchvision.
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        ct = cfg.causal_transformer
        t5 = T5Config(vocab_size=40, d_model=ct.width, d_kv=ct.width // ct.num_heads, d_ff=ct.mlp_dim,
                      num_layers=ct.depth, num_heads=ct.num_heads, relative_attention_num_buckets=ct.rel_buckets,
                      relative_attention_max_distance=ct.rel_max_distance, dropout_rate=0.0,
                      feed_forward_proj="relu", is_decoder=True, use_cache=False, is_encoder_decoder=False)
        self.cformer = T5Stack(t5)
        for block in self.cformer.block:  # the release's cross-attention reads the encoder width
            attn = block.layer[1].EncDecAttention
            attn.k = torch.nn.Linear(vision_width, ct.width, bias=False)
            attn.v = torch.nn.Linear(vision_width, ct.width, bias=False)
        self.causal_tokens = torch.nn.Parameter(torch.randn(1, ct.num_queries, ct.width))
        self.projection = torch.nn.Linear(ct.width, llm_width)

    def forward(self, img_embeds):
        b = img_embeds.shape[0]
        queries = self.causal_tokens.expand(b, -1, -1)
        out = self.cformer(inputs_embeds=queries, attention_mask=torch.ones(queries.shape[:2], dtype=torch.long),
                           encoder_hidden_states=img_embeds,
                           encoder_attention_mask=torch.ones(img_embeds.shape[:2], dtype=torch.long), use_cache=False)
        return self.projection(out.last_hidden_state)


def emu1_reference(cfg, seed: int = 0, lora_rank: int = 0, lora_alpha: float = 16.0) -> torch.nn.ModuleDict:
    torch.manual_seed(seed)
    vision, llm_cfg = cfg.vision, cfg.llm
    lm = hf_llama(llm_cfg, seed=seed)
    lm.stu_regress_head = torch.nn.Linear(llm_cfg.hidden_size, llm_cfg.hidden_size, bias=False)
    if lora_rank:
        for layer in lm.model.layers:
            for name in LORA_TARGETS:
                setattr(layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name), lora_rank, lora_alpha))
    modules = torch.nn.ModuleDict({
        "visual": timm_eva(vision, seed=seed),
        "ln_visual": torch.nn.LayerNorm(vision.width, eps=1e-6),
        "cformer": CausalFormer(cfg, vision.width, llm_cfg.hidden_size),
        "decoder": torch.nn.ModuleDict({"lm": lm}),
    })
    with torch.no_grad():  # LayerNorm / RMSNorm scales away from one, so that every parameter matters
        for name, p in modules.named_parameters():
            if name.startswith(("ln_visual", "cformer")) and ("norm" in name or "ln_visual" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
    return modules.eval()


def emu1_state_dict(modules: torch.nn.ModuleDict, peft_adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """The release's checkpoint keys. With LoRA: `decoder.lm.base_model.model.*`, and the adapters as
    `lora_A.weight` (PEFT < 0.3) or `lora_A.<peft_adapter_name>.weight`."""
    state = {k: v for k, v in state_dict_np(modules).items() if not k.endswith("attn.k_bias")}
    width = modules["visual"].cls_token.shape[-1]
    rng = np.random.default_rng(0)
    state.update({"visual.norm.weight": np.ones(width, np.float32), "visual.norm.bias": np.zeros(width, np.float32),
                  "visual.head.weight": rng.normal(size=(8, width)).astype(np.float32),
                  "visual.head.bias": np.zeros(8, np.float32)})
    lora = any(".lora_A." in k for k in state)
    out = {}
    for key, value in state.items():
        if lora and key.startswith("decoder.lm."):
            key = "decoder.lm.base_model.model." + key[len("decoder.lm."):]
        if peft_adapter_name:
            key = key.replace(".lora_A.weight", f".lora_A.{peft_adapter_name}.weight")
            key = key.replace(".lora_B.weight", f".lora_B.{peft_adapter_name}.weight")
        out[key] = value
    return out


def emu1_reference_forward(modules: torch.nn.ModuleDict, batch: dict, cfg) -> dict[str, torch.Tensor]:
    """The release's math for rows whose images are all valid still images: EVA forward_features (all
    tokens) -> ln_visual -> cformer -> the `<image>` positions of the LLaMA input embeddings ->
    logits, and stu_regress_head of the final-norm hidden states (`Emu.generate_image`)."""
    tokens = batch["tokens"]
    pixels = reference_pixels(batch["images"])
    features = modules["ln_visual"](modules["visual"].forward_features(pixels))
    visual = modules["cformer"](features)  # [b * m, N, D]
    lm = modules["decoder"]["lm"]
    embeds = lm.model.embed_tokens(tokens)
    embeds = embeds.masked_scatter((tokens == cfg.image_token_id)[..., None], visual.reshape(-1, embeds.shape[-1]))
    out = lm(inputs_embeds=embeds, output_hidden_states=True)
    return {"visual": visual, "logits": out.logits, "regressed": lm.stu_regress_head(out.hidden_states[-1])}


def merged_lm_state(modules: torch.nn.ModuleDict) -> dict[str, np.ndarray]:
    """The LLaMA's `model.*` / `lm_head.*` state with every LoRA folded in (W + s B A), computed in torch."""
    lm = modules["decoder"]["lm"]
    state = {}
    for name, module in lm.named_modules():
        if isinstance(module, LoraLinear):
            with torch.no_grad():
                state[name + ".weight"] = (module.weight + module.scale * module.lora_B.weight @ module.lora_A.weight)
    for key, value in lm.state_dict().items():
        if ".lora_" in key or key.startswith("stu_regress_head") or key in state:
            continue
        state[key] = value
    return {k: v.detach().numpy() for k, v in state.items()}

