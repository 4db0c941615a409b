"""Image-embedding regression over the KV cache equals the release's recompute-everything loop;
end-to-end image generation writes a PNG."""
import jax.numpy as jnp
import numpy as np

from emu2_jax.inference import images, prompts


def recompute_everything(model, params, prompt_row, layout):
    """The release's `generate_image` loop, generalised: `layout` lists what follows the prompt, a
    token id or None for a regressed embedding. For each None, run the LLM without a cache over the
    prompt and everything laid out so far, regressed embeddings going in through project_up, and
    take project_down of the last position."""
    cfg = model.config
    ids, slots, preds = list(prompt_row["tokens"][0].tolist()), [], []

    def forward(ids, slots, preds):
        def run(m, tokens, preds):
            embeds, _ = m.embed_inputs(tokens, jnp.asarray(prompt_row["images"]),
                                       jnp.asarray(prompt_row["image_valid"]),
                                       jnp.asarray(prompt_row["image_is_frame"]))
            if slots:
                embeds = embeds.at[:, jnp.asarray(slots)].set(m.project_visual(preds))
            hidden = m.llm(embeds, jnp.arange(tokens.shape[1])[None])
            return m.project_down(hidden[:, -1])
        stacked = np.asarray(preds, np.float32).reshape(1, len(preds), cfg.visual_embed_dim)
        return model.apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(stacked), method=run)

    for item in layout:
        if item is None:
            preds.append(np.asarray(forward(ids, slots, preds))[0])
            slots.append(len(ids))
            item = cfg.frame_token_id  # any id: its embedding is replaced
        ids.append(item)
    return np.stack(preds)


def test_cached_regression_equals_recompute(tiny_emu2, photos):
    model, params, tokenizer = tiny_emu2
    cfg = model.config
    rows = [prompts.build_row(tokenizer, cfg, "[<IMG_PLH>]a photo like this one:", photos[:1]),
            prompts.build_row(tokenizer, cfg, "a red square")]
    batch = prompts.batch(rows, cfg, tokenizer.pad_id)
    out = images.generate_image_embeddings(model, params, batch)
    assert out.shape == (2, cfg.n_query, cfg.visual_embed_dim)
    for i, row in enumerate(rows):
        single = prompts.batch([row], cfg, tokenizer.pad_id, slots=1)
        reference = recompute_everything(model, params, single, [cfg.boi_token_id] + [None] * cfg.n_query)
        np.testing.assert_allclose(out[i], reference, atol=1e-4)
    assert np.abs(out[0] - out[1]).max() > 1e-3  # the prompt matters


def test_cached_clip_regression_equals_recompute(tiny_emu2, photos):
    model, params, tokenizer = tiny_emu2
    cfg = model.config
    rows = [prompts.build_row(tokenizer, cfg, "a short clip of"),
            prompts.build_row(tokenizer, cfg, "[<IMG_PLH>]the same scene moving:", photos[1:2])]
    batch = prompts.batch(rows, cfg, tokenizer.pad_id)
    num_frames = 2
    out = images.generate_video_embeddings(model, params, batch, num_frames)
    assert out.shape == (2, num_frames, cfg.v_query, cfg.visual_embed_dim)
    frame = [cfg.boi_token_id] + [None] * cfg.v_query + [cfg.eoi_token_id]
    for i, row in enumerate(rows):
        single = prompts.batch([row], cfg, tokenizer.pad_id, slots=1)
        reference = recompute_everything(model, params, single, [cfg.video_token_id] + frame * num_frames)
        np.testing.assert_allclose(out[i].reshape(-1, cfg.visual_embed_dim), reference, atol=1e-4)
    assert np.abs(out[:, 0] - out[:, 1]).max() > 1e-3  # the second frame sees the first
    assert [tokenizer.id_to_token(t) for t in (cfg.eoi_token_id, cfg.video_token_id)] == ["[/IMG]", "[VIDEO]"]


def test_append_boi_continues_positions(tiny_emu2):
    model, _, tokenizer = tiny_emu2
    batch = prompts.batch([prompts.build_row(tokenizer, model.config, "a b c"),
                           prompts.build_row(tokenizer, model.config, "a")], model.config, tokenizer.pad_id)
    out = images.append_boi(model.config, batch)
    assert out["tokens"][:, -1].tolist() == [model.config.boi_token_id] * 2
    assert out["positions"][:, -1].tolist() == [batch["positions"][0, -1] + 1, batch["positions"][1, -1] + 1]
    assert out["segment_ids"][:, -1].tolist() == [1, 1]
    assert tokenizer.id_to_token(model.config.boi_token_id) == "[IMG]"
