"""Token generation: `prefill` (the whole prompt, once) and `decode_one_token` (one new
token per row from the KV cache), sampling, and a streaming token iterator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .cogvlm import Cache, CogVLM, ModelInputs  # noqa: F401 - ModelInputs is importable from here too

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


@dataclass
class SamplingState:
    """A batch's sampling state: its seeded generator (None: torch's global RNG) and the
    tokens the repetition penalty looks at (the prompt; image slots never count as seen tokens)."""
    gen: GenerationConfig
    seen: torch.Tensor                              # B,N token ids
    generator: Optional[torch.Generator] = None

    @classmethod
    def start(cls, inputs: ModelInputs, gen: GenerationConfig) -> "SamplingState":
        ids = inputs.input_ids
        generator = None
        if gen.seed is not None:
            generator = torch.Generator(device=ids.device).manual_seed(gen.seed)
        seen = ids if inputs.image_mask is None else ids.masked_fill(inputs.image_mask, ids[0, 0].item())
        return cls(gen, seen, generator)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """logits B,V -> B token ids, remembered for the repetition penalty."""
        logits = apply_repetition_penalty(logits, self.seen, self.gen.repetition_penalty)
        tok = sample(logits, self.gen, self.generator)
        if self.gen.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, tok[:, None]], dim=1)
        return tok


def prefill(model: CogVLM, inputs: ModelInputs, cache: Cache) -> torch.Tensor:
    """Run the prompt into an empty cache, which takes the prompt's sequence state (padding,
    cross K/V, next position); returns the last position's logits, B,V."""
    return model(inputs, cache, last_only=True)[:, -1]


def forward_one_token(model: CogVLM, tokens: torch.Tensor, positions: torch.Tensor, cache,
                      attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's forward for one new text token per row (what `--compile` compiles, see
    models/compile.py): tokens B, positions B,1 -> logits B,V. Writes K/V at slot
    cache.get_seq_length() and reads the sequence state from the cache; the caller advances
    the cache."""
    h = model.model(ModelInputs(tokens[:, None], positions), cache, attn_mask)
    return model.lm_head(h[:, -1])


def decode_one_token(model: CogVLM, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    """tokens: B new text tokens -> logits B,V. Positions continue from the last position
    + 1 (not from the slot index: an image takes many slots but 3 positions). Runs the
    model's compiled step when models.compile.compile_decode gave it one."""
    if cache.length >= cache.max_len:              # checked here: a compiled step cannot raise it
        raise ValueError(f"KV cache holds {cache.max_len} tokens; cannot add one more")
    step = model.runtime.decode_step or forward_one_token
    logits = step(model, tokens, cache.next_position[:, None], cache)
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
    sampling = SamplingState.start(inputs, gen)
    done = torch.zeros(B, dtype=torch.bool, device=inputs.input_ids.device)
    logits = prefill(model, inputs, cache)
    for step in range(max_new_tokens):
        tok = sampling.next_token(logits)
        tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
        done |= tok == eos_token_id
        yield tok
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = decode_one_token(model, tok, cache)
