"""What the UNet (and every ControlNet) is conditioned on, from a request: prompt embeddings through the family's
text encoders, and SDXL's added conditioning (the pooled text embedding, the size and crop ids).

It follows the `encode_prompt` and `_get_add_time_ids` of each family's diffusers pipeline: each text encoder gets
its own tokenizer and prompt (`prompt_2` for the second, falling back to `prompt`; `negative_prompt_2` to
`negative_prompt`, to empty), the hidden states of the family's layer, concatenated across encoders; rows
[negative, positive] under guidance; an absent negative prompt as zeros where the model says so; size and crop ids
the same for both rows. One difference on purpose: `clip_skip` moves the negative prompt's layer too. diffusers
moves only the positive prompt's, so that guidance subtracts states of two different layers (patches to diffusers
call that a bug; AUTOMATIC1111 and ComfyUI skip layers for both prompts).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from .family import ModelFamily
from .models import LoadedModel
from .request import GenerationRequest, RequestError


SIZE_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")


@dataclasses.dataclass(frozen=True)
class Prompts:
    """The fields of a request that the text encoders read."""

    prompt: str
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    clip_skip: int | None = None

    @classmethod
    def of(cls, request: GenerationRequest) -> Prompts:
        return cls(request.prompt, request.negative_prompt, request.prompt_2, request.negative_prompt_2,
                   request.clip_skip)

    def pair(self, encoder: int) -> tuple[str, str]:
        """(negative, positive) text for the family's `encoder`-th text encoder."""
        if encoder == 0:
            return self.negative_prompt or "", self.prompt
        return self.negative_prompt_2 or self.negative_prompt or "", self.prompt_2 or self.prompt


def check_request(request: GenerationRequest, family: ModelFamily, text_layers: Mapping[str, int]) -> None:
    """RequestError for fields a model of this family cannot honour: a second text encoder's prompts or size
    conditioning where it has none, a `clip_skip` beyond its text encoders' depth."""
    fields = (("prompt_2", family.second_prompts), ("negative_prompt_2", family.second_prompts),
              *((name, "time_ids" in family.added_conditioning) for name in SIZE_CONDITIONING))
    for field, honoured in fields:
        if getattr(request, field) is not None and not honoured:
            raise RequestError(field, f"this model ({family.name}) does not take {field}; SDXL models do")
    check_clip_skip(request.clip_skip, family, text_layers)


def check_clip_skip(clip_skip: int | None, family: ModelFamily, text_layers: Mapping[str, int]) -> None:
    most = min(text_layers.values()) - family.skipped_layers - 1
    if clip_skip is not None and not 0 <= clip_skip <= most:
        raise RequestError("clip_skip", f"{clip_skip} is outside [0, {most}] for this model's text encoders")


class TextConditioner:
    """A model's text encoders turning batches of prompts into conditioning tensors, as its family does."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.family = model.family
        self.parts = [(model.engines[part.component], model.tokenizers[part.component],
                       model.text_layers[part.component]) for part in self.family.text_encoders]

    def __call__(self, batch: Sequence[Prompts], guided: bool) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [rows, tokens, width], and "text_embeds": [rows, pooled width] for a family with
        a projected encoder}; rows [negative, positive] per prompt set under guidance, else [positive]."""
        rows = 2 if guided else 1
        hidden, pooled = [], None
        for index, (engine, tokenizer, layers) in enumerate(self.parts):
            texts = [text for prompts in batch for text in prompts.pair(index)[2 - rows:]]
            layer = [layers - self.family.skipped_layers - (prompts.clip_skip or 0) for prompts in batch
                     for _ in range(rows)]
            outputs = engine({"input_ids": self._tokens(tokenizer, texts),
                              "hidden_layer": torch.tensor(layer, device=self.model.device)})
            hidden.append(outputs["hidden_states"])
            pooled = outputs.get("text_embeds", pooled)
        tensors = {"encoder_hidden_states": torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]}
        if pooled is not None:
            tensors["text_embeds"] = pooled
        zeroed = [2 * i for i, prompts in enumerate(batch) if guided and self._zero_negative(prompts)]
        if zeroed:
            tensors = {name: _zero_rows(tensor, zeroed) for name, tensor in tensors.items()}
        return tensors

    def _zero_negative(self, prompts: Prompts) -> bool:
        return prompts.negative_prompt is None and self.model.zero_absent_negative

    def _tokens(self, tokenizer, texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.model.device)


def _zero_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    tensor = tensor.clone()  # an engine's output may be its graph's static buffer
    tensor[rows] = 0
    return tensor


def time_ids(request: GenerationRequest, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's `time_ids` [rows, 6]: original size, crop top-left, target size (defaults: the image's size, 0, 0)."""
    size = (request.height, request.width)
    ids = [*(request.original_size or size), *(request.crops_coords_top_left or (0, 0)), *(request.target_size or size)]
    return torch.tensor([ids] * rows, dtype=dtype, device=device)
