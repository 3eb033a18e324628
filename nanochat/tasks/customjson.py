"""Conversations from a local JSONL file: one JSON list of `{"role", "content"}` messages per line.

Used for SFT identity data (upstream's `identity_conversations.jsonl`). Lines must alternate user/assistant,
start with the user, have at least two messages and string content.
"""

import json
import os

from nanochat.tasks.common import Task

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


class CustomJSON(Task):
    def __init__(self, filepath: str, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.conversations = []
        if not os.path.exists(filepath):
            # upstream prints a hint and carries on with an empty task; keep that, it only matters for SFT mixes
            print(f"Warning: {filepath} does not exist; this CustomJSON task is empty. To get the identity data run:")
            print(f"  curl -L -o {filepath} {IDENTITY_URL}")
        else:
            with open(filepath, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        self.conversations.append(self._validated(json.loads(line), lineno))
        self.length = len(self.conversations)

    def _validated(self, messages, lineno: int) -> list:
        where = f"{self.filepath}:{lineno}"
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{where}: expected a JSON list of at least 2 messages")
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if not isinstance(message, dict) or message.get("role") != expected:
                raise ValueError(f"{where}: message {i} must have role {expected!r}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: message {i} content must be a string")
        return messages

    def num_examples(self) -> int:
        return self.length

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}
