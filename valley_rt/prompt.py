"""Valley's "v1" conversation prompt, the <video> token layout, and answer clean-up.

    {system}\n\n###  Human: {text} \n### Assistent: {text} \n### ...

("Assistent" is sic: the released template spells it so, and a converted checkpoint was trained on it.)
A prompt for generation ends right after the last "###"; the model continues with its role and the
answer, and stops at the next "###". Tokens are what the original's one call on the whole string gives
after `<video>` is replaced by the placeholder tokens, except that only that one `<video>` becomes
control tokens: every other character (user text included) is plain text. Training labels come from
character offsets, so training and inference tokenize identically.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from valley_rt.config import ValleyConfig

if TYPE_CHECKING:  # splice() only calls tensor methods: this module imports without torch
    import torch

SEP = "###"
HUMAN, ASSISTANT = "Human", "Assistent"  # sic
VIDEO = "<video>"
IGNORE_INDEX = -100


@dataclass
class Turn:
    role: str  # "human" or "gpt"
    text: str


def video_placeholder(num_patches: int, num_frames: int) -> str:
    """What `<video>` becomes: im_start, N im_patch, im_end, vi_start, T vi_frame, vi_end."""
    return ("<im_start>" + "<im_patch>" * num_patches + "<im_end>"
            + "<vi_start>" + "<vi_frame>" * num_frames + "<vi_end>")


def format_conversation(turns: list[Turn], *, system: str) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character spans [start, end) the loss covers (assistant turns).

    A span covers " Assistent: {text} \\n###" so the model learns its role marker and where to stop.
    """
    text = f"{system}\n\n{SEP}"
    spans = []
    for turn in turns:
        if turn.role == "human":
            text += f" {HUMAN}: {turn.text} \n{SEP}"
        elif turn.role == "gpt":
            start = len(text)
            text += f" {ASSISTANT}: {turn.text} \n{SEP}"
            spans.append((start, len(text)))
        else:
            raise ValueError(f"unknown role {turn.role!r} (expected 'human' or 'gpt')")
    return text, spans


def first_turn_video_at(system: str) -> int:
    """Character offset of the `<video>` the runtime puts at the start of the first human turn."""
    return len(f"{system}\n\n{SEP} {HUMAN}: ")


def video_token_ids(cfg: ValleyConfig, num_frames: int) -> list[int]:
    """The ids `video_placeholder` tokenizes to (the token layout's ids)."""
    t = cfg.tokens
    return [t.im_start, *[t.im_patch] * cfg.num_patches, t.im_end, t.vi_start, *[t.vi_frame] * num_frames, t.vi_end]


def encode(tokenizer, text: str, *, cfg: ValleyConfig, num_frames: int | None,
           spans: list[tuple[int, int]] | None = None,
           video_at: int | None = None) -> tuple[list[int], list[int] | None]:
    """Token ids of `text` with its one `<video>` expanded; labels (IGNORE_INDEX outside `spans`) if spans given.

    num_frames: frames of the video (None when the text has no video). video_at: the character offset
    of the `<video>` to expand (the runtime says where it put it); None: the text's only `<video>`.

    Everything but that `<video>` is tokenized as plain text: a `<im_patch>`, `</s>` or second `<video>`
    typed by a user (or present in a system prompt or an earlier answer) stays ordinary characters and
    never becomes a control token. The text is cut at the placeholder and each side tokenized with the
    tokenizer's special-token matching off (`plain_tokens`); the tokenizer itself cuts a string at its
    added tokens before anything else, so text without special strings tokenizes exactly as the
    original's one call on the whole expanded string.
    """
    if video_at is None:
        n_video = text.count(VIDEO)
        if n_video > 1:
            raise ValueError(f"a prompt may hold one {VIDEO}, found {n_video}")
        video_at = text.index(VIDEO) if n_video else None
    elif not text.startswith(VIDEO, video_at):
        raise ValueError(f"no {VIDEO} at character {video_at} of the prompt")
    if video_at is not None and num_frames is None:
        raise ValueError(f"the prompt has {VIDEO} but no video was given")
    if video_at is None:
        ids, offsets = plain_tokens(tokenizer, text, first=True)
    else:
        head, tail = text[:video_at], text[video_at + len(VIDEO):]
        video_ids = video_token_ids(cfg, num_frames)
        head_ids, head_off = plain_tokens(tokenizer, head, first=True)
        tail_ids, tail_off = plain_tokens(tokenizer, tail, first=False)
        # Offsets index the expanded text (placeholder string in place of <video>), as spans do below.
        grown = len(video_placeholder(cfg.num_patches, num_frames)) - len(VIDEO)
        ids = head_ids + video_ids + tail_ids
        offsets = head_off + [(video_at, video_at)] * len(video_ids) + [
            (a + video_at + len(VIDEO) + grown, b + video_at + len(VIDEO) + grown) for a, b in tail_off]
    if spans is None:
        return ids, None

    def moved(c: int) -> int:
        return c + (grown if video_at is not None and c > video_at else 0)

    spans = [(moved(a), moved(b)) for a, b in spans]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (a, b) in enumerate(offsets):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[i] = ids[i]
    return ids, labels


def plain_tokens(tokenizer, text: str, *, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text` with no special token recognised in it.

    first: the text opens the prompt (gets the BOS token and, for sentencepiece-style tokenizers, the
    leading-space marker); False: it follows the video placeholder inside one prompt.
    A `FastTokenizer` (the runtime's) and transformers tokenizers backed by the `tokenizers` library
    (every tokenizer transformers >= 5 loads, sentencepiece files included) take the same route.
    """
    if hasattr(tokenizer, "plain_tokens"):
        return tokenizer.plain_tokens(text, first=first)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _backend_plain(backend, text, first=first)
    enc = tokenizer(text, add_special_tokens=first, split_special_tokens=True, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


_PLAIN: dict[int, tuple] = {}  # id(tokenizers.Tokenizer) -> (it, plain copy for the head, for the tail)


def _backend_plain(tok, text: str, *, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """plain_tokens on a `tokenizers.Tokenizer`: copies of it with special-token matching off."""
    entry = _PLAIN.get(id(tok))
    if entry is None or entry[0] is not tok:
        entry = _PLAIN[id(tok)] = (tok, *plain_copies(tok))
    enc = entry[1 if first else 2].encode(text, add_special_tokens=first)
    return list(enc.ids), list(enc.offsets)


def plain_copies(tok):
    """Two views of a `tokenizers.Tokenizer` that never match special tokens in text: one for a prompt's
    first piece, one for a piece that follows the placeholder. A Metaspace pre-tokenizer that marks only
    the first piece (prepend_scheme "first") would mark the second piece too when it is tokenized on
    its own, so for such a tokenizer the second is another copy that never marks: the result equals what
    the tokenizer does to that piece inside the whole prompt. Otherwise both are one copy (each copy
    rebuilds the tokenizer from its JSON: ~35 ms for a 32k-token vocabulary)."""
    from tokenizers import Tokenizer

    text = tok.to_str()
    head = Tokenizer.from_str(text)
    head.encode_special_tokens = True
    pre = head.pre_tokenizer
    if pre is None or type(pre).__name__ != "Metaspace" or pre.prepend_scheme != "first":
        return head, head
    tail = Tokenizer.from_str(text)
    tail.encode_special_tokens = True
    pre = tail.pre_tokenizer
    pre.prepend_scheme = "never"
    tail.pre_tokenizer = pre
    return head, tail


_LEADING = re.compile(r"^\s*(?:###|Assistant:|Assistent:|Response:|Valley:|\s)*", re.IGNORECASE)


def strip_leading(text: str) -> str:
    """Drop the leading separator / role markers ("###", "Assistant:", "Assistent:", ...)."""
    return _LEADING.sub("", text)


def clean_answer(text: str) -> str:
    """Strip the leading separator / role markers and cut at the first "###" (spec: prompt)."""
    return strip_leading(text).split(SEP, 1)[0].strip()


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words -> digits, collapse spaces: the key
    short answers are compared on (evaluation, the export's accuracy gate)."""
    s = _PUNCT.sub(" ", text.lower())
    s = _ARTICLES.sub(" ", s)
    words = [str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in s.split()]
    return " ".join(words)


def splice(embeds: torch.Tensor, input_ids: torch.Tensor,
           visual: tuple[torch.Tensor, torch.Tensor] | None, cfg: ValleyConfig) -> torch.Tensor:
    """Write pooled tokens over the <im_patch> rows and frame tokens over the <vi_frame> rows.

    embeds [B, L, D], input_ids [B, L], visual = (pooled [B, N, D], frames [B, T, D]).
    Raises ValueError naming both counts when a sample's placeholders and visual tokens disagree.
    """
    patch_mask = input_ids == cfg.tokens.im_patch
    frame_mask = input_ids == cfg.tokens.vi_frame
    if visual is None:
        if patch_mask.any() or frame_mask.any():
            raise ValueError("the prompt has video placeholders but no video was given")
        return embeds
    pooled, frames = visual
    for b in range(input_ids.shape[0]):
        n_patch, n_frame = int(patch_mask[b].sum()), int(frame_mask[b].sum())
        if n_patch != pooled.shape[1]:
            raise ValueError(f"sample {b}: {n_patch} <im_patch> placeholders but {pooled.shape[1]} pooled patch tokens")
        if n_frame != frames.shape[1]:
            raise ValueError(f"sample {b}: {n_frame} <vi_frame> placeholders but {frames.shape[1]} frame tokens")
    embeds = embeds.masked_scatter(patch_mask[..., None], pooled.to(embeds.device, embeds.dtype))
    return embeds.masked_scatter(frame_mask[..., None], frames.to(embeds.device, embeds.dtype))


def splice_rows(embeds: np.ndarray, ids, visual: tuple[np.ndarray, np.ndarray], cfg: ValleyConfig) -> np.ndarray:
    """`splice` for one sample in NumPy (the engine path): embeds [S, D], ids [S], visual = (pooled [N, D],
    frames [T, D]) -> a new [S, D] array with the visual tokens over their placeholder rows."""
    ids = np.asarray(ids)
    pooled, frames = visual
    patch_rows = np.flatnonzero(ids == cfg.tokens.im_patch)
    frame_rows = np.flatnonzero(ids == cfg.tokens.vi_frame)
    if len(patch_rows) != len(pooled):
        raise ValueError(f"{len(patch_rows)} <im_patch> placeholders but {len(pooled)} pooled patch tokens")
    if len(frame_rows) != len(frames):
        raise ValueError(f"{len(frame_rows)} <vi_frame> placeholders but {len(frames)} frame tokens")
    out = np.array(embeds, dtype=np.float32)  # a copy: the embedding table may be a read-only memory map
    out[patch_rows] = pooled
    out[frame_rows] = frames
    return out
