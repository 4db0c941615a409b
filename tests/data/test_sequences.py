"""Exact token layouts and masks of every Emu2 data type on fixed examples, assembly and
truncation, row packing and the batch checks."""
import numpy as np
import pytest

from emu2_jax.data import assembly as asm
from emu2_jax.data import images as im
from emu2_jax.data import layout, packing
from emu2_jax.data import sequences as sq
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.skips import SkipExample

from .conftest import iter_rows

NQ, VQ = 3, 2


def pix(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


@pytest.fixture
def ctx(tok):
    return asm.Context(tok, n_query=NQ, v_query=VQ, max_len=128, max_images=8)


@pytest.fixture
def ids(tok):
    class Ids:
        IMG, END = tok.token_to_id(tk.IMG), tok.token_to_id(tk.IMG_END)
        IM, G = tok.token_to_id(tk.IMAGE), tok.token_to_id(tk.GIMG)
        VIDEO = tok.token_to_id(tk.VIDEO)
        image = [IMG] + [IM] * NQ + [END]
        frame = [IMG] + [G] * VQ + [END]

        @staticmethod
        def plain(text):
            return tok.encode_plain(text)[0]
    return Ids


def img_str(n=NQ):
    return tk.IMG + tk.IMAGE * n + tk.IMG_END


def mask_at(length, positions):
    out = np.zeros(length, np.float32)
    out[list(positions)] = 1
    return out


def test_stage1_image_text(ctx, tok, ids, rng):
    ex = sq.build_image_text(ctx, "  A red cup on a saucer. ", pix(7), rng, image_first_prob=1.0,
                             regress_image=False)
    cap = ids.plain("A red cup on a saucer.")
    c = len(cap)
    assert ex.tokens.tolist() == [1, *ids.image, *cap, 2]
    assert ex.tokens.tolist()[:NQ + 3] == tk.caption_prompt(tok, NQ)
    assert ex.tokens.tolist() == tok.encode(img_str() + "A red cup on a saucer.</s>")
    # loss on the caption and </s>: from the [/IMG] position to the last caption token
    np.testing.assert_array_equal(ex.text_loss_mask, mask_at(len(ex), range(NQ + 2, NQ + 3 + c)))
    assert not ex.image_loss_mask.any()
    assert ex.image_positions(tok) == [2] and ex.is_frame == [False]
    assert (ex.images[0] == 7).all()
    np.testing.assert_array_equal(ex.segment_ids, np.ones(len(ex)))
    np.testing.assert_array_equal(ex.positions, np.arange(len(ex)))


def test_stage2_image_text_orders_and_probability(ctx, tok, ids):
    layouts = []
    for seed in range(200):
        ex = sq.build_image_text(ctx, "A cat.", pix(1), np.random.default_rng(seed),
                                 image_first_prob=0.5, regress_image=True)
        layouts.append(ex.tokens[1] == ids.IMG)
        if not layouts[-1]:
            after = ex
    assert 0.4 < np.mean(layouts) < 0.6
    cap = ids.plain("A cat.")
    c = len(cap)
    assert after.tokens.tolist() == [1, *cap, *ids.image, 2]
    assert after.tokens.tolist() == tok.encode("A cat." + img_str() + "</s>")
    # caption tokens predicted from <s>..; </s> predicted at [/IMG]
    np.testing.assert_array_equal(after.text_loss_mask,
                                  mask_at(len(after), [*range(c), c + NQ + 2]))
    # [IMG] and all but the last placeholder predict the next placeholder
    np.testing.assert_array_equal(after.image_loss_mask,
                                  mask_at(len(after), range(c + 1, c + 1 + NQ)))


def test_video_text(ctx, tok, ids, rng):
    frames = [pix(i) for i in range(3)]
    ex = sq.build_video_text(ctx, "A rocket.", frames, rng, video_first_prob=1.0,
                             regress_frames=False)
    cap = ids.plain("A rocket.")
    assert ex.tokens.tolist() == [1, ids.VIDEO, *ids.frame * 3, *cap, 2]
    assert ex.tokens.tolist() == tok.encode(
        tk.VIDEO + (tk.IMG + tk.GIMG * VQ + tk.IMG_END) * 3 + "A rocket.</s>")
    assert ex.is_frame == [True] * 3 and [int(f[0, 0, 0]) for f in ex.images] == [0, 1, 2]
    assert not ex.image_loss_mask.any()
    start = 2 + 3 * (VQ + 2) - 1  # the last [/IMG] predicts the first caption token
    np.testing.assert_array_equal(ex.text_loss_mask,
                                  mask_at(len(ex), range(start, start + len(cap) + 1)))
    small = asm.Context(tok, n_query=NQ, v_query=VQ, max_len=128, max_images=2)
    ex = sq.build_video_text(small, "A rocket.", frames, rng, video_first_prob=0.0,
                             regress_frames=True)
    assert ex.tokens.tolist() == [1, *cap, ids.VIDEO, *ids.frame * 2, 2]
    assert ex.image_loss_mask.sum() == 2 * VQ


def test_interleaved_layouts(ctx, tok, ids):
    sentences = ["Intro text.", "Second one here.", "Third.", "Fourth sentence."]
    images, matched = [pix(10), pix(20)], [1, 3]
    first = sq.build_interleaved(ctx, sentences, images, matched, np.random.default_rng(0),
                                 max_images=8, max_len=1024, image_first_prob=1.0,
                                 regress_images=True)
    # starts at the first image's sentence; sentences joined by spaces; </s> at the end
    assert first.tokens.tolist() == tok.encode(
        img_str() + "Second one here. Third." + img_str() + "Fourth sentence.</s>")
    assert [int(x[0, 0, 0]) for x in first.images] == [10, 20]
    assert first.image_loss_mask.sum() == 2 * NQ
    assert first.text_loss_mask.sum() == len(first) - 2 * (NQ + 2) - 1  # all text + </s>
    last = sq.build_interleaved(ctx, sentences, images, matched, np.random.default_rng(0),
                                max_images=8, max_len=1024, image_first_prob=0.0,
                                regress_images=False)
    assert last.tokens.tolist() == tok.encode(
        "Second one here." + img_str() + "Third. Fourth sentence." + img_str() + "</s>")
    assert not last.image_loss_mask.any()
    starts = set()
    for seed in range(20):  # a window of one image starts at either image's sentence
        ex = sq.build_interleaved(ctx, sentences, images, matched, np.random.default_rng(seed),
                                  max_images=1, max_len=1024, image_first_prob=1.0,
                                  regress_images=False)
        assert len(ex.images) == 1
        starts.add(int(ex.images[0][0, 0, 0]))
        if ex.images[0][0, 0, 0] == 20:
            assert ex.tokens.tolist() == tok.encode(img_str() + "Fourth sentence.</s>")
    assert starts == {10, 20}
    cut = sq.build_interleaved(ctx, sentences, images, matched, np.random.default_rng(0),
                               max_images=8, max_len=14, image_first_prob=1.0,
                               regress_images=False)
    assert len(cut) <= 14 and cut.tokens[-1] != 2 and len(cut.images) == 1  # no room for image 2
    assert cut.tokens.tolist() == first.tokens.tolist()[:len(cut)]


def test_interleaved_bad_documents(ctx, rng):
    with pytest.raises(SkipExample, match="no_images"):
        sq.build_interleaved(ctx, ["a"], [], [], rng, max_images=8, max_len=64,
                             image_first_prob=0.5, regress_images=False)
    with pytest.raises(SkipExample, match="bad_annotation"):
        sq.build_interleaved(ctx, ["a"], [pix(1)], [3], rng, max_images=8, max_len=64,
                             image_first_prob=0.5, regress_images=False)
    with pytest.raises(SkipExample, match="empty_text"):
        sq.build_interleaved(ctx, [" ", ""], [pix(1)], [0], rng, max_images=8, max_len=64,
                             image_first_prob=0.5, regress_images=False)


CAPTION = "A cat and a dog."
SPANS = [[0, 5], [10, 15], [10, 15]]
BOXES = [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0.1, 0.2, 0.3, 0.4]]


def test_grounded_layout(ctx, tok):
    assert sq.box_tokens([0.1, 0.2, 0.3, 0.4]) == [tk.patch_index_token(i) for i in (26, 51, 77, 102)]
    cat = tk.OBJECT + "".join(sq.box_tokens(BOXES[0])) + tk.OBJECT_END
    dog = (tk.OBJECT + "".join(sq.box_tokens(BOXES[1])) + tk.DELIMITER
           + "".join(sq.box_tokens(BOXES[2])) + tk.OBJECT_END)
    first = sq.build_grounded(ctx, CAPTION, SPANS, BOXES, pix(3), np.random.default_rng(0),
                              phrase_first_prob=1.0, regress_image=False)
    assert first.tokens.tolist() == tok.encode(
        img_str() + tk.GROUNDING + "<phrase>A cat</phrase>" + cat + " and <phrase>a dog</phrase>"
        + dog + ".</s>")
    after = sq.build_grounded(ctx, CAPTION, SPANS, BOXES, pix(3), np.random.default_rng(0),
                              phrase_first_prob=0.0, regress_image=False)
    assert after.tokens.tolist() == tok.encode(
        img_str() + tk.GROUNDING + cat + "<phrase>A cat</phrase> and " + dog
        + "<phrase>a dog</phrase>.</s>")
    g = after.tokens.tolist().index(tok.token_to_id(tk.GROUNDING))
    # everything after <grounding> is supervised, <grounding> itself is not
    np.testing.assert_array_equal(after.text_loss_mask, mask_at(len(after), range(g, len(after) - 1)))
    firsts = [sq.build_grounded(ctx, "A cat.", [[0, 5]], [[0, 0, 1, 1]], pix(3),
                                np.random.default_rng(s), phrase_first_prob=0.7,
                                regress_image=False).tokens[NQ + 4] == tok.token_to_id(tk.PHRASE)
              for s in range(300)]
    assert 0.62 < np.mean(firsts) < 0.78


@pytest.mark.parametrize("boxes,reason", [
    ([[0, 0, 1.2, 1]], "box_outside_image"), ([[-0.1, 0, 0.5, 0.5]], "box_outside_image"),
    ([[0.6, 0, 0.5, 0.5]], "box_outside_image"), ([[0, 0, np.nan, 1]], "box_outside_image"),
])
def test_grounded_bad_boxes(ctx, rng, boxes, reason):
    with pytest.raises(SkipExample) as e:
        sq.build_grounded(ctx, "A cat.", [[0, 5]], boxes, pix(1), rng, phrase_first_prob=0.7,
                          regress_image=False)
    assert e.value.reason == reason


@pytest.mark.parametrize("spans", [[[0, 50]], [[3, 3]], [[0, 5], [1, 2]]])
def test_grounded_bad_spans(ctx, rng, spans):
    with pytest.raises(SkipExample, match="bad_annotation"):
        sq.build_grounded(ctx, "A cat.", spans, [[0, 0, 1, 1]], pix(1), rng,
                          phrase_first_prob=0.7, regress_image=False)


def test_text_only(ctx, tok, ids):
    ex = sq.build_text(ctx, "Some prose.\n\nMore prose.")
    assert ex.tokens.tolist() == [1, *ids.plain("Some prose.\n\nMore prose."), 2]
    assert ex.splittable and ex.text_loss_mask[:-1].all() and not ex.text_loss_mask[-1]
    with pytest.raises(SkipExample, match="empty_text"):
        sq.build_text(ctx, " \n ")


def test_chat_template_and_answer_only_loss(ctx, tok, ids):
    turns = [("[<IMG_PLH>]What is it?", "A cat."), ("Sure?", "Yes, quite sure.")]
    ex = sq.build_chat(ctx, turns, system="chat", images=[pix(5)])
    assert ex.tokens.tolist() == tok.encode(
        tk.SYSTEM_CHAT + " [USER]: " + img_str() + "What is it? [ASSISTANT]: A cat.</s>"
        "[USER]: Sure? [ASSISTANT]: Yes, quite sure.</s>")
    targets = np.append(ex.tokens[1:], 0)[ex.text_loss_mask > 0].tolist()
    assert targets == ids.plain("A cat.") + [2] + ids.plain("Yes, quite sure.") + [2]
    assert not ex.image_loss_mask.any()
    grounding = sq.build_chat(ctx, [("[<IMG_PLH>]Where is the cat?", "[0, 0, 224, 224]")],
                              system="academic", images=[pix(5)], grounding=True)
    assert grounding.tokens.tolist() == tok.encode(
        tk.SYSTEM_ACADEMIC + " [USER]: " + img_str() + "Where is the cat? [ASSISTANT]:"
        + tk.GROUNDING + " [0, 0, 224, 224]</s>")
    video = sq.build_chat(ctx, [("[<VID_PLH>]What happens?", "It pans.")], system="",
                          videos=[[pix(1), pix(2)]])
    assert video.tokens.tolist() == tok.encode(
        " [USER]: " + tk.VIDEO + (tk.IMG + tk.GIMG * VQ + tk.IMG_END) * 2
        + "What happens? [ASSISTANT]: It pans.</s>")
    assert video.is_frame == [True, True]


def test_chat_bad_input_and_truncation(ctx, tok):
    with pytest.raises(SkipExample, match="bad_annotation"):
        sq.build_chat(ctx, [("[<IMG_PLH>][<IMG_PLH>]Two?", "One.")], system="chat",
                      images=[pix(1)])
    with pytest.raises(SkipExample, match="bad_annotation"):
        sq.build_chat(ctx, [("No image here.", "Ok.")], system="chat", images=[pix(1)])
    with pytest.raises(SkipExample, match="empty_text"):
        sq.build_chat(ctx, [("Hi", "  ")], system="chat")
    short = asm.Context(tok, n_query=NQ, v_query=VQ, max_len=40, max_images=8)
    long_answer = "word " * 60
    ex = sq.build_chat(short, [("[<IMG_PLH>]Talk.", long_answer)], system="", images=[pix(1)])
    assert len(ex) == 40 and ex.text_loss_mask.sum() > 0
    with pytest.raises(SkipExample, match="too_long"):  # nothing of the answer fits
        sq.build_chat(short, [("Tell me " * 20, "Fine.")], system="chat")


def test_gen_t2i_and_edit(ctx, tok, ids):
    t2i = sq.build_gen_t2i(ctx, "A red cup.", pix(9))
    cap = ids.plain("A red cup.")
    assert t2i.tokens.tolist() == [1, *cap, *ids.image, 2]
    assert not t2i.text_loss_mask.any()
    np.testing.assert_array_equal(t2i.image_loss_mask,
                                  mask_at(len(t2i), range(len(cap) + 1, len(cap) + 1 + NQ)))
    edit = sq.build_gen_edit(ctx, "Make it blue.", pix(1), pix(2))
    assert edit.tokens.tolist() == tok.encode(img_str() + "Make it blue." + img_str() + "</s>")
    second = len(edit) - NQ - 3  # index of the second [IMG]
    np.testing.assert_array_equal(edit.image_loss_mask,
                                  mask_at(len(edit), range(second, second + NQ)))
    assert not edit.text_loss_mask.any()
    assert [int(x[0, 0, 0]) for x in edit.images] == [1, 2]


def test_gen_grounded(ctx, tok):
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 200  # right half bright: the dog's box crop is bright
    spans, boxes = [[0, 5], [10, 15]], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    ex = sq.build_gen_grounded(ctx, CAPTION, spans, boxes, image, np.random.default_rng(0),
                               drop_entity_prob=0.0, image_size=16)
    entity = "<phrase>{}</phrase>" + tk.OBJECT + img_str() + tk.OBJECT_END + img_str()
    assert ex.tokens.tolist() == tok.encode(
        tk.GROUNDING + entity.format("A cat") + " and " + entity.format("a dog") + "."
        + img_str() + "</s>")
    box_image, cat, _, dog, whole = ex.images
    np.testing.assert_array_equal(box_image, im.draw_box_image(boxes[0], 16))
    assert cat.max() == 0 and dog.min() == 200 and whole.shape == (16, 16, 3)
    last = len(ex) - NQ - 3
    np.testing.assert_array_equal(ex.image_loss_mask, mask_at(len(ex), range(last, last + NQ)))
    assert not ex.text_loss_mask.any()
    dropped = sq.build_gen_grounded(ctx, CAPTION, spans, boxes, image, np.random.default_rng(0),
                                    drop_entity_prob=1.0, image_size=16)
    assert dropped.tokens.tolist() == tok.encode(tk.GROUNDING + CAPTION + img_str() + "</s>")
    three = asm.Context(tok, n_query=NQ, v_query=VQ, max_len=128, max_images=3)
    ex = sq.build_gen_grounded(three, CAPTION, spans, boxes, image, np.random.default_rng(0),
                               drop_entity_prob=0.0, image_size=16)
    assert len(ex.images) == 3  # one entity fits next to the target image; the dog stays text
    assert ex.tokens.tolist() == tok.encode(
        tk.GROUNDING + entity.format("A cat") + " and a dog." + img_str() + "</s>")


def test_builders_are_deterministic_given_the_seed(ctx):
    sentences = [f"Sentence number {i}." for i in range(12)]
    images = [pix(i) for i in range(6)]
    matched = [0, 2, 2, 5, 7, 11]

    def build(seed):
        return sq.build_interleaved(ctx, sentences, images, matched, np.random.default_rng(seed),
                                    max_images=3, max_len=100, image_first_prob=0.5,
                                    regress_images=True)
    a, b = build(3), build(3)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert [int(x[0, 0, 0]) for x in a.images] == [int(x[0, 0, 0]) for x in b.images]
    assert len({tuple(build(s).tokens.tolist()) for s in range(10)}) > 3


def test_truncate_never_cuts_an_image(ctx, tok, ids):
    ex = asm.assemble([asm.Text("Some words here.", True), asm.Visual(pix(1)), asm.Text("More words.", True),
                       asm.Visual(pix(2)), asm.Special(tk.EOS, True)], ctx)
    second_img = [i for i, t in enumerate(ex.tokens) if t == ids.IMG][1]
    for limit in range(second_img + 1, second_img + NQ + 2):  # every cut inside image 2
        cut = asm.truncate(ex, ctx, max_len=limit)
        assert len(cut) == second_img and len(cut.images) == 1
    one = asm.truncate(ex, asm.Context(tok, NQ, VQ, max_len=128, max_images=1))
    assert len(one) == second_img and len(one.images) == 1
    video = asm.assemble([asm.Text("Hi.", True), asm.Special(tk.VIDEO), asm.Visual(pix(1), frame=True)], ctx)
    assert asm.truncate(video, ctx, max_len=len(video) - 1).tokens.tolist() == [1, *ids.plain("Hi.")]
    with pytest.raises(SkipExample, match="too_long"):
        asm.truncate(asm.assemble([asm.Visual(pix(1)), asm.Text("caption", True)], ctx), ctx, max_len=NQ + 2)


def test_row_packing(ctx, tok, ids):
    pair = sq.build_image_text(ctx, "A cat.", pix(10), np.random.default_rng(0),
                               image_first_prob=1.0, regress_image=True)
    video = sq.build_video_text(ctx, "A clip.", [pix(20), pix(30)], np.random.default_rng(0),
                                video_first_prob=1.0, regress_frames=False)
    doc = sq.build_text(ctx, "word " * 30)
    seq_len = len(pair) + len(video) - 1
    rows = list(iter_rows([pair, video, doc], seq_len, max_images=3, image_size=4,
                             pad_id=tok.pad_id))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    packing.check_batch(batch, tok, NQ, VQ)
    first = rows[0]
    # the pair and the video do not fit together (by one token), so the pair is alone
    assert first["segment_ids"].tolist() == [1] * len(pair) + [0] * (seq_len - len(pair))
    np.testing.assert_array_equal(first["tokens"][:len(pair)], pair.tokens)
    np.testing.assert_array_equal(first["text_loss_mask"][:len(pair)], pair.text_loss_mask)
    np.testing.assert_array_equal(first["image_loss_mask"][:len(pair)], pair.image_loss_mask)
    assert (first["tokens"][len(pair):] == tok.pad_id).all()
    assert first["image_valid"].tolist() == [True, False, False]
    np.testing.assert_array_equal(first["images"][0], im.to_pixel_rows(pix(10)))
    assert (first["images"][1:] == 0).all()
    second = rows[1]
    n = len(video)
    assert second["image_is_frame"].tolist() == [True, True, False]
    assert second["positions"][:n].tolist() == list(range(n))
    # the text document fills the rest of the row and continues in the next ones
    assert second["segment_ids"][n:].tolist() == [2] * (seq_len - n)
    assert second["positions"][n:].tolist() == list(range(seq_len - n))
    assert second["text_loss_mask"][seq_len - 1] == 0  # next token lives in the next row
    continued = np.concatenate([second["tokens"][n:]] + [r["tokens"][r["segment_ids"] > 0]
                                                         for r in rows[2:]])
    np.testing.assert_array_equal(continued, doc.tokens)
    assert rows[2]["positions"][0] == 0 and rows[2]["tokens"][0] == doc.tokens[seq_len - n]
    assert sum(r["text_loss_mask"].sum() for r in rows) == (
        pair.text_loss_mask.sum() + video.text_loss_mask.sum() + doc.text_loss_mask.sum()
        - (len(rows) - 2))  # one lost target per row boundary inside the document
    # image slots limit a row as well as tokens
    rows = list(iter_rows([pair, pair, pair], 200, max_images=2, image_size=4,
                             pad_id=tok.pad_id))
    assert [r["image_valid"].sum() for r in rows] == [2, 1]


def test_layout_derives_pixel_row_from_image_size():
    shapes = layout.shapes(layout.PROMPT, rows=2, seq_len=8, slots=3, image_size=4)
    assert shapes["images"] == (2, 3, 4, 12) and layout.abstract(layout.LLM, rows=2, seq_len=8, slots=3,
                                                                 image_size=4)["images"].dtype == np.uint8
    assert layout.shapes(layout.PROMPT, rows=2, seq_len=8, slots=3, image_size=4, pixel_row=12) == shapes
    with pytest.raises(ValueError, match="pixel_row=4 is not 3 \\* image_size=4"):
        layout.shapes(layout.PROMPT, rows=2, seq_len=8, slots=3, image_size=4, pixel_row=4)


def test_check_batch_detects_broken_rows(ctx, tok):
    pair = sq.build_image_text(ctx, "A cat.", pix(10), np.random.default_rng(0),
                               image_first_prob=1.0, regress_image=True)
    row = next(iter_rows([pair], 32, max_images=2, image_size=4, pad_id=tok.pad_id))
    batch = {k: v[None] for k, v in row.items()}
    packing.check_batch(batch, tok, NQ, VQ)
    broken = {k: v.copy() for k, v in batch.items()}
    broken["tokens"][0, 3] = tok.pad_id  # a hole in the placeholder run
    with pytest.raises(AssertionError):
        packing.check_batch(broken, tok, NQ, VQ)
    broken = {k: v.copy() for k, v in batch.items()}
    broken["text_loss_mask"][0, 1] = 1  # text loss on a placeholder
    with pytest.raises(AssertionError):
        packing.check_batch(broken, tok, NQ, VQ)
    broken = {k: v.copy() for k, v in batch.items()}
    broken["positions"][0, :len(pair)] += 1
    with pytest.raises(AssertionError, match="positions"):
        packing.check_batch(broken, tok, NQ, VQ)
    # shapes and dtypes come first (layout.LLM)
    with pytest.raises(ValueError, match="tokens"):
        packing.check_batch({**batch, "tokens": batch["tokens"].astype(np.int64)}, tok, NQ, VQ)
    with pytest.raises(ValueError, match="image_is_frame"):
        packing.check_batch({k: v for k, v in batch.items() if k != "image_is_frame"}, tok, NQ, VQ)
    # images: uint8 pixel rows [rows, slots, S, 3S], zeros in unused slots
    with pytest.raises(ValueError, match=r"batch\['images'\] is float32\[1, 2, 4, 12\]; expected uint8"):
        packing.check_batch({**batch, "images": batch["images"].astype(np.float32)}, tok, NQ, VQ)
    with pytest.raises(ValueError, match=r"is uint8\[1, 2, 4, 9\]; expected uint8\[1, 2, 4, 12\] .*pixel_row=12"):
        packing.check_batch({**batch, "images": batch["images"][..., :9]}, tok, NQ, VQ)
    with pytest.raises(ValueError, match="has shape"):
        packing.check_batch({**batch, "images": batch["images"].reshape(1, 2, 4, 4, 3)}, tok, NQ, VQ)
    broken = {k: v.copy() for k, v in batch.items()}
    broken["images"][0, 1, 2, 5] = 1
    with pytest.raises(AssertionError, match="unused image slot"):
        packing.check_batch(broken, tok, NQ, VQ)
