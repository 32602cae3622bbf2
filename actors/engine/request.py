"""What a caller asks for (validated at the edge) and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MIN_TEMPERATURE = 1e-6  # smallest temperature > 0 that samples (see SamplingParams._zero_or_samplable)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `field` names it (maps to INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return type(self), (self.field, self.message)


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop. Defaults: greedy, 128 tokens, stop at EOS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(128, ge=1, le=1_000_000, description="Most tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False,
                               description=f"0 = greedy; >= {MIN_TEMPERATURE:g} samples from p.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus mass to keep; 1 = off.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS,
                            description="Stop strings; the text ends before them.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end generation.")
    ignore_eos: bool = Field(False, description="Keep generating past the model's EOS token.")

    @field_validator("temperature")
    @classmethod
    def _zero_or_samplable(cls, temperature: float) -> float:
        # p is computed in float32: logits / temperature overflows to inf (and p to NaN) for
        # temperatures near float32's smallest normal number, and a float64 subnormal becomes 0
        if 0.0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return temperature

    @field_validator("stop")
    @classmethod
    def _short_non_empty_stop_strings(cls, stop: list[str]) -> list[str]:
        # every step compares the text's ending with each stop string's prefixes: bounded work
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        return stop

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0.0

    @property
    def seeded_sampling(self) -> bool:
        """Sampled with a seed: the tokens depend on which steps had drafts, so that must not
        depend on timing (reproducible output)."""
        return self.seed is not None and not self.greedy


def make_params(**kwargs) -> SamplingParams:
    """SamplingParams from keyword arguments, raising InvalidRequestError naming the field."""
    try:
        return SamplingParams(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "sampling_params"
        raise InvalidRequestError(loc, err["msg"].removeprefix("Value error, ")) from None


@dataclass(frozen=True)
class SpecStats:
    """Speculation counters of one request.

    drafted:  draft tokens proposed to the verifier
    accepted: draft tokens the verifier kept
    steps:    verification steps (each emits accepted + 1 tokens)
    """

    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """alpha: accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (accepted + the recovered/bonus token)."""
        return 0.0 if not self.steps else (self.accepted + self.steps) / self.steps


@dataclass
class GenerationResult:
    """A finished request."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "stop" (EOS, stop id or stop string)
    stats: SpecStats = field(default_factory=SpecStats)
    elapsed_s: float = 0.0
