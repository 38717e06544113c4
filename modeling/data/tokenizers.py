"""Tokenizers built offline: a byte-level BPE trained on a corpus and an untrained byte-level tokenizer, both with a chat
template, and word-level tokenizers over a fixed vocabulary (the task data sets' `build_tokenizer`s).

Special tokens are dicts keyed by their `PreTrainedTokenizerFast` argument (`pad_token`, `unk_token`, `bos_token`,
`eos_token`), in id order: a tokenizer built from one gives them the first ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Special tokens of the trained byte-level BPE (`train_bpe_tokenizer`): ids 0-2.
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
# ... of the untrained byte-level tokenizer (`byte_level_tokenizer`): ids 0-2, then the 256 bytes.
BYTE_LEVEL_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
# ... of the word-level tokenizers of `lightarch.data.passkey` and `lightarch.data.multimodal`: <pad>=0, <unk>=1,
# <bos>=2, <eos>=3. (`lightarch.data.arithmetic` has no <unk>: an unknown character is an error there.)
WORD_LEVEL_SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-ins of bytes 0..255 used by byte-level BPE (GPT-2's `bytes_to_unicode`), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer(model_max_length: int = 4096):
    """An untrained byte-level tokenizer (256 byte tokens + `<pad>` `<s>` `</s>`, ids 0-2) with a chat template.

    Built offline in milliseconds; any text round-trips. Used by tests and as a fallback by the deploy scripts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(BYTE_LEVEL_SPECIAL_TOKENS.values())}
    for token in _byte_symbols():  # byte b gets id 3 + b
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        **BYTE_LEVEL_SPECIAL_TOKENS,
    )


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True):
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`; returns a `PreTrainedTokenizerFast`.

    Special tokens: `<|pad|>` (0), `<|bos|>` (1), `<|eos|>` (2). Encoding prepends `<|bos|>`. Training is
    deterministic for the same texts and settings. `CHAT_TEMPLATE` is its chat template (`apply_chat_template`, the
    server's /v1/chat/completions).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1_000_000,
                                   chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS)


WHITESPACE_MODES = ("words", "split", None)


def word_level_tokenizer(
    vocabulary: Sequence[str],
    special_tokens: Mapping[str, str],
    *,
    extra_special_tokens: Sequence[str] = (),
    whitespace: str | None = None,
    pattern: str | None = None,
    individual_digits: bool = False,
    add_bos: bool = True,
    join_with: str = " ",
    model_max_length: int | None = None,
):
    """A `PreTrainedTokenizerFast` over a fixed vocabulary: every piece of the pre-tokenized text is one token.

    Ids: `special_tokens` (argument name -> token, e.g. `WORD_LEVEL_SPECIAL_TOKENS`) first, in order, then
    `extra_special_tokens` (never split, e.g. `<image>`), then `vocabulary`; an entry already given keeps its first
    id. A piece outside the vocabulary becomes `unk_token`, or raises if `special_tokens` has none.

    Pre-tokenization, in this order:
        - `whitespace`: "words" splits into runs of word characters and runs of other non-space characters,
          dropping spaces (`tokenizers`' `Whitespace`); "split" splits on spaces only (`WhitespaceSplit`); None: no
          step;
        - `pattern`: a regex; each match is one piece and so is each stretch between matches (`Split`, isolated);
          "." makes a character-level tokenizer;
        - `individual_digits`: every digit its own piece (`Digits`).

    `add_bos` prepends `bos_token` when encoding (`add_special_tokens=True`); `decode` joins tokens with
    `join_with`, " " or "". `model_max_length` None keeps transformers' default (no limit).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if whitespace not in WHITESPACE_MODES:
        raise ValueError(f"whitespace must be one of {WHITESPACE_MODES}, got {whitespace!r}.")
    if join_with not in (" ", ""):
        raise ValueError(f"join_with must be ' ' (words) or '' (characters), got {join_with!r}.")
    tokens = dict.fromkeys([*special_tokens.values(), *extra_special_tokens, *vocabulary])
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens.get("unk_token")))

    steps = []
    if whitespace == "words":
        steps.append(pre_tokenizers.Whitespace())
    elif whitespace == "split":
        steps.append(pre_tokenizers.WhitespaceSplit())
    if pattern is not None:
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if steps:
        backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)

    if add_bos:
        bos = special_tokens["bos_token"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                               special_tokens=[(bos, vocab[bos])])
    # WordPiece without a "##" continuation joins tokens with spaces; Fuse joins them with nothing.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False) if join_with else decoders.Fuse()
    options = {"model_max_length": model_max_length} if model_max_length is not None else {}
    if extra_special_tokens:
        options["extra_special_tokens"] = list(extra_special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options, **special_tokens)
