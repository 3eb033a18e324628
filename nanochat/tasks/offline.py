"""Generated chat tasks that need no network: the offline SFT mixture and its held-out evaluation.

- WordChoice (categorical, 4 choices, chance 25%): "Which option is the word 'river'?" in MMLU's multiple-choice
  format; the model must copy the matching letter. Teaches the answer format MMLU/ARC use.
- Arithmetic (generative): "What is 37 + 45?" answered with a calculator tool call (`python` / `python_output`
  parts, as GSM8K) and a final `#### 82`; scored with GSM8K's `####` rule.

Examples are generated from `random.Random(seed)`, seed = index for train and 10,000,000 + index for test, so the
splits never share an example seed and every machine generates the same data.
"""

import random

from nanochat.tasks.common import Task, render_mc
from nanochat.tasks.gsm8k import extract_answer

TEST_SEED_OFFSET = 10_000_000
WORDS = (
    "apple", "river", "house", "green", "stone", "cloud", "table", "music", "light", "water", "paper", "chair",
    "bread", "horse", "smile", "plant", "ocean", "tiger", "train", "glass", "earth", "money", "sugar", "night",
    "dream", "heart", "queen", "beach", "storm", "field", "mouse", "piano", "lemon", "robot", "snake", "bottle",
    "garden", "window", "forest", "candle", "rabbit", "silver", "yellow", "winter", "summer", "doctor", "planet",
    "rocket", "pencil", "orange", "castle", "bridge", "butter", "dragon", "flower", "guitar", "island", "jacket",
    "kitten", "ladder",
)  # fmt: skip
LETTERS = ("A", "B", "C", "D")
TEMPLATES = ("Which option is the word '{w}'?", "Pick the choice that says {w}.", "Find '{w}' among the options.",
             "Which answer matches the word {w}?")  # fmt: skip


def _rng(split: str, index: int) -> random.Random:
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    return random.Random(index if split == "train" else TEST_SEED_OFFSET + index)


class WordChoice(Task):
    letters = LETTERS

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        _rng(split, 0)  # validates split
        self.size, self.split = size, split

    @property
    def eval_type(self) -> str:
        return "categorical"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = _rng(self.split, index)
        choices = rng.sample(WORDS, 4)
        answer = rng.randrange(4)
        question = rng.choice(TEMPLATES).format(w=choices[answer])
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, self.letters, choices)},
                {"role": "assistant", "content": self.letters[answer]},
            ],
            "letters": self.letters,
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> bool:
        return assistant_response == conversation["messages"][-1]["content"]


class Arithmetic(Task):
    def __init__(self, size: int = 1000, split: str = "train", max_operand: int = 99, **kwargs):
        super().__init__(**kwargs)
        _rng(split, 0)
        self.size, self.split, self.max_operand = size, split, max_operand

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = _rng(self.split, index)
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        question = rng.choice((f"What is {a} {op} {b}?", f"Compute {a} {word} {b}.", f"{a} {op} {b} = ?"))
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me calculate: "},
                    {"type": "python", "text": f"{a}{op}{b}"},
                    {"type": "python_output", "text": str(result)},
                    {"type": "text", "text": f"\n#### {result}"},
                ]},
            ]
        }  # fmt: skip

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(extract_answer(assistant_response) == reference)

    def reward(self, conversation: dict, assistant_response: str) -> float:
        return float(self.evaluate(conversation, assistant_response))
