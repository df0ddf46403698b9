"""Token generation: `prefill` (the whole prompt, once) and `decode_one_token` (one new
token per row from the KV cache), sampling, and a streaming token iterator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .cogvlm import Cache, CogVLM


@dataclass
class GenerationConfig:
    """Defaults of the original demos: top_k=1 makes decoding greedy."""
    max_length: int = 2048                  # TOTAL length, image tokens included (as the original)
    max_new_tokens: Optional[int] = None    # extra cap on generated tokens
    temperature: float = 0.8
    top_p: float = 0.4
    top_k: int = 1
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature < MIN_TEMPERATURE or self.top_p <= 0


# Below this temperature sampling is greedy: it is greedy in effect, and 1/T would overflow.
MIN_TEMPERATURE = 1e-5


class PromptTooLong(ValueError):
    pass


@dataclass
class ModelInputs:
    """A batch ready for the model (rows left-padded to one length)."""
    input_ids: torch.Tensor                      # B,T
    position_ids: torch.Tensor                   # B,T
    vision_mask: torch.Tensor                    # B,T bool: vision expert (boi + patches)
    image_mask: torch.Tensor                     # B,T bool: image slots (boi + patches + eoi)
    image_embeds: Optional[torch.Tensor] = None  # n_img, L+2, hidden (rows with slots, in order)
    cross_kv: Optional[list] = None              # CogAgent: per layer (k, v), B rows
    cross_rows: Optional[torch.Tensor] = None    # B bool: rows with an image (CogAgent)
    pad_mask: Optional[torch.Tensor] = None      # B,T bool, False = left padding


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: B,V; seen: B,N token ids. Positive logits are divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def sample(logits: torch.Tensor, gen: GenerationConfig, generator=None) -> torch.Tensor:
    """logits: B,V -> B token ids. Greedy when top_k == 1, temperature <= 0 or top_p <= 0
    (SAT's convention for top_p = 0)."""
    if gen.greedy:
        return logits.argmax(-1)
    # Shifted so that the largest logit is 0 before dividing: every value stays <= 0, so no
    # temperature can turn it into inf (a tiny one sends the others to -inf, i.e. greedy).
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > gen.top_p          # keep the smallest set above top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def prefill(model: CogVLM, inputs: ModelInputs, cache: Cache) -> torch.Tensor:
    """Run the prompt, fill the cache; returns the last position's logits, B,V."""
    if inputs.pad_mask is not None:
        cache.pad_mask = torch.ones(cache.k[0].shape[0], cache.max_len, dtype=torch.bool,
                                    device=inputs.pad_mask.device)
        cache.pad_mask[:, : inputs.pad_mask.shape[1]] = inputs.pad_mask
    cache.cross_kv, cache.cross_rows = inputs.cross_kv, inputs.cross_rows
    logits = model(inputs.input_ids, inputs.position_ids, vision_mask=inputs.vision_mask,
                   image_embeds=inputs.image_embeds, image_mask=inputs.image_mask, cache=cache,
                   last_only=True)
    cache.next_position = inputs.position_ids[:, -1] + 1
    return logits[:, -1]


def forward_one_token(model: CogVLM, tokens: torch.Tensor, positions: torch.Tensor, cache,
                      cross_kv=None, cross_rows=None, pad_mask=None, attn_mask=None) -> torch.Tensor:
    """The model's forward for one new text token per row (what `--compile` compiles, see
    models/compile.py): tokens B, positions B,1 -> logits B,V. Writes K/V at slot
    cache.get_seq_length(); the caller advances the cache."""
    h = model.model(tokens[:, None], positions, cache=cache, cross_kv=cross_kv, cross_rows=cross_rows,
                    pad_mask=pad_mask, attn_mask=attn_mask)
    return model.lm_head(h[:, -1])


def decode_one_token(model: CogVLM, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    """tokens: B new text tokens -> logits B,V. Positions continue from the last position
    + 1 (not from the slot index: an image takes many slots but 3 positions). Runs the
    model's compiled step when models.compile.compile_decode gave it one."""
    if cache.length >= cache.max_len:              # checked here: a compiled step cannot raise it
        raise ValueError(f"KV cache holds {cache.max_len} tokens; cannot add one more")
    step = getattr(model, "decode_step", None) or forward_one_token
    logits = step(model, tokens, cache.next_position[:, None], cache, cache.cross_kv, cache.cross_rows,
                  cache.pad_mask)
    cache.length += 1
    cache.next_position = cache.next_position + 1
    return logits


def token_budget(prompt_len: int, image_tokens: int, gen: GenerationConfig, model_max: int,
                 length_flag: Optional[str] = "--max_length") -> int:
    """How many tokens may be generated; raises PromptTooLong naming the limit that applied
    and a remedy the app has (length_flag: how this app sets max_length, None if it cannot)."""
    limit = min(gen.max_length, model_max)
    budget = limit - prompt_len
    if gen.max_new_tokens is not None:
        budget = min(budget, gen.max_new_tokens)
    if prompt_len >= limit:
        what = f"the prompt is {prompt_len} tokens ({image_tokens} of them image tokens)"
        if gen.max_length < model_max:
            raise PromptTooLong(
                f"{what} but the total length limit (max_length) is {gen.max_length}; shorten the "
                f"question or clear the history" + (f", or raise {length_flag} (the model allows "
                                                    f"{model_max})" if length_flag else ""))
        raise PromptTooLong(f"{what} but the model's maximum length is {model_max} tokens; shorten "
                            f"the question or clear the history")
    return max(budget, 0)


@torch.inference_mode()
def generate_tokens(model: CogVLM, inputs: ModelInputs, gen: GenerationConfig, eos_token_id: int,
                    max_new_tokens: int) -> Iterator[torch.Tensor]:
    """Yield one B-vector of new token ids per step until every row has produced EOS or the
    budget is spent. Finished rows keep yielding EOS."""
    B, T = inputs.input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = Cache.allocate(model.config, B, T + max_new_tokens, dtype, inputs.input_ids.device,
                           heads=model.num_kv_heads)
    generator = None
    if gen.seed is not None:
        generator = torch.Generator(device=inputs.input_ids.device).manual_seed(gen.seed)
    seen = inputs.input_ids.masked_fill(inputs.image_mask, inputs.input_ids[0, 0].item())
    done = torch.zeros(B, dtype=torch.bool, device=inputs.input_ids.device)
    logits = prefill(model, inputs, cache)
    for step in range(max_new_tokens):
        logits = apply_repetition_penalty(logits, seen, gen.repetition_penalty)
        tok = sample(logits, gen, generator)
        tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
        done |= tok == eos_token_id
        yield tok
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        if gen.repetition_penalty != 1.0:
            seen = torch.cat([seen, tok[:, None]], dim=1)
        logits = decode_one_token(model, tok, cache)
