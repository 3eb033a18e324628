"""GSM8K grade-school math as a generative chat task with calculator tool calls.

Data: HF `openai/gsm8k`, subset main | socratic, split train | test. Reference answers mark calculator calls as
`<<expr=result>>`; they become `python` / `python_output` parts of the assistant message. The final answer
follows `#### `; scoring compares it (commas stripped) with the same extraction on the model's completion.
"""

import re

from nanochat.tasks.common import Task, load_hub_dataset

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
TOOL_CALL_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(completion: str) -> str | None:
    """The number after '#### ' with thousands separators removed, or None (OpenAI's grade-school-math rule)."""
    match = ANSWER_RE.search(completion)
    return match.group(1).strip().replace(",", "") if match else None


def answer_to_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into text / python / python_output parts at each <<expr=result>> call."""
    parts = []
    for piece in TOOL_CALL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not _:  # no '=' at all: the whole call is the expression, with an empty output
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    def __init__(self, subset: str, split: str, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.ds = load_hub_dataset("openai/gsm8k", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_to_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        assert isinstance(assistant_response, str), "completions are scored as plain strings"
        reference = conversation["messages"][-1]
        assert reference["role"] == "assistant" and isinstance(reference["content"], list)
        ref_num = extract_answer(reference["content"][-1]["text"])  # the last text part holds '#### N'
        return int(extract_answer(assistant_response) == ref_num)

    def reward(self, conversation: dict, assistant_response: str) -> float:
        """RL reward: 1.0 for a correct final answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))
