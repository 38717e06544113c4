"""The word-level tokenizers of the task data sets, all built by `lightarch.data.tokenizers.word_level_tokenizer`.

The expected ids below were produced by the hand-built tokenizers that `word_level_tokenizer` replaced: models saved
before (their tokenizer.json) and tokenizers built now must agree, or saved models would read their prompts wrong.
"""

import pytest
from transformers import AutoTokenizer

from lightarch.data import arithmetic, multimodal, passkey
from lightarch.data.tokenizers import WORD_LEVEL_SPECIAL_TOKENS, word_level_tokenizer

# builder -> (vocabulary size, {pad, unk, bos, eos ids}, [(text, ids with special tokens, decode of those ids)])
EXPECTED = {
    "passkey": (56, (0, 1, 2, 3), [
        ("There is an important info hidden. The pass key is 71432. Remember it. 71432 is the pass key.",
         [2, 21, 39, 26, 34, 35, 33, 14, 20, 45, 41, 39, 11, 5, 8, 7, 6, 14, 19, 40, 14, 11, 5, 8, 7, 6, 39, 50, 45, 41,
          14],
         "<bos> There is an important info hidden . The pass key is 7 1 4 3 2 . Remember it . 7 1 4 3 2 is the pass "
         "key ."),
        ("What is the pass key? The pass key is", [2, 22, 39, 50, 45, 41, 15, 20, 45, 41, 39],
         "<bos> What is the pass key ? The pass key is"),
        ("Unknown words here, 12 and 3!", [2, 1, 1, 1, 1, 5, 6, 27, 7, 1],
         "<bos> <unk> <unk> <unk> <unk> 1 2 and 3 <unk>"),
        ("  spaces\tand\nnewlines ", [2, 1, 27, 1], "<bos> <unk> and <unk>"),
        ("<bos> The <eos> <pad>", [2, 2, 20, 3, 0], "<bos> <bos> The <eos> <pad>"),
        ("é ß ñ key's", [2, 1, 1, 1, 41, 1, 1], "<bos> <unk> <unk> <unk> key <unk> <unk>"),
        ("", [2], "<bos>"),
    ]),
    "arithmetic": (17, (0, None, 1, 2), [
        ("7+2*3=13", [10, 13, 5, 15, 6, 16, 4, 6], "7+2*3=13"),
        ("3-8=-5", [6, 14, 11, 16, 14, 8], "3-8=-5"),
        ("12==3", [4, 5, 16, 16, 6], "12==3"),
        ("<eos>", [2], "<eos>"),
        ("", [], ""),
    ]),
    "multimodal": (74, (0, 1, 2, 3), [
        ("<image> <audio> does the voice name what is shown?", [2, 4, 5, 20, 59, 65, 35, 67, 28, 50, 7],
         "<bos> <image> <audio> does the voice name what is shown ?"),
        ("<image><image> which of the two items is worn on the feet?",
         [2, 4, 4, 69, 37, 59, 63, 30, 28, 72, 38, 59, 22, 7],
         "<bos> <image> <image> which of the two items is worn on the feet ?"),
        ("t-shirt yes no first", [2, 57, 73, 36, 23], "<bos> t-shirt yes no first"),
        ("T-Shirt ankle-boot", [2, 1, 1], "<bos> <unk> <unk>"),
        ("a,b.c", [2, 8, 6, 1, 1, 1], "<bos> a , <unk> <unk> <unk>"),
        ("<bos> x <eos>", [2, 2, 1, 3], "<bos> <bos> <unk> <eos>"),
        ("", [2], "<bos>"),
    ]),
}
BUILDERS = {"passkey": passkey.build_tokenizer, "arithmetic": arithmetic.build_tokenizer,
            "multimodal": multimodal.build_tokenizer}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_tokenizers_keep_their_ids_and_survive_a_save(name, tmp_path):
    size, special_ids, cases = EXPECTED[name]
    built = BUILDERS[name]()
    built.save_pretrained(tmp_path)
    for tokenizer in (built, AutoTokenizer.from_pretrained(tmp_path)):
        assert len(tokenizer) == size
        assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id,
                tokenizer.eos_token_id) == special_ids
        for text, ids, decoded in cases:
            assert tokenizer(text)["input_ids"] == ids, text
            assert tokenizer.decode(ids) == decoded, text


def test_multimodal_placeholders_are_special_and_arithmetic_refuses_unknown_characters():
    tokenizer = multimodal.build_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<image>", "<audio>"]) == [4, 5]
    assert tokenizer.decode([2, 4, 11, 14, 3], skip_special_tokens=True) == "ankle boot"
    with pytest.raises(Exception, match="UNK"):
        arithmetic.build_tokenizer()("7 + 2")  # a space is no character of the suite


def test_word_level_tokenizer_ids_and_options():
    tokenizer = word_level_tokenizer(["<bos>", "a", "b", "a"], WORD_LEVEL_SPECIAL_TOKENS, extra_special_tokens=["<x>"],
                                     whitespace="split")
    assert tokenizer.get_vocab() == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, "<x>": 4, "a": 5, "b": 6}
    assert tokenizer("a <x> c")["input_ids"] == [2, 5, 4, 1]
    characters = word_level_tokenizer("ab", {"pad_token": "<pad>"}, pattern=".", add_bos=False, join_with="")
    assert characters("abba")["input_ids"] == [1, 2, 2, 1] and characters.decode([1, 2]) == "ab"
    with pytest.raises(ValueError, match="whitespace must be one of"):
        word_level_tokenizer(["a"], WORD_LEVEL_SPECIAL_TOKENS, whitespace="tabs")
    with pytest.raises(ValueError, match="join_with"):
        word_level_tokenizer(["a"], WORD_LEVEL_SPECIAL_TOKENS, join_with="-")
