"""
OpenAI response shapes for the engine's events (see serve.engine_model): chat completions and (legacy)
completions, whole or as SSE chunks, with logprobs, several choices and usage. No I/O here: serve.api feeds events.

    acc = Choices(kind, n_choices, echo)       # kind "chat" | "text"
    acc.add(index, event)                      # start / delta / end events of each choice
    body = acc.response(base)                  # the whole reply (stream false)
    for chunk in acc.chunks(index, event, base): ...    # the SSE chunks for one event (stream true)

Logprobs: chat gives `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}` per choice; completions
give `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` where a top_logprobs dict holds the k most likely
tokens plus the chosen one (so up to k+1, as OpenAI's legacy API). With echo the prompt's tokens come first.
Usage: prompt tokens count once per prompt (not per choice), completion tokens over all choices.
"""

from __future__ import annotations

import json


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_logprob(e: dict) -> dict:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["bytes"]),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e["top"] or []]}


def legacy_logprobs(entries: list[dict], shift: int = 0) -> dict:
    tops = []
    for e in entries:
        if e["top"] is None:
            tops.append(None)
            continue
        top = {t: lp for t, _, lp in e["top"]}
        top.setdefault(e["token"], e["logprob"])
        tops.append(top)
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops, "text_offset": [e["offset"] + shift for e in entries]}


class Choices:
    """The state of every choice of one request, and the OpenAI bodies built from it."""

    def __init__(self, kind: str, n_choices: int, n_per_prompt: int, logprobs: bool):
        self.kind, self.n, self.per_prompt, self.logprobs = kind, n_choices, n_per_prompt, logprobs
        self.text = [""] * n_choices
        self.entries = [[] for _ in range(n_choices)]
        self.echo = [None] * n_choices  # {"text", "logprobs"} from the start event
        self.finish = [None] * n_choices
        self.prompt_tokens = [0] * n_choices
        self.completion_tokens = [0] * n_choices

    # ------------------------------------------------------------------ state

    def add(self, i: int, ev: dict):
        if ev["type"] == "start":
            self.prompt_tokens[i] = ev["prompt_tokens"]
            self.echo[i] = ev.get("echo")
        elif ev["type"] == "delta":
            self.text[i] += ev["text"]
            self.entries[i] += ev.get("logprobs") or []
        elif ev["type"] == "end":
            self.finish[i] = ev["finish_reason"]
            self.completion_tokens[i] = ev["completion_tokens"]

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens[::self.per_prompt])  # choice p*n is the first sample of prompt p
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _shift(self, i: int) -> int:
        return len(self.echo[i]["text"]) if self.echo[i] else 0

    # ------------------------------------------------------------------ whole replies

    def response(self, base: dict) -> dict:
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                        "logprobs": {"content": [chat_logprob(e) for e in self.entries[i]]} if self.logprobs else None,
                        "finish_reason": self.finish[i]} for i in range(self.n)]
            return {**base, "object": "chat.completion", "choices": choices, "usage": self.usage()}
        choices = []
        for i in range(self.n):
            echo = self.echo[i] or {"text": "", "logprobs": []}
            logprobs = None
            if self.logprobs:
                prompt = legacy_logprobs(echo["logprobs"] or [])
                gen = legacy_logprobs(self.entries[i], self._shift(i))
                logprobs = {k: prompt[k] + gen[k] for k in gen}
            choices.append({"index": i, "text": echo["text"] + self.text[i], "logprobs": logprobs,
                            "finish_reason": self.finish[i]})
        return {**base, "object": "text_completion", "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------------ streams

    def chunks(self, i: int, ev: dict, base: dict) -> list[str]:
        """SSE strings for one event of choice i (call add() first)."""
        chat = self.kind == "chat"
        base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

        def choice(**fields):
            return sse({**base, "choices": [{"index": i, **fields}]})

        if ev["type"] == "start":
            if chat:
                return [choice(delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)]
            if self.echo[i]:
                lp = legacy_logprobs(self.echo[i]["logprobs"]) if self.logprobs else None
                return [choice(text=self.echo[i]["text"], logprobs=lp, finish_reason=None)]
            return []
        if ev["type"] == "delta":
            entries = ev.get("logprobs") or []
            if chat:
                lp = {"content": [chat_logprob(e) for e in entries]} if self.logprobs else None
                return [choice(delta={"content": ev["text"]}, logprobs=lp, finish_reason=None)]
            lp = legacy_logprobs(entries, self._shift(i)) if self.logprobs else None
            return [choice(text=ev["text"], logprobs=lp, finish_reason=None)]
        if ev["type"] == "end":
            if chat:
                return [choice(delta={}, logprobs=None, finish_reason=ev["finish_reason"])]
            return [choice(text="", logprobs=None, finish_reason=ev["finish_reason"])]
        return []

    def usage_chunk(self, base: dict) -> str:
        return sse({**base, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                    "choices": [], "usage": self.usage()})
