"""Stop conditions, checked token by token so nothing past a stop is ever emitted."""

from __future__ import annotations

from specserve.actors.engine.request import SamplingParams


class StopChecker:
    """Decides after each generated token whether the request is finished.

    EOS and stop ids end generation with that token included in `token_ids` (and left out of
    the text). A stop string ends generation at the token that completes it; the text ends
    right before the stop string. `max_tokens` ends with finish reason "length".
    """

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.stop_strings = list(params.stop)
        self._cut: int | None = None  # text length before the stop string, once found
        self._by_id = False  # ended by a stop id / EOS: that token stays out of the text

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # token-id-only models (tests): no text
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check(self, generated: list[int]) -> str | None:
        """Finish reason after the last token of `generated`, or None to go on."""
        if generated[-1] in self.stop_ids:
            self._by_id = True
            return "stop"
        if self.stop_strings and self._find_stop_string(generated):
            return "stop"
        if len(generated) >= self.params.max_tokens:
            return "length"
        return None

    def _find_stop_string(self, generated: list[int]) -> bool:
        text = self._decode(generated)
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self._cut = min(hits)
        return bool(hits)

    def stable_text(self, generated: list[int]) -> str:
        """Text of an unfinished request that later tokens will not change, for streaming.

        Holds back a trailing incomplete UTF-8 character and any ending that could be the
        start of a stop string (it would be cut if the stop string completes).
        """
        text = self._decode(generated).rstrip("\ufffd")
        hold = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        return text[: len(text) - hold]

    def final_text(self, generated: list[int]) -> str:
        """The response text: decoded tokens, cut before a stop string if one ended it."""
        text = self._decode(generated[:-1] if self._by_id else generated)
        return text if self._cut is None else text[: self._cut]
