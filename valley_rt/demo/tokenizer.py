"""The demo model's tokenizer, trained here from the training text (nothing is downloaded).

A LLaMA-style layout: `<unk>`=0, `<s>`=1, `</s>`=2, then a byte-level BPE vocabulary learnt from the
conversations (every byte is in the initial alphabet, so no text is ever out of vocabulary), then
Valley's six added tokens in the spec's order (`<im_patch>` ... `<vi_end>`). `<s>` is prepended to
every encoded text like LLaMA's tokenizer does. The result is a standard `PreTrainedTokenizerFast`
that `AutoTokenizer.from_pretrained` reads back from the checkpoint's `llm/` folder, with offsets
(prompt.encode needs them for the label spans).

Byte-level pre-tokenization splits at letter/punctuation boundaries, so "###" never merges with the
role marker after it: a generation prompt ending in "###" tokenizes as a prefix of the training text.
"""

from __future__ import annotations

from typing import Iterable

from valley_rt.config import SPECIAL_TOKENS, TokenLayout

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024):
    """Train a byte-level BPE on `texts`; returns a PreTrainedTokenizerFast.

    vocab_size counts the base vocabulary (the three LLaMA specials, 256 bytes and the merges); the
    six Valley tokens come after it, so `len(tokenizer) == vocab_size + 6` when the corpus is rich
    enough to learn every merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    base = tk.get_vocab_size()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  pad_token=UNK, add_bos_token=True, clean_up_tokenization_spaces=False)
    for i, name in enumerate(SPECIAL_TOKENS):
        got = tok.convert_tokens_to_ids(name)
        if got != base + i:
            raise RuntimeError(f"tokenizer put {name} at id {got}, expected {base + i}")
    return tok


def token_layout(tokenizer) -> TokenLayout:
    """The config's TokenLayout read from a tokenizer holding the six added tokens."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    return TokenLayout(*ids)


def corpus_texts(records, *, system: str) -> list[str]:
    """Each record (a data.Record) as the prompt text training sees (system prompt, role markers,
    separators) with `<video>` removed: the tokenizer's training corpus."""
    from valley_rt.prompt import VIDEO, Turn, format_conversation

    return [format_conversation([Turn(t.role, t.text.replace(VIDEO, "")) for t in rec.turns], system=system)[0]
            for rec in records]
