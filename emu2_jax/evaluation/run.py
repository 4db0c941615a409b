"""One evaluation task on a loaded Emu2: few-shot selection, the model's answers, and their scores.

- QA and captioning: `generate_text` on the task's prompts (`evaluation.prompts`), beam search with the
  release's settings by default (5 beams, length_penalty -1, 10 new tokens), stopping at `</s>`; the
  text is cut to the answer (`clean_answer`; captions: their first line, up to a next example).
- Hateful Memes: no generation; a meme's score is P(yes) against P(no), each continuation's summed
  token log-probabilities after the prompt, from one teacher-forced forward pass over prompt +
  continuation (so " yes" / " no" may be any number of tokens). Its tokens are those of
  prompt + continuation after the longest prefix shared with the prompt alone.
- image_gen: the LLM regresses the image embeddings of the caption, the visual decoder draws them,
  and CLIP-I is the cosine of the encoder's pooled features (`media.pooled_features`) of generated and
  reference image.

Every batch is padded to `batch_size` rows and every row to the same number of image slots (the
shots' and the query's images, or frames), so the jitted programs see one shape per prompt-length
bucket.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from emu2_jax.evaluation import media, metrics, rices
from emu2_jax.evaluation import prompts as eval_prompts
from emu2_jax.evaluation.datasets import TASK_METRIC, VIDEO_TASKS, Example
from emu2_jax.inference import checkpoints, images, prompts, text
from emu2_jax.models.emu2 import Emu2Config, Emu2Model

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Settings:
    task: str
    shots: int = 0
    chat: bool = False
    batch_size: int = 8
    max_new_tokens: int = 10
    num_beams: int = 5
    length_penalty: float = -1.0
    frames: int = 8                  # per clip (video QA)
    steps: int = 50                  # image_gen: Euler steps
    guidance: float = 3.0            # image_gen: classifier-free guidance scale
    seed: int = 0

    @property
    def kind(self) -> str:
        return "video" if self.task in VIDEO_TASKS else "image"


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _padded(rows: list, size: int) -> list:
    """`rows` filled up to `size` with copies of the last (their outputs are dropped)."""
    return rows + [rows[-1]] * (size - len(rows))


# ---------------------------------------------------------------------------------------------
# RICES.

def with_features(llm: checkpoints.LoadedLlm, examples: Sequence[Example], settings: Settings,
                  known: dict[str, np.ndarray] | None = None) -> list[Example]:
    """`examples` with `features` set: the pooled features of their image or clip, each distinct file
    encoded once (`known` holds those already computed, and receives the new ones)."""
    known = {} if known is None else known
    paths = sorted({e.video or e.image for e in examples} - set(known))
    loaders = [functools.partial(media.load_media, settings.kind, p, settings.frames) for p in paths]
    if loaders:
        features = media.pooled_features(llm.model.config, llm.params, loaders, settings.batch_size,
                                         "RICES features")
        known.update(zip(paths, features))
    return [dataclasses.replace(e, features=known[e.video or e.image]) for e in examples]


def select_shots(llm: checkpoints.LoadedLlm, queries: Sequence[Example], support: Sequence[Example],
                 settings: Settings) -> list[list[Example]]:
    """Each query's `settings.shots` RICES examples from `support` (never the query itself)."""
    if settings.shots == 0:
        return [[] for _ in queries]
    known: dict[str, np.ndarray] = {}
    return rices.select_shots(with_features(llm, queries, settings, known),
                              with_features(llm, support, settings, known), settings.shots)


# ---------------------------------------------------------------------------------------------
# Prompts of a batch.

def _row(llm: checkpoints.LoadedLlm, prompt: str, visuals: Sequence[Example], settings: Settings) -> prompts.Row:
    """`prompt`'s row, its placeholders taking the visuals of `visuals` (shots, then the query) in order."""
    loaded = [media.load_media(settings.kind, e.video or e.image, settings.frames) for e in visuals]
    if settings.kind == "video":
        return prompts.build_row(llm.tokenizer, llm.model.config, prompt, videos=loaded)
    return prompts.build_row(llm.tokenizer, llm.model.config, prompt, images=[m[0] for m in loaded])


def _slots(settings: Settings) -> int:
    return (settings.shots + 1) * (settings.frames if settings.kind == "video" else 1)


def _fits(config: Emu2Config, rows: Sequence[prompts.Row], keys: Sequence[str], new_tokens: int) -> None:
    """SystemExit naming the first example whose prompt (rounded to its bucket) leaves no room for the answer."""
    for row, key in zip(rows, keys):
        length = text.bucket_length(len(row.ids))
        if length + new_tokens > config.llm.max_cache_length:
            raise SystemExit(f"example {key}: its prompt takes {len(row.ids)} tokens ({length} with padding) and "
                             f"{new_tokens} more do not fit the model's {config.llm.max_cache_length} positions; "
                             f"use fewer --shots or a smaller --max_new_tokens")


# ---------------------------------------------------------------------------------------------
# Generation (QA, captioning).

def clean_caption(generated: str) -> str:
    """A generated caption as scored: its first line, up to where the model starts another example."""
    line = generated.strip().split("\n", 1)[0]
    return line.split("describing the image in detail", 1)[0].strip()


def generate_answers(llm: checkpoints.LoadedLlm, queries: Sequence[Example], shots: Sequence[Sequence[Example]],
                     settings: Settings) -> list[dict[str, Any]]:
    """One record {key, prompt, prediction, generated, answers} per query."""
    tok, cfg = llm.tokenizer, llm.model.config
    records, progress = [], media.Progress(f"{settings.task} answers", len(queries))
    for chunk in _chunks(list(zip(queries, shots)), settings.batch_size):
        texts = [eval_prompts.build_prompt(settings.task, q, s, chat=settings.chat) for q, s in chunk]
        rows = [_row(llm, t, [*s, q], settings) for t, (q, s) in zip(texts, chunk)]
        _fits(cfg, rows, [q.key for q, _ in chunk], settings.max_new_tokens)
        batch = prompts.batch(_padded(rows, settings.batch_size), cfg, tok.pad_id, slots=_slots(settings))
        generated = text.generate_text(llm.model, llm.params, batch, max_new_tokens=settings.max_new_tokens,
                                       num_beams=settings.num_beams, length_penalty=settings.length_penalty,
                                       stop_ids=(tok.eos_id,))
        for (query, _), prompt, ids in zip(chunk, texts, generated.rows()):
            raw = tok.decode(ids, skip_special_tokens=True)
            answer = clean_caption(raw) if settings.task == "coco_caption" else eval_prompts.clean_answer(raw)
            records.append({"key": query.key, "prompt": prompt, "prediction": answer, "generated": raw,
                            "answers": list(query.answers)})
        progress.update(len(chunk))
    return records


# ---------------------------------------------------------------------------------------------
# Hateful Memes: continuation log-probabilities.

@functools.lru_cache(maxsize=8)
def _continuation_fn(config: Emu2Config):
    """(params, batch, mask [B, L]) -> [B]: the summed log-probabilities of the tokens where mask is set."""
    model = Emu2Model(config)

    def logprobs(params, batch, mask):
        logits = model.apply({"params": params}, batch).text_logits[:, :-1].astype(jnp.float32)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), batch["tokens"][:, 1:, None], axis=-1)
        return jnp.sum(picked[..., 0] * mask[:, 1:], axis=1)

    return jax.jit(logprobs)


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def score_memes(llm: checkpoints.LoadedLlm, queries: Sequence[Example], shots: Sequence[Sequence[Example]],
                settings: Settings) -> list[dict[str, Any]]:
    """One record {key, prompt, prediction ("yes" | "no"), label, score = P(yes)} per meme."""
    tok, cfg = llm.tokenizer, llm.model.config
    fn, yes_no = _continuation_fn(cfg), eval_prompts.yes_no_continuations(settings.chat)
    records, progress = [], media.Progress("hateful_memes scores", len(queries))
    for chunk in _chunks(list(zip(queries, shots)), settings.batch_size):
        texts = [eval_prompts.build_prompt(settings.task, q, s, chat=settings.chat) for q, s in chunk]
        rows, starts = [], []
        for prompt, (query, support) in zip(texts, chunk):
            prompt_ids = _row(llm, prompt, [*support, query], settings).ids
            for continuation in yes_no:
                row = _row(llm, prompt + continuation, [*support, query], settings)
                rows.append(row)
                starts.append(_shared_prefix(prompt_ids, row.ids))
        _fits(cfg, rows, [q.key for q, _ in chunk for _ in yes_no], 0)
        rows, starts = _padded(rows, 2 * settings.batch_size), _padded(starts, 2 * settings.batch_size)
        batch = prompts.batch(rows, cfg, tok.pad_id, slots=_slots(settings))
        batch = text.pad_prompt(batch, text.bucket_length(batch["tokens"].shape[1]))
        width = batch["tokens"].shape[1]
        mask = np.zeros((len(rows), width), np.float32)
        for i, (row, start) in enumerate(zip(rows, starts)):
            mask[i, width - len(row.ids) + start:] = 1.0
        logprobs = np.asarray(jax.device_get(fn(llm.params, batch, mask)), np.float64)
        for j, (prompt, (query, _)) in enumerate(zip(texts, chunk)):
            p_yes = eval_prompts.yes_probability(logprobs[2 * j], logprobs[2 * j + 1])
            records.append({"key": query.key, "prompt": prompt, "prediction": "yes" if p_yes >= 0.5 else "no",
                            "label": query.label, "score": p_yes})
        progress.update(len(chunk))
    return records


# ---------------------------------------------------------------------------------------------
# Image generation and CLIP-I.

def generate_images(llm: checkpoints.LoadedLlm, decoder: checkpoints.LoadedDecoder, queries: Sequence[Example],
                    settings: Settings, image_dir: str | None) -> list[dict[str, Any]]:
    """One record {key, prompt, image (the PNG written under `image_dir`), reference, score = CLIP-I}
    per prompt. The seed of batch i is fold_in(seed, i)."""
    tok, cfg = llm.tokenizer, llm.model.config
    prompt_fn = lambda t, imgs: prompts.batch([prompts.build_row(tok, cfg, t, imgs)], cfg, tok.pad_id)
    try:
        generator = images.ImageGenerator(llm.model, llm.params, decoder.model, decoder.params, prompt_fn)
    except ValueError as e:
        raise SystemExit(f"--decoder_checkpoint={decoder.path}: {e}") from None
    generated, progress = [], media.Progress("image_gen images", len(queries))
    for i, chunk in enumerate(_chunks(list(queries), settings.batch_size)):
        rows = [prompts.build_row(tok, cfg, eval_prompts.build_prompt(settings.task, q)) for q in chunk]
        _fits(cfg, rows, [q.key for q in chunk], cfg.n_query)
        batch = prompts.batch(_padded(rows, settings.batch_size), cfg, tok.pad_id, slots=0)
        pictures, _ = generator.generate(batch, jax.random.fold_in(jax.random.key(settings.seed), i),
                                         num_steps=settings.steps, guidance_scale=settings.guidance)
        generated.extend(pictures[:len(chunk)])
        progress.update(len(chunk))
    loaders = [functools.partial(lambda p: [p], p) for p in generated]
    loaders += [functools.partial(media.load_media, "image", q.image, 1) for q in queries]
    features = media.pooled_features(cfg, llm.params, loaders, settings.batch_size, "CLIP-I features")
    clip_i = metrics.cosine_similarity(features[:len(queries)], features[len(queries):])
    records = []
    for i, (query, picture, score) in enumerate(zip(queries, generated, clip_i)):
        record = {"key": query.key, "prompt": query.text, "reference": query.image, "score": float(score)}
        if image_dir is not None:
            record["image"] = os.path.join(image_dir, f"{i:05d}.png")
            Image.fromarray(picture).save(record["image"])
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Scores.

def score(task: str, records: list[dict[str, Any]]) -> float:
    """The task's metric over `records`; sets each record's "score" (its share of the metric: VQA
    accuracy, exact match, the caption's CIDEr-D; Hateful Memes and CLIP-I records carry theirs)."""
    metric = TASK_METRIC[task]
    if metric == "vqa_accuracy":
        for r in records:
            r["score"] = metrics.vqa_accuracy(r["prediction"], r["answers"])
    elif metric == "exact_match":
        for r in records:
            r["score"] = metrics.exact_match(r["prediction"], r["answers"][0])
    elif metric == "cider_d":
        corpus, per_key = metrics.cider_d({r["key"]: r["prediction"] for r in records},
                                          {r["key"]: r["answers"] for r in records})
        for r in records:
            r["score"] = per_key[r["key"]]
        return corpus
    elif metric == "roc_auc":
        return metrics.roc_auc([r["score"] for r in records], [r["label"] for r in records])
    return float(np.mean([r["score"] for r in records]))


def run(llm: checkpoints.LoadedLlm, queries: Sequence[Example], support: Sequence[Example], settings: Settings,
        decoder: checkpoints.LoadedDecoder | None = None, image_dir: str | None = None
        ) -> tuple[float, list[dict[str, Any]]]:
    """(metric, per-example records) of `settings.task` on `queries`, few-shot from `support`."""
    if settings.task == "image_gen":
        if decoder is None:
            raise ValueError("image_gen needs the visual decoder")
        records = generate_images(llm, decoder, queries, settings, image_dir)
    else:
        shots = select_shots(llm, queries, support, settings)
        runner = score_memes if settings.task == "hateful_memes" else generate_answers
        records = runner(llm, queries, shots, settings)
    return score(settings.task, records), records
