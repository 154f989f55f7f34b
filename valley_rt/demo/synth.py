"""Synthetic video-instruction data: a tiny procedurally rendered world, really encoded as mp4.

Each clip (default 32 frames, 128x96, 10 fps, libx264 yuv420p) shows coloured shapes (square / circle /
triangle) inside a walled arena on a plain background. Objects move in straight lines, bounce off the
wall or off each other, appear, disappear or change colour, and some clips cut to a second scene.
Every clip yields several records in Valley's instruction format, one QA pair and one task family each:

    {"id", "video": "<file in OUT/videos>", "task": family, "short": bool, "choices": [...] (short only),
     "distractor": bool (short only: another object would answer the question differently),
     "conversations": [{"from": "human", "value": "<video>\n<question>"}, {"from": "gpt", "value": answer}]}

Families: multi-shot captions and long descriptions (free text, "short": false); action recognition
(direction), causal inference (why did X turn back), counting and order of events (short answers from a
closed vocabulary, exact-matched after `normalize_answer`). TEMPORAL_FAMILIES (direction, cause, order)
need several frames, as no single frame can tell them; direction and order also need the frames' order.

The trade-off: the world is *planned*, not simulated. The answer of each short-answer family is drawn
first (balanced exactly within every block of 48 clips, so chance is known), then the geometry is drawn until the clip shows exactly that
answer, with no accidental contact, every event visible in the frames a model samples
(`np.linspace(0, T - 1, frames_hint)`), and every object inside the centre crop the model sees. A
clip depends only on `(seed, index)`, so generation is deterministic and parallel, and two seeds give
disjoint splits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from valley_rt.errors import DataError
from valley_rt.prompt import NUMBER_WORDS, normalize_answer
from valley_rt.video import write_mp4

# Saturated, well separated RGB colours (they survive yuv420p chroma subsampling).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (245, 225, 20),
    "white": (245, 245, 245),
    "purple": (165, 40, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (8, 8, 8), "gray": (95, 95, 95), "brown": (80, 48, 20)}
WALL_RGB = (150, 150, 150)
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

TASK_FAMILIES: tuple[str, ...] = ("multi_shot_caption", "long_description", "action", "causal", "counting",
                                  "order")
TEMPORAL_FAMILIES: tuple[str, ...] = ("action", "causal", "order")  # a single frame cannot answer these
SHORT_FAMILIES: tuple[str, ...] = ("action", "causal", "counting", "order")  # exact-match answers

QUESTIONS: dict[str, tuple[str, ...]] = {
    "multi_shot_caption": (
        "Describe each scene of the video in one sentence.",
        "Give a short caption for every scene in this video.",
        "Write one caption per shot of the video.",
        "Caption each scene of the clip.",
    ),
    "long_description": (
        "Describe the video in detail.",
        "What happens in this video? Describe it step by step.",
        "Give a detailed description of the clip.",
        "Tell me everything that happens in the video.",
    ),
    "action": (
        "Which way does the {obj} move?",
        "In which direction is the {obj} moving?",
        "Where does the {obj} go: left, right, up or down?",
        "What direction does the {obj} travel in?",
    ),
    "causal": (
        "Why does the {obj} change direction?",
        "What makes the {obj} turn back?",
        "Why did the {obj} bounce back?",
        "What caused the {obj} to reverse?",
    ),
    "counting": (
        "How many objects appear in the video?",
        "How many shapes are shown in the whole clip?",
        "Count the objects that appear in this video.",
        "How many different objects can be seen in the video?",
    ),
    "order": (
        "What appeared first, the {a} or the {b}?",
        "Which came first in the video: the {a} or the {b}?",
        "Which object showed up earlier, the {a} or the {b}?",
        "Did the {a} or the {b} appear first?",
    ),
}


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Arena:
    """The walled square, in frame pixels, that stays inside the model's centre crop."""

    x0: int
    y0: int
    side: int  # outer side of the wall, pixels
    wall: int  # wall thickness, pixels
    size: int  # object side, pixels

    @property
    def lo(self) -> tuple[float, float]:  # smallest object centre (x, y) that does not touch the wall
        return self.x0 + self.wall + self.size / 2, self.y0 + self.wall + self.size / 2

    @property
    def hi(self) -> tuple[float, float]:
        return (self.x0 + self.side - self.wall - self.size / 2, self.y0 + self.side - self.wall - self.size / 2)


def make_arena(width: int, height: int, *, resize_short: int = 73, crop: int = 64) -> Arena:
    """The largest square the model sees after "resize short side to `resize_short`, centre crop `crop`"."""
    scale = resize_short / min(width, height)
    side = int(crop / scale) - 4  # 2 px margin each side for the resize's rounding
    size = 2 * round(side * 0.1)  # ~16 px at 128x96, i.e. ~12 model pixels
    if size * scale < 9:
        raise ValueError(f"synth frame {width}x{height} makes objects {size * scale:.1f} px after resizing; need >= 9")
    return Arena(x0=(width - side) // 2, y0=(height - side) // 2, side=side, wall=2, size=size)


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class Track:
    """One object in one scene: where its centre is in each clip frame it is visible in."""

    color: str
    shape: str
    role: str  # "mover" (constant direction), "bouncer", "partner" (what a bouncer hits), "still"
    start: int  # first visible clip frame
    end: int  # one past the last visible clip frame
    xs: list[float] = field(default_factory=list)  # centre x per visible frame (len end - start)
    ys: list[float] = field(default_factory=list)
    direction: Optional[str] = None  # mover: its direction; bouncer/moving partner: direction before the bounce
    bounce_at: Optional[int] = None  # clip frame of the contact
    cause: Optional[str] = None  # bouncer: "wall" or the name of the object it hits
    new_color: Optional[str] = None  # a still object may change colour (it keeps its first name) ...
    change_at: Optional[int] = None  # ... from this clip frame on

    def color_at(self, t: int) -> str:
        return self.new_color if self.change_at is not None and t >= self.change_at else self.color

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    start: int
    end: int
    background: str
    tracks: list[Track]


@dataclass
class ClipPlan:
    index: int
    seed: int
    num_frames: int
    scenes: list[Scene]
    targets: dict[str, Any]  # the drawn answers: count, direction (+ its object), cause, order pair

    def content_hash(self) -> str:
        blob = json.dumps([asdict(s) for s in self.scenes], sort_keys=True, default=float)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def tracks(self) -> list[Track]:
        return [t for s in self.scenes for t in s.tracks]


def _answer_block() -> list[tuple[int, bool, str, str]]:
    """48 (count, two scenes, direction, cause) combinations in which every answer is equally frequent:
    each block of 48 consecutive clips uses each once, so a split's short answers are balanced exactly
    (up to a partial last block), not just in expectation. A third of the clips have a scene cut."""
    out = []
    for direction in DIRECTIONS:
        for cause in ("wall", "object"):
            out += [(1, False, direction, cause)] * 2
            out += [(count, two, direction, cause) for count in (2, 3) for two in (False, True)]
    return out


_BLOCK = _answer_block()
_MAX_DRAWS = 5000  # geometry draws per clip; a typical clip needs a few, the worst of thousands ~100


class _Retry(Exception):
    """Internal: this draw of the geometry does not show the planned answers; draw again."""


def _line(rng, arena: Arena, axis: int, sign: int, frames: int) -> tuple[float, float]:
    """A start coordinate and signed speed that cross 50-95 % of the arena along `axis` in `frames` steps."""
    lo, hi = arena.lo[axis], arena.hi[axis]
    span = float(rng.uniform(0.5, 0.95)) * (hi - lo)
    p0 = float(rng.uniform(lo, hi - span)) if sign > 0 else float(rng.uniform(lo + span, hi))
    return p0, sign * span / max(frames, 1)


def axis_sign(direction: str) -> tuple[int, int]:
    """(axis, sign) of a direction name: axis 0 is x, 1 is y (down the frame); sign -1 towards 0."""
    return {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]


def _place_mover(rng, arena, tr: Track, direction: str) -> None:
    axis, sign = axis_sign(direction)
    n = tr.end - tr.start
    p0, v = _line(rng, arena, axis, sign, n - 1)
    cross = float(rng.uniform(arena.lo[1 - axis], arena.hi[1 - axis]))
    along = [p0 + v * i for i in range(n)]
    tr.direction = direction
    tr.xs, tr.ys = (along, [cross] * n) if axis == 0 else ([cross] * n, along)


def _place_still(rng, arena, tr: Track, spare: Optional[str] = None) -> None:
    """A still object; given a `spare` colour (unused in the clip), it turns that colour half the time."""
    n = tr.end - tr.start
    if spare is not None and rng.random() < 0.5:
        tr.new_color, tr.change_at = spare, int(rng.integers(tr.start + n // 3, tr.end - n // 3 + 1))
    tr.xs = [float(rng.uniform(arena.lo[0], arena.hi[0]))] * n
    tr.ys = [float(rng.uniform(arena.lo[1], arena.hi[1]))] * n


def _place_bounce(rng, arena, b: Track, p: Optional[Track], tb: int) -> None:
    """`b` moves, touches the wall (p is None) or `p` at clip frame `tb`, and goes back.

    Speeds come from the room left in the lane, so a draw rarely leaves the arena: the bouncer's largest
    excursion from the contact point (plus, for a moving partner, the partner's) fits between the walls."""
    axis = int(rng.integers(2))
    sign = int(rng.choice([-1, 1]))  # the bouncer's direction before the contact
    lo, hi = arena.lo[axis], arena.hi[axis]
    cross = float(rng.uniform(arena.lo[1 - axis], arena.hi[1 - axis]))
    span_b = max(tb - b.start, b.end - 1 - tb)  # frames of the bouncer's longer leg
    if p is None:
        reach_b = float(rng.uniform(0.45, 0.95)) * (hi - lo)
        contact = hi if sign > 0 else lo
    else:
        room = hi - lo - arena.size
        moving = rng.random() < 0.5  # the partner moves towards the bouncer, or stands still
        reach_b = float(rng.uniform(0.4, 0.6) if moving else rng.uniform(0.45, 0.95)) * room
        reach_p = float(rng.uniform(0.25, 0.95 - reach_b / room)) * room if moving else 0.0
        # sign > 0: bouncer on the low side of the partner; contact = the bouncer's centre when they touch
        if sign > 0:
            contact = float(rng.uniform(lo + reach_b, hi - arena.size - reach_p))
        else:
            contact = float(rng.uniform(lo + arena.size + reach_p, hi - reach_b))
        q = contact + sign * arena.size
        span_p = max(tb - p.start, p.end - 1 - tb)
        along_p = [q + sign * reach_p / span_p * abs(tb - t) for t in range(p.start, p.end)]
        p.xs, p.ys = (along_p, [cross] * len(along_p)) if axis == 0 else ([cross] * len(along_p), along_p)
        p.direction = _dir_name(axis, -sign) if moving else None
        p.bounce_at = tb if moving else None
    along = [contact - sign * reach_b / span_b * abs(tb - t) for t in range(b.start, b.end)]
    b.xs, b.ys = (along, [cross] * len(along)) if axis == 0 else ([cross] * len(along), along)
    b.direction, b.bounce_at = _dir_name(axis, sign), tb
    b.cause = "wall" if p is None else p.name


def _dir_name(axis: int, sign: int) -> str:
    return ("left", "right")[sign > 0] if axis == 0 else ("up", "down")[sign > 0]


def _check(arena: Arena, scene: Scene, sampled: np.ndarray) -> None:
    """Reject a draw with objects outside the arena, accidental contact, or events the samples miss."""
    lo, hi = arena.lo, arena.hi
    for tr in scene.tracks:
        eps = 1e-6
        if min(tr.xs) < lo[0] - eps or max(tr.xs) > hi[0] + eps or min(tr.ys) < lo[1] - eps or max(tr.ys) > hi[1] + eps:
            raise _Retry
        seen = [t for t in sampled if tr.start <= t < tr.end]
        if len(seen) < 2:
            raise _Retry
        if tr.role == "mover":  # direction readable from the sampled frames: it travels >= its own size
            i, j = seen[0] - tr.start, seen[-1] - tr.start
            if math.hypot(tr.xs[j] - tr.xs[i], tr.ys[j] - tr.ys[i]) < arena.size:
                raise _Retry
        if tr.change_at is not None:  # two samples of each colour
            if sum(t < tr.change_at for t in seen) < 2 or sum(t >= tr.change_at for t in seen) < 2:
                raise _Retry
        if tr.bounce_at is not None:  # two samples on each side of the bounce, moving visibly
            before = [t for t in seen if t < tr.bounce_at - 1]
            after = [t for t in seen if t > tr.bounce_at + 1]
            if len(before) < 2 or len(after) < 2:
                raise _Retry
    tracks = scene.tracks
    for tr in tracks:  # what a bouncer hits is there well before the contact
        hit = next((o for o in tracks if o.name == tr.cause), None)
        if hit is not None and not hit.start <= tr.bounce_at - 6:
            raise _Retry
    for i in range(len(tracks)):
        for j in range(i + 1, len(tracks)):
            a, b = tracks[i], tracks[j]
            designed = a.cause == b.name or b.cause == a.name
            gap = 0.0 if designed else 6.0  # undesigned objects never come close enough to look like a hit
            for t in range(max(a.start, b.start), min(a.end, b.end)):
                dx = abs(a.xs[t - a.start] - b.xs[t - b.start])
                dy = abs(a.ys[t - a.start] - b.ys[t - b.start])
                if dx < arena.size + gap - 1e-6 and dy < arena.size + gap - 1e-6:
                    raise _Retry


def plan_clip(seed: int, index: int, *, arena: Arena, num_frames: int = 32, frames_hint: int = 8) -> ClipPlan:
    """Draw the answers of clip `index` of split `seed`, then a geometry that shows them."""
    rng = np.random.default_rng([seed, index])
    T = num_frames
    sampled = np.linspace(0, T - 1, frames_hint).astype(int)
    block, slot = divmod(index, len(_BLOCK))
    shuffle = np.random.default_rng([seed, block, 2])
    count, two_scenes, direction, cause = _BLOCK[shuffle.permutation(len(_BLOCK))[slot]]
    order_swap = bool(shuffle.permutation(len(_BLOCK))[slot] % 2)  # which of the pair the question names first
    colors = [str(c) for c in rng.permutation(list(COLORS))[:count]]
    shapes = [str(rng.choice(SHAPES)) for _ in range(count)]
    spare = str(rng.permutation([c for c in COLORS if c not in colors])[0])  # what a still object may turn
    backgrounds = [str(b) for b in rng.permutation(list(BACKGROUNDS))[:2]]
    for _ in range(_MAX_DRAWS):
        try:
            if two_scenes:
                scenes, targets = _two_scenes(rng, arena, T, sampled, colors, shapes, backgrounds, direction,
                                              spare)
            else:
                scenes, targets = _one_scene(rng, arena, T, sampled, colors, shapes, backgrounds[0], direction,
                                             cause, spare)
        except _Retry:
            continue
        targets["count"] = count
        targets["order_swap"] = order_swap
        return ClipPlan(index=index, seed=seed, num_frames=T, scenes=scenes, targets=targets)
    raise RuntimeError(f"synth: no geometry shows the planned answers of clip {index} of seed {seed} after "
                       f"{_MAX_DRAWS} draws (num_frames={num_frames}, frames_hint={frames_hint})")


def _one_scene(rng, arena, T, sampled, colors, shapes, background, direction, cause, spare):
    k = len(colors)
    if k == 1:
        roles = ["mover"]
    elif k == 2:
        roles = ["mover", "bouncer"] if cause == "wall" else ["bouncer", "partner"]
    else:
        roles = ["mover", "bouncer", "still" if cause == "wall" else "partner"]
    order = rng.permutation(k)
    tracks = []
    for i in range(k):
        start = 0 if order[i] == 0 else int(rng.choice([0, rng.integers(T // 6, T // 3 + 1)]))  # appears later
        end = T
        if roles[i] in ("mover", "still") and rng.random() < 0.3:
            end = int(rng.integers(T - T // 3, T - T // 6 + 1))  # disappears
        tracks.append(Track(colors[i], shapes[i], roles[i], start, end))
    tb = int(rng.integers(T // 2 - 3, T // 2 + 4))
    partner = next((t for t in tracks if t.role == "partner"), None)
    for tr in tracks:
        if tr.role == "mover":
            _place_mover(rng, arena, tr, direction)
        elif tr.role == "still":
            _place_still(rng, arena, tr, spare)
        elif tr.role == "bouncer":
            _place_bounce(rng, arena, tr, partner, tb)
    scene = Scene(0, T, background, tracks)
    _check(arena, scene, sampled)
    targets: dict[str, Any] = {}
    mover = next((t for t in tracks if t.role == "mover"), None)
    if mover is not None:
        targets["direction"] = (mover.name, direction)
    bouncer = next((t for t in tracks if t.role == "bouncer"), None)
    if bouncer is not None:
        hit = "it hit the wall" if bouncer.cause == "wall" else f"it hit the {bouncer.cause}"
        targets["cause"] = (bouncer.name, hit)
    targets["order"] = _order_pair(rng, tracks, sampled)
    return [scene], targets


def _two_scenes(rng, arena, T, sampled, colors, shapes, backgrounds, direction, spare):
    cut = int(rng.integers(T // 2 - 3, T // 2 + 4))
    n1 = 1 if len(colors) == 2 else int(rng.integers(1, 3))
    spans = [(0, cut), (cut, T)]
    who = int(rng.integers(len(colors)))  # the object the direction question asks about
    scenes = []
    for si, (a, b) in enumerate(spans):
        idx = range(0, n1) if si == 0 else range(n1, len(colors))
        tracks = []
        for i in idx:
            moving = i == who or rng.random() < 0.6
            tr = Track(colors[i], shapes[i], "mover" if moving else "still", a, b)
            if moving:
                _place_mover(rng, arena, tr, direction if i == who else str(rng.choice(DIRECTIONS)))
            else:
                _place_still(rng, arena, tr, spare)
                spare = None if tr.new_color else spare  # one colour change per clip at most
            tracks.append(tr)
        scene = Scene(a, b, backgrounds[si], tracks)
        _check(arena, scene, sampled)
        scenes.append(scene)
    all_tracks = [t for s in scenes for t in s.tracks]
    targets = {"direction": (all_tracks[who].name, direction),
               "order": _order_pair(rng, all_tracks, sampled)}
    return scenes, targets


def _order_pairs(tracks: list[Track], sampled) -> list[tuple[str, str]]:
    """Every (first, second) pair whose appearances are told apart by a sampled frame."""
    return [(a.name, b.name) for a in tracks for b in tracks
            if a.start < b.start and any(a.start <= t < a.end and t < b.start for t in sampled)]


def _order_pair(rng, tracks: list[Track], sampled) -> Optional[tuple[str, str]]:
    """(first, second): one such pair, drawn, or None."""
    pairs = _order_pairs(tracks, sampled)
    if not pairs:
        return None
    return pairs[int(rng.integers(len(pairs)))]


# --------------------------------------------------------------------------------------------- rendering
def _masks(size: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    return {
        "square": np.ones((size, size), bool),
        "circle": (xx - c) ** 2 + (yy - c) ** 2 <= c * c,
        "triangle": np.abs(xx - c) <= yy / 2,  # apex up, base at the bottom
    }


def render_frames(plan: ClipPlan, arena: Arena, width: int, height: int, only: set[int] | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB frames of a plan (with `only`, a set of frame indices: just those, the rest black)."""
    frames = np.zeros((plan.num_frames, height, width, 3), np.uint8) if only is not None else \
        np.empty((plan.num_frames, height, width, 3), np.uint8)
    masks = _masks(arena.size)
    x0, y0, s, w = arena.x0, arena.y0, arena.side, arena.wall
    for scene in plan.scenes:
        base = np.empty((height, width, 3), np.uint8)
        base[:] = BACKGROUNDS[scene.background]
        base[y0:y0 + s, x0:x0 + s] = WALL_RGB
        base[y0 + w:y0 + s - w, x0 + w:x0 + s - w] = BACKGROUNDS[scene.background]
        for t in range(scene.start, scene.end):
            if only is not None and t not in only:
                continue
            f = frames[t]
            f[:] = base
            for tr in scene.tracks:
                if not tr.start <= t < tr.end:
                    continue
                cx, cy = tr.xs[t - tr.start], tr.ys[t - tr.start]
                left, top = int(round(cx - arena.size / 2)), int(round(cy - arena.size / 2))
                region = f[top:top + arena.size, left:left + arena.size]
                region[masks[tr.shape]] = COLORS[tr.color_at(t)]
    return frames


# --------------------------------------------------------------------------------------------- language
def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _verb(tr: Track) -> str:
    if tr.role == "mover":
        return f"moves {tr.direction}"
    if tr.role == "bouncer":
        where = "the wall" if tr.cause == "wall" else f"the {tr.cause}"
        return f"bounces off {where}"
    if tr.role == "partner" and tr.direction is not None:
        return f"moves {tr.direction} and bounces back"
    return f"turns {tr.new_color}" if tr.new_color else "stays still"


def scene_caption(scene: Scene) -> str:
    objs = _join([f"a {tr.name} {_verb(tr)}" for tr in sorted(scene.tracks, key=lambda t: t.start)])
    return f"{objs} on a {scene.background} background"


def describe(plan: ClipPlan) -> str:
    """A long description: what is there and every event, in time order."""
    out = []
    for si, scene in enumerate(plan.scenes):
        out.append(("The video shows" if si == 0 else "Then the scene cuts to")
                   + f" a walled {scene.background} arena.")
        present = [f"a {tr.name}" for tr in scene.tracks if tr.start == scene.start]
        out.append(f"At the start there {'is' if len(present) == 1 else 'are'} {_join(present)}.")
        events: list[tuple[int, int, str]] = []  # (frame, tie-break, sentence)
        for k, tr in enumerate(scene.tracks):
            if tr.start > scene.start:
                events.append((tr.start, k, f"Then a {tr.name} appears."))
            if tr.direction is not None:
                events.append((tr.start, 10 + k, f"The {tr.name} moves {tr.direction}."))
            else:
                events.append((tr.start, 10 + k, f"The {tr.name} stays still."))
            if tr.new_color:
                events.append((tr.change_at, 20 + k, f"The {tr.name} turns {tr.new_color}."))
            if tr.bounce_at is not None:
                hit = tr.cause or next(o.name for o in scene.tracks if o.cause == tr.name)  # a moving partner
                what = "the wall" if hit == "wall" else f"the {hit}"
                events.append((tr.bounce_at, 20 + k,
                               f"The {tr.name} hits {what} and goes back {_OPPOSITE[tr.direction]}."))
            if tr.end < scene.end:
                events.append((tr.end, 30 + k, f"The {tr.name} disappears."))
        out += [s for _, _, s in sorted(events)]
    return " ".join(out)


# family, question, answer, choices (short answers only), the objects the question names
_QA = tuple[str, str, str, Optional[list[str]], tuple[str, ...]]


def clip_records(plan: ClipPlan, video: str, *, extra: bool = False, frames_hint: int = 8) -> list[dict[str, Any]]:
    """The instruction records of one clip (one QA pair each), in TASK_FAMILIES order where applicable.

    extra: also ask the direction of every other mover and the order of every other pair the sampled
    frames (`frames_hint` of them) tell apart (for training data: more supervision per decoded clip).
    The records of the drawn questions are the same either way."""
    rng = np.random.default_rng([plan.seed, plan.index, 1])  # question wording; separate from the geometry
    tg = plan.targets
    names = [t.name for t in plan.tracks]
    qa: list[_QA] = []
    caption = " ".join(f"Scene {i + 1}: {scene_caption(s)}." for i, s in enumerate(plan.scenes))
    qa.append(("multi_shot_caption", _pick(rng, "multi_shot_caption"), caption, None, ()))
    qa.append(("long_description", _pick(rng, "long_description"), describe(plan), None, ()))
    if "direction" in tg:
        obj, d = tg["direction"]
        qa.append(("action", _pick(rng, "action", obj=obj), d, list(DIRECTIONS), (obj,)))
    if "cause" in tg:
        obj, ans = tg["cause"]
        choices = ["it hit the wall"] + [f"it hit the {n}" for n in names if n != obj]
        qa.append(("causal", _pick(rng, "causal", obj=obj), ans, choices, (obj,)))
    qa.append(("counting", _pick(rng, "counting"), NUMBER_WORDS[tg["count"]], list(NUMBER_WORDS[1:4]), ()))
    if tg.get("order"):
        first, second = tg["order"]
        a, b = (second, first) if tg["order_swap"] else (first, second)
        qa.append(("order", _pick(rng, "order", a=a, b=b), f"the {first}", [f"the {a}", f"the {b}"], (a, b)))
    if extra:
        qa += _extra_questions(plan, rng, frames_hint)
    stem = Path(video).stem
    records, seen = [], {}
    tracks = {t.name: t for t in plan.tracks}
    for family, q, ans, choices, asked in qa:
        seen[family] = seen.get(family, 0) + 1
        rec: dict[str, Any] = {
            "id": f"{stem}-{family}" + (f"{seen[family]}" if seen[family] > 1 else ""),
            "video": video,
            "task": family,
            "short": family in SHORT_FAMILIES,
            "conversations": [{"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": ans}],
        }
        if choices is not None:
            rec["choices"] = choices
        if family in SHORT_FAMILIES:
            rec["distractor"] = _has_distractor(family, asked, ans, tracks)
        records.append(rec)
    return records


def _has_distractor(family: str, asked: tuple[str, ...], answer: str, tracks: dict[str, Track]) -> bool:
    """Whether another object would answer the same question differently, so the answer needs the
    object(s) the question names picked out of the video (not just "the object that moves / came
    first / turned back"):
    action: another object moves the other way or across (a bouncer by its first leg);
    order: an object outside the pair is already there when the earlier of the pair appears;
    causal: another object turns back too; counting: never."""
    named = [tracks[n] for n in asked]
    others = [t for n, t in tracks.items() if n not in asked]
    if family == "action":
        return any(t.direction is not None and t.direction != answer for t in others)
    if family == "order":
        return any(t.start <= min(n.start for n in named) for t in others)
    if family == "causal":
        return any(t.bounce_at is not None for t in others)
    return False


def _extra_questions(plan: ClipPlan, rng, frames_hint: int) -> list[_QA]:
    tg, qa = plan.targets, []
    asked = tg.get("direction", (None,))[0]
    for tr in plan.tracks:
        if tr.role == "mover" and tr.name != asked:
            qa.append(("action", _pick(rng, "action", obj=tr.name), tr.direction, list(DIRECTIONS), (tr.name,)))
    sampled = np.linspace(0, plan.num_frames - 1, frames_hint).astype(int)
    for first, second in _order_pairs(plan.tracks, sampled):
        if (first, second) != tuple(tg.get("order") or ()):
            a, b = (second, first) if rng.random() < 0.5 else (first, second)
            qa.append(("order", _pick(rng, "order", a=a, b=b), f"the {first}", [f"the {a}", f"the {b}"], (a, b)))
    return qa


def _pick(rng, family: str, **names: str) -> str:
    templates = QUESTIONS[family]
    return templates[int(rng.integers(len(templates)))].format(**names)


# --------------------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class _Job:
    out_dir: str
    seed: int
    width: int
    height: int
    fps: int
    num_frames: int
    frames_hint: int
    resize_short: int
    crop: int
    extra_questions: bool = False


def _make_clip(job: _Job, index: int) -> tuple[list[dict[str, Any]], str]:
    arena = make_arena(job.width, job.height, resize_short=job.resize_short, crop=job.crop)
    plan = plan_clip(job.seed, index, arena=arena, num_frames=job.num_frames, frames_hint=job.frames_hint)
    video = f"s{job.seed}_{index:05d}.mp4"
    write_mp4(Path(job.out_dir) / "videos" / video, render_frames(plan, arena, job.width, job.height), job.fps)
    return clip_records(plan, video, extra=job.extra_questions, frames_hint=job.frames_hint), plan.content_hash()


def _make_range(args: tuple[_Job, int, int]) -> list[tuple[list[dict[str, Any]], str]]:
    job, lo, hi = args
    return [_make_clip(job, i) for i in range(lo, hi)]


def answer_counts(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per short-answer family: how often each (normalized) answer occurs."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r["short"]:
            fam = out.setdefault(r["task"], {})
            key = normalize_answer(r["conversations"][-1]["value"])
            fam[key] = fam.get(key, 0) + 1
    return {f: dict(sorted(c.items())) for f, c in sorted(out.items())}


def map_ranges(fn: Callable[[tuple[Any, int, int]], list], job: Any, n: int, workers: int) -> list:
    """fn((job, a, b)) -> one result per index in [a, b), over 0..n-1 in `workers` processes; the results in
    index order, the same for any `workers`.

    The workers are spawned, not forked: a recipe runs this after torch has run in the process (its test
    split, phase 0's clips), and forked workers can hang there (on a lock a torch thread held at the fork;
    phase 0's did, in the test suite). A spawned worker re-imports the main script, so a main read from
    stdin (no file) runs in this process instead; a worker that dies raises (BrokenProcessPool), never hangs.
    """
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers <= 1 or n < 8 or (main is not None and not os.path.isfile(main)):
        return fn((job, 0, n))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    chunks = [(job, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return [r for part in pool.map(fn, chunks) for r in part]


def _is_synth_folder(folder: Path) -> bool:
    """A dataset folder written by synth before folders carried valley-rt's marker file."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "clip_hashes" in meta and (folder / "data.json").is_file()


def generate(out_dir: str | os.PathLike, *, n: int, seed: int, width: int = 128, height: int = 96, fps: int = 10,
             num_frames: int = 32, frames_hint: int = 8, resize_short: int = 73, crop: int = 64,
             workers: int = 1, extra_questions: bool = False) -> dict[str, Any]:
    """Write `out_dir/videos/*.mp4`, `out_dir/data.json` (records) and `out_dir/meta.json`; return the meta
    plus timing (`seconds`, `clips_per_s`). Output depends only on the arguments, not on `workers`.
    extra_questions: see clip_records (training data; evaluation splits keep one question per family)."""
    if n < 1:
        raise DataError(f"synth: --n must be >= 1, got {n}")
    if width % 2 or height % 2:
        raise DataError(f"synth: yuv420p needs an even frame size, got {width}x{height}")
    if not 2 <= frames_hint <= num_frames:
        raise DataError(f"synth: --frames-hint must be in [2, num_frames={num_frames}], got {frames_hint}")
    if fps < 1:
        raise DataError(f"synth: fps must be >= 1, got {fps}")
    make_arena(width, height, resize_short=resize_short, crop=crop)  # validate the size up front
    from valley_rt.outdir import claim_folder

    out = claim_folder(out_dir, kind="synth", legacy=_is_synth_folder)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    from valley_rt.train.evaluate import chance_accuracy

    job = _Job(str(out), seed, width, height, fps, num_frames, frames_hint, resize_short, crop, extra_questions)
    t0 = time.perf_counter()
    results = map_ranges(_make_range, job, n, workers)
    records = [r for recs, _ in results for r in recs]
    seconds = time.perf_counter() - t0
    families = {f: sum(r["task"] == f for r in records) for f in TASK_FAMILIES}
    meta = {
        "seed": seed, "n": n, "records": len(records), "width": width, "height": height, "fps": fps,
        "num_frames": num_frames, "frames_hint": frames_hint, "resize_short": resize_short, "crop": crop,
        "extra_questions": extra_questions,
        "families": families,
        "short_families": list(SHORT_FAMILIES), "temporal_families": list(TEMPORAL_FAMILIES),
        "video_dir": "videos", "chance": chance_accuracy(records), "answers": answer_counts(records),
        "clip_hashes": [h for _, h in results],
    }
    (out / "data.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {**meta, "seconds": round(seconds, 3), "clips_per_s": round(n / seconds, 2)}
