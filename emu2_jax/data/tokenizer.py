"""LLaMA sentencepiece tokenizer with Emu2's added tokens (docs/model.md#special-tokens-and-prompts).

Ids: the sentencepiece pieces (32000 for LLaMA, 1024 for the embedded tiny model) followed by the
added tokens in the checkpoint's order: [PAD], [IMG], [/IMG], <image>, [gIMG], [/gIMG], [EOC],
[VIDEO], <grounding>, <phrase>, </phrase>, <object>, </object>, </delimiter_of_multi_objects/>,
<REC>, <patch_index_0000>..<patch_index_0256>, then [USER], [ASSISTANT] (chat only).

`Tokenizer.encode` reproduces what Emu2's `transformers.LlamaTokenizer` (4.31, slow, legacy=True)
did with these tokens registered via `add_special_tokens` as plain strings: the text is split on
every special token (added tokens and <s>, </s>, <unk>), whitespace next to a special token is
stripped (4.31 stripped both sides of special tokens given as str; <unk> kept the
no-strip AddedToken of tokenizer_config.json), and each remaining chunk is encoded on its own by
sentencepiece, so every chunk gets the dummy-prefix '▁'.
"""
from __future__ import annotations

import io
import json
import pathlib
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD = "[PAD]"
IMG = "[IMG]"
IMG_END = "[/IMG]"
IMAGE = "<image>"
GIMG = "[gIMG]"
GIMG_END = "[/gIMG]"
EOC = "[EOC]"
VIDEO = "[VIDEO]"
GROUNDING = "<grounding>"
PHRASE = "<phrase>"
PHRASE_END = "</phrase>"
OBJECT = "<object>"
OBJECT_END = "</object>"
DELIMITER = "</delimiter_of_multi_objects/>"
REC = "<REC>"
USER = "[USER]"
ASSISTANT = "[ASSISTANT]"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"

NUM_PATCH_INDEX = 257  # quantized_size 256 -> coordinates 0..256

# User-facing placeholders of Emu2's prompts: plain text, replaced before tokenization.
IMG_PLACEHOLDER = "[<IMG_PLH>]"
VID_PLACEHOLDER = "[<VID_PLH>]"

# The two system messages of Emu2-Chat (paper appendix; native chat.py).
SYSTEM_CHAT = ("You are a helpful assistant, dedicated to delivering comprehensive and "
               "meticulous responses.")
SYSTEM_ACADEMIC = "You are a helpful assistant, dedicated to provide concise and efficient answers."
# Emu v1's instruction-tuned model (Emu1/inference.py of the release): same turn template, own system messages.
EMU1_SYSTEM_IMAGE = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the "
                     "image after I provide it to you. Please answer my questions based on the given image.")
EMU1_SYSTEM_VIDEO = ("You are a helpful assistant and you will be presented with a video consisting of multiple "
                     "chronological images: [IMG]ImageContent[/IMG]. You will be able to see the video after I "
                     "provide it to you. Please answer my questions based on the given video.")
SYSTEM_MESSAGES = {"chat": SYSTEM_CHAT, "academic": SYSTEM_ACADEMIC, "emu1_image": EMU1_SYSTEM_IMAGE,
                   "emu1_video": EMU1_SYSTEM_VIDEO, "none": ""}


def patch_index_token(i: int) -> str:
    return f"<patch_index_{i:04d}>"


EMU2_ADDED_TOKENS: tuple[str, ...] = (
    PAD, IMG, IMG_END, IMAGE, GIMG, GIMG_END, EOC, VIDEO,
    GROUNDING, PHRASE, PHRASE_END, OBJECT, OBJECT_END, DELIMITER, REC,
    *(patch_index_token(i) for i in range(NUM_PATCH_INDEX)),
)
CHAT_TOKENS: tuple[str, ...] = (USER, ASSISTANT)

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded"
EMBEDDED_MODEL = EMBEDDED_DIR / "tokenizer" / "emu2_tiny.model"
EMBEDDED_PIECES = 1024


class Tokenizer:
    """Sentencepiece model + Emu2 added tokens. Picklable (grain workers receive a copy)."""

    def __init__(self, model_proto: bytes, *, with_chat_tokens: bool = True, name: str = ""):
        self._proto = model_proto
        self.name = name
        self.with_chat_tokens = with_chat_tokens
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        self.base_vocab_size = self._sp.GetPieceSize()
        added = EMU2_ADDED_TOKENS + (CHAT_TOKENS if with_chat_tokens else ())
        self._added = {tok: self.base_vocab_size + i for i, tok in enumerate(added)}
        self._added_inv = {i: tok for tok, i in self._added.items()}
        self.vocab_size = self.base_vocab_size + len(added)
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        self.pad_id = self._added[PAD]
        if min(self.bos_id, self.eos_id, self.unk_id) < 0:
            raise ValueError(f"sentencepiece model {name!r} lacks <s>, </s> or <unk>")
        splitters = sorted({*self._added, BOS, EOS, UNK}, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in splitters) + ")")
        self._special_ids = {**self._added, BOS: self.bos_id, EOS: self.eos_id, UNK: self.unk_id}

    def __getstate__(self):
        return {"proto": self._proto, "chat": self.with_chat_tokens, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["proto"], with_chat_tokens=state["chat"], name=state["name"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # -- ids -----------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        """Id of an added/special token or of a sentencepiece piece; KeyError if unknown."""
        if token in self._special_ids:
            return self._special_ids[token]
        piece_id = self._sp.PieceToId(token)
        if piece_id == self.unk_id and token != UNK:
            raise KeyError(f"{token!r} is neither an added token nor a piece of {self.name!r}")
        return piece_id

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._added_inv:
            return self._added_inv[token_id]
        if not 0 <= token_id < self.base_vocab_size:
            raise KeyError(f"id {token_id} outside the vocabulary of size {self.vocab_size}")
        return self._sp.IdToPiece(token_id)

    def patch_index_id(self, i: int) -> int:
        if not 0 <= i < NUM_PATCH_INDEX:
            raise ValueError(f"patch index {i} outside [0, {NUM_PATCH_INDEX})")
        return self._added[patch_index_token(i)]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._added_inv or token_id in (self.bos_id, self.eos_id)

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of `text` with special-token strings parsed (Emu2's tokenizer behaviour)."""
        parts = self._split_re.split(text)  # odd entries are special tokens
        ids = [self.bos_id] if add_bos else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._special_ids[part])
                continue
            if i > 0 and parts[i - 1] != UNK:
                part = part.lstrip()
            if i + 1 < len(parts) and parts[i + 1] != UNK:
                part = part.rstrip()
            if part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def encode_plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Sentencepiece ids of `text` without parsing special strings (so data text can never
        smuggle in placeholders), with each token's (begin, end) UTF-8 byte span in `text`
        (byte-fallback pieces of one character share its span, all but the last empty)."""
        proto = self._sp.Encode(text, return_type="proto")
        return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in self._added_inv or token_id in (self.bos_id, self.eos_id):
                if run:
                    out.append(self._sp.DecodeIds(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._added_inv.get(token_id) or self._sp.IdToPiece(token_id))
            else:
                run.append(token_id)
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)


def load_tokenizer(path_or_none: str | pathlib.Path | None = None, *,
                   with_chat_tokens: bool = True) -> Tokenizer:
    """Tokenizer from a sentencepiece `tokenizer.model` (file, or a directory holding one);
    None loads the embedded 1024-piece model. `with_chat_tokens=False` gives the base Emu2 /
    Emu2-Gen vocabulary (32272 with LLaMA) instead of Emu2-Chat's (32274)."""
    path = EMBEDDED_MODEL if path_or_none is None else pathlib.Path(path_or_none).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"sentencepiece model not found: {path}")
    return Tokenizer(path.read_bytes(), with_chat_tokens=with_chat_tokens, name=str(path))


def tokenizer_for_vocab(path_or_none: str | pathlib.Path | None, vocab_size: int) -> Tokenizer:
    """The tokenizer at `path_or_none` (None: the embedded one) with or without the two chat tokens,
    whichever gives a model's `vocab_size`; ValueError naming both sizes otherwise."""
    for with_chat in (True, False):
        tok = load_tokenizer(path_or_none, with_chat_tokens=with_chat)
        if tok.vocab_size == vocab_size:
            return tok
    raise ValueError(f"tokenizer {tok.name} has {tok.base_vocab_size} pieces: with Emu2's added tokens that "
                     f"does not give the model's vocabulary of {vocab_size}; give the model's sentencepiece "
                     f"tokenizer.model")


def caption_prompt(tokenizer: Tokenizer, n_query: int) -> list[int]:
    """Ids of `<s>[IMG]<image>*n_query[/IMG]`: the stage-1 prefix after which a caption follows."""
    return [tokenizer.bos_id, tokenizer.token_to_id(IMG),
            *([tokenizer.token_to_id(IMAGE)] * n_query), tokenizer.token_to_id(IMG_END)]


def embedded_corpus() -> list[str]:
    """Every piece of text shipped with the embedded dataset, one paragraph per entry."""
    out: list[str] = []

    def rows(name: str):
        with open(EMBEDDED_DIR / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    for row in rows("text.jsonl"):
        out.extend(p for p in row["text"].split("\n") if p.strip())
    out.extend(r["caption"] for r in rows("pairs.jsonl") + rows("videos.jsonl") + rows(
        "grounded.jsonl"))
    out.extend(r["instruction"] for r in rows("edits.jsonl"))
    for row in rows("interleaved.jsonl"):
        out.extend(row["text_list"])
    for row in rows("chat.jsonl"):
        for turn in row["turns"]:
            out.extend((turn["user"], turn["assistant"]))
    out.extend((SYSTEM_CHAT, SYSTEM_ACADEMIC))
    return out


def train_tiny_sentencepiece(out_path: str | pathlib.Path,
                             sentences: Sequence[str] | None = None) -> bytes:
    """Trains the embedded model: LLaMA's trainer settings (BPE, byte fallback, split digits,
    identity normalisation, dummy prefix, no whitespace folding; <unk>=0 <s>=1 </s>=2, no pad)
    with exactly EMBEDDED_PIECES pieces. Single-threaded so the result is reproducible."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences if sentences is not None else embedded_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=EMBEDDED_PIECES,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=1.0,
        max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    data = model.getvalue()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return data
