"""Training a NorMistral-style byte-level BPE tokenizer and saving it as a Hugging Face directory.

Inside: `SPECIAL_TOKENS`, `SPLIT_PATTERN`, `build_untrained()` (the pipeline with an empty model),
`train_tokenizer(files, output_dir, vocab_size)`.

NorMistral's own tokenizer cannot be downloaded here, so we rebuild its pipeline:
- Special tokens first, so their ids are fixed: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, `<mask>`=4,
  `<special_0>`..`<special_10>`=5..15.
- Normalizer: NFKC, then prepend a space (the first word looks like any other word, " word"), then
  a space after each newline that is followed by another character, so the first word of a line is
  also " word". Spaces are inserted, never removed: NorMistral's "remove spaces before newlines" step
  would lose real trailing spaces, and we want decode(encode(text)) == text exactly. Not inserting
  after a newline that precedes another newline (or ends the text) has the same effect as removing
  the inserted ones there: blank lines stay "\n\n", not "\n \n". Because every inserted space
  follows a newline and no original space does so unless that newline got one too, the decoder can
  undo it by turning each "\n " into "\n".
- Pre-tokenizer: a GPT-4-style split adapted to Nordic text (letters with their combining marks, no
  English contractions, single digits so numbers are spelled digit by digit as in Mistral), then
  ByteLevel (no prefix space: the normalizer added it; no regex: the split did it).
- BPE with the full 256-byte alphabet (any text encodes, Sámi letters included, even when the
  corpus lacks them) and pieces of at most 24 characters (`max_token_length`).
- Decoder: ByteLevel (joins the tokens into one string), "\n " -> "\n", strip one leading space.
- Post-processor: `<s>` in front. `</s>` is appended by the data pipeline, per document.
Saved through `transformers.PreTrainedTokenizerFast(...).save_pretrained`, so a plain
`AutoTokenizer.from_pretrained(dir)` loads it (no remote code).
"""

from __future__ import annotations

import json
import os

from jaxmodel import storage
from training.documents import DataError, iter_documents

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
MAX_TOKEN_LENGTH = 24
MODEL_MAX_LENGTH = 32768  # NorMistral-11b-long's context

# Pieces, in order of preference: an optional non-letter (usually the space) + a word; one digit;
# an optional space + a run of punctuation (+ newlines that follow it); whitespace ending in newlines;
# whitespace not followed by a word (so " word" keeps its space); any other whitespace.
SPLIT_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_untrained():
    """The tokenizer pipeline around an empty BPE model (train it, then add the post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Prepend(" "),
        normalizers.Replace(Regex(r"\n(?=[^\n])"), "\n "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.Sequence([
        decoders.ByteLevel(),
        decoders.Replace("\n ", "\n"),
        decoders.Strip(" ", 1, 0),  # after ByteLevel there is one string, so this strips the text's start
    ])
    return tok


def train_tokenizer(files: list[str], output_dir: str, vocab_size: int = 4096, *, progress: bool = False) -> str:
    """Train on the documents of `files` (.jsonl / text, see training.documents); save to `output_dir`.

    Returns `output_dir`. An existing non-empty `output_dir` is an error (nothing is overwritten).
    """
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not files:
        raise DataError("no input files")
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise DataError(f"vocab_size {vocab_size} is below {minimum} (16 special tokens + 256 bytes)")
    for path in files:
        if os.path.isdir(path):
            raise DataError(f"{path}: is a directory, expected a .jsonl or text file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    storage.check_output_dir(output_dir)  # exists, is a file, or cannot be written: before training

    def documents():
        for path in files:
            yield from iter_documents(path)

    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=MAX_TOKEN_LENGTH,
        show_progress=progress,
    )
    tok.train_from_iterator(documents(), trainer)
    if tok.get_vocab_size() <= minimum:
        raise DataError(f"{', '.join(files)}: no text to learn merges from")
    for i, token in enumerate(SPECIAL_TOKENS):  # the trainer adds them first; check, ids are part of the format
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False)
    with storage.atomic_directory(output_dir) as tmp:  # appears complete or not at all
        hf.save_pretrained(tmp)
        _write_special_tokens_map(tmp)
    return output_dir


def _write_special_tokens_map(output_dir: str) -> None:
    """transformers 5 keeps the special tokens in tokenizer_config.json only; older loaders (and people)
    look for special_tokens_map.json, so write it when save_pretrained did not."""
    path = os.path.join(output_dir, "special_tokens_map.json")
    if os.path.exists(path):
        return
    roles = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
             "mask_token": "<mask>", "additional_special_tokens": SPECIAL_TOKENS[5:]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(roles, f, indent=2, ensure_ascii=False)
        f.write("\n")
