"""Incremental detokenization with stop strings that never leak into streamed text."""

from __future__ import annotations


class Detokenizer:
    """Turns one request's output tokens into text as they arrive.

    Only the tail since the last emitted character is decoded each step (the offsets
    trick of transformers' TextStreamer and vLLM), so a long generation costs linear time.
    Text that could still be the start of a stop string, or an incomplete UTF-8 sequence,
    is held back until it is resolved.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> bool:
        """Append a token; True if a stop string appeared (the text is cut before it)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        old_len = len(self.text)
        self.text += full[len(prefix):]
        self._prefix, self._read = self._read, len(self.ids)
        hits = [at for s in self.stop
                if (at := self.text.find(s, max(0, old_len - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def take(self, final: bool) -> str:
        """Text not yet handed out, minus what a stop string might still claim."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
