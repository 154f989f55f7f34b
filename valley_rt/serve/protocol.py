"""The wire format: pydantic models mirroring the OpenAI chat-completions schema field for field.

Requests are strict (`extra="forbid"`): a misspelt or unknown field is a 400 naming it, not silently
ignored. Fields of the OpenAI schema that valley-rt parses but cannot honour (n > 1, logprobs, tools,
penalties, ...) are refused by `check_supported` with a 400 naming the field. Video parts follow the
convention vLLM, SGLang and trtllm-serve share (`{"type": "video_url", "video_url": {"url": ...}}`);
per-request frame sampling goes through vLLM's `media_io_kwargs` ({"video": {"num_frames": N}} or
{"video": {"fps": F}}) or the extra top-level fields `num_frames` / `fps`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- request ---------------------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: str


class URL(Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None  # image_url's field; accepted, unused


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: URL


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: URL


ContentPart = Annotated[Union[TextPart, VideoPart, ImagePart], Field(discriminator="type")]


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]


class StreamOptions(Strict):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None


class VideoIO(Strict):
    num_frames: Optional[int] = Field(None, ge=1)
    fps: Optional[float] = Field(None, gt=0)


class MediaIO(Strict):
    video: Optional[VideoIO] = None


class ChatCompletionRequest(Strict):
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    # sampling
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI fields parsed but only accepted at their neutral value (check_supported)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    service_tier: Optional[str] = None
    # OpenAI bookkeeping fields: accepted, ignored
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    # vLLM-style extras
    top_k: Optional[int] = Field(None, ge=0)
    ignore_eos: Optional[bool] = None  # generate exactly max_tokens (no eos, no template "###" stop): benchmarks
    media_io_kwargs: Optional[MediaIO] = None
    num_frames: Optional[int] = Field(None, ge=1)
    fps: Optional[float] = Field(None, gt=0)

    def check_supported(self) -> None:
        """Raise ValueError naming a field whose value valley-rt cannot honour."""
        if self.n not in (None, 1):
            raise UnsupportedField("n", f"n={self.n}: only n=1 is supported")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise UnsupportedField(name, f"{name} is not supported (only 0)")
        if self.logprobs or self.top_logprobs:
            raise UnsupportedField("logprobs", "logprobs are not supported")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")
        if self.tools or self.tool_choice not in (None, "none"):
            raise UnsupportedField("tools", "tool calls are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise UnsupportedField("response_format", "only response_format {'type': 'text'} is supported")
        if self.modalities and set(self.modalities) - {"text"}:
            raise UnsupportedField("modalities", "only the text output modality is supported")
        if self.audio or self.prediction:
            raise UnsupportedField("audio" if self.audio else "prediction", "audio output and predicted outputs are not supported")
        v = self.media_io_kwargs.video if self.media_io_kwargs else None
        frames = [x for x in (self.num_frames, v.num_frames if v else None) if x is not None]
        fps = [x for x in (self.fps, v.fps if v else None) if x is not None]
        if len(set(frames)) > 1 or len(set(fps)) > 1:
            raise UnsupportedField("num_frames", "num_frames / fps given twice with different values")

    @property
    def sampling_frames(self) -> tuple[Optional[int], Optional[float]]:
        """(num_frames, fps) asked for, from media_io_kwargs or the top-level extras."""
        v = self.media_io_kwargs.video if self.media_io_kwargs else None
        frames = self.num_frames if self.num_frames is not None else (v.num_frames if v else None)
        fps = self.fps if self.fps is not None else (v.fps if v else None)
        return frames, fps

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class UnsupportedField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# -- responses -------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[dict[str, int]] = None  # {"cached_tokens": N}: reused KV prefix


class ResponseMessage(Open):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None


class Choice(Open):
    index: int = 0
    message: ResponseMessage
    finish_reason: Optional[Literal["stop", "length", "content_filter", "tool_calls"]] = None
    logprobs: Optional[Any] = None


class ChatCompletion(Open):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class Delta(Open):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(Open):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length", "content_filter", "tool_calls"]] = None
    logprobs: Optional[Any] = None


class ChatCompletionChunk(Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(Open):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "valley-rt"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(Open):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(Open):
    error: ErrorInfo
