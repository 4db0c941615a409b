import pickle

import pytest

from emu2_jax.data import tokenizer as tk

# Prompts mixing text, expanded image / video placeholders, grounding tokens and the chat template.
N = 4  # visual tokens per image in these prompts
IMG = tk.IMG + tk.IMAGE * N + tk.IMG_END
FRAME = tk.IMG + tk.GIMG * N + tk.IMG_END
PROMPTS = [
    "Hello world",
    "",
    " leading and  double  spaces, trailing ",
    "Unicode: héllo wörld 🙂 — 12345 3.14",
    "lines\n\nwith\ttabs",
    IMG + "Describe the image in details:",
    IMG + "[red, white, 3, bottom left]." + IMG + " and again " + IMG,
    "A clip: " + tk.VIDEO + FRAME * 3 + " shows a rocket.",
    tk.SYSTEM_CHAT + " [USER]: " + IMG + "describe the image in details: [ASSISTANT]:",
    tk.SYSTEM_ACADEMIC + " [USER]: " + IMG + "What is it? [ASSISTANT]:" + tk.GROUNDING,
    tk.SYSTEM_CHAT + " [USER]: hi there [ASSISTANT]: hello, how can I help?</s>[USER]: "
    "tell me about " + IMG + " [ASSISTANT]: It is a cat.</s>",
    tk.GROUNDING + "An astronaut" + tk.PHRASE + " a flag" + tk.PHRASE_END + tk.OBJECT
    + tk.patch_index_token(0) + tk.patch_index_token(17) + tk.patch_index_token(51)
    + tk.patch_index_token(256) + tk.DELIMITER + tk.patch_index_token(3) * 4 + tk.OBJECT_END
    + " stands. " + tk.REC + tk.EOC,
    "literal <s> and </s> and <unk> tokens " + tk.PAD + tk.GIMG_END,
    "[IMG ] <image > [ USER] look like special tokens but are not",
]


def _reference(path):
    """transformers' slow, sentencepiece-backed LLaMA tokenizer with Emu2's tokens, as Emu2 used
    it (transformers 4.31, legacy=True): in transformers 5 that is `SentencePieceBackend`
    (`LlamaTokenizer` became the tokenizers-backed class). Emu2 registered every special token as
    a plain string, which 4.31 stripped whitespace around; AddedToken(lstrip, rstrip) reproduces
    that in 5.x. <unk> kept tokenizer_config.json's no-strip AddedToken."""
    from transformers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    def special(s):
        return AddedToken(s, lstrip=True, rstrip=True, normalized=False, special=True)

    ref = SentencePieceBackend(vocab_file=str(path), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", legacy=True, special_tokens_pattern="bos")
    ref.add_tokens([special("<s>"), special("</s>")], special_tokens=True)
    ref.add_special_tokens({"pad_token": special(tk.PAD),
                            "additional_special_tokens": [special(t) for t in
                                                          tk.EMU2_ADDED_TOKENS[1:] + tk.CHAT_TOKENS]})
    return ref


def _check_ids(tokenizer, base):
    for i, token in enumerate(tk.EMU2_ADDED_TOKENS):
        assert tokenizer.token_to_id(token) == base + i, token
    assert tokenizer.token_to_id(tk.PAD) == base
    assert tokenizer.token_to_id(tk.IMG) == base + 1
    assert tokenizer.token_to_id(tk.IMAGE) == base + 3
    assert tokenizer.token_to_id(tk.GIMG) == base + 4
    assert tokenizer.token_to_id(tk.VIDEO) == base + 7
    assert tokenizer.token_to_id(tk.GROUNDING) == base + 8
    assert tokenizer.token_to_id(tk.DELIMITER) == base + 13
    assert tokenizer.token_to_id(tk.REC) == base + 14
    assert tokenizer.patch_index_id(0) == base + 15
    assert tokenizer.patch_index_id(256) == base + 271
    assert tokenizer.token_to_id(tk.USER) == base + 272
    assert tokenizer.token_to_id(tk.ASSISTANT) == base + 273
    assert tokenizer.vocab_size == base + 274
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (1, 2, 0)
    assert tokenizer.pad_id == base


def test_embedded_tokenizer_ids(tok):
    assert tok.base_vocab_size == tk.EMBEDDED_PIECES == 1024
    _check_ids(tok, 1024)
    assert tok.vocab_size == 1298
    for i in range(tok.vocab_size):  # every id maps to a token and back
        assert tok.token_to_id(tok.id_to_token(i)) == i


def test_llama_tokenizer_ids(llama_tok_path):
    _check_ids(tk.load_tokenizer(llama_tok_path), 32000)
    base = tk.load_tokenizer(llama_tok_path.parent, with_chat_tokens=False)
    assert base.vocab_size == 32272
    assert base.encode("[USER]", add_bos=False) != [32272]
    with pytest.raises(KeyError):
        base.token_to_id(tk.USER)


@pytest.mark.parametrize("which", ["llama", "embedded"])
def test_encode_parity_with_transformers_slow_llama_tokenizer(which, request):
    path = request.getfixturevalue("llama_tok_path") if which == "llama" else tk.EMBEDDED_MODEL
    ref = _reference(path)
    ours = tk.load_tokenizer(path)
    assert len(ref) == ours.vocab_size
    for token in tk.EMU2_ADDED_TOKENS + tk.CHAT_TOKENS:
        assert ref.convert_tokens_to_ids(token) == ours.token_to_id(token), token
    for prompt in PROMPTS:
        assert ours.encode(prompt) == ref.encode(prompt), prompt
        assert ours.encode(prompt, add_bos=False) == ref.encode(prompt, add_special_tokens=False)


def test_special_strings_in_data_text_are_not_parsed(tok):
    ids, spans = tok.encode_plain("a <image> [IMG] </s>")
    assert not set(ids) & {tok.token_to_id(tk.IMAGE), tok.token_to_id(tk.IMG), tok.eos_id}
    assert spans[-1][1] == len(b"a <image> [IMG] </s>")
    assert tok.encode("a <image>", add_bos=False)[-1] == tok.token_to_id(tk.IMAGE)


def test_decode(tok):
    text = "A cat sat on the mat, 42 times. Ünïcode 🙂"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    ids = tok.encode(tk.IMG + tk.IMAGE * 2 + tk.IMG_END + "A cat</s>")
    assert tok.decode(ids) == "<s>[IMG]<image><image>[/IMG]A cat</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "A cat"


def test_caption_prompt(tok):
    ids = tk.caption_prompt(tok, 3)
    assert ids == [1, 1025, 1027, 1027, 1027, 1026]
    assert ids == tok.encode(tk.IMG + tk.IMAGE * 3 + tk.IMG_END)


def test_pickle_and_errors(tok, tmp_path):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled [IMG] text") == tok.encode("pickled [IMG] text")
    assert clone.vocab_size == tok.vocab_size
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        tk.load_tokenizer(tmp_path / "nothing.model")
    with pytest.raises(KeyError):
        tok.token_to_id("<not_a_piece_or_token>")
    with pytest.raises(ValueError):
        tok.patch_index_id(257)


def test_shipped_model_is_trained_from_shipped_text(tmp_path):
    """The embedded model is reproducible from the shipped corpus with the recorded settings."""
    tk.train_tiny_sentencepiece(tmp_path / "retrained.model")
    retrained = tk.load_tokenizer(tmp_path / "retrained.model")
    shipped = tk.load_tokenizer(None)
    assert [retrained.id_to_token(i) for i in range(1024)] == [
        shipped.id_to_token(i) for i in range(1024)]
    assert tk.EMBEDDED_MODEL.stat().st_size < 64 * 1024
