"""Letter counting ("How many r in strawberry?") and plain spelling, as generated chat tasks.

Each example is generated from `random.Random(seed)` with seed = index (train) or 10,000,000 + index (test), so
train and test never share a seed. The reference answer spells the word, counts by hand, double-checks with a
python tool call (`'word'.count('l')`) and ends with `#### n`; scoring is GSM8K's `####` rule.

The word list (370K English words) is downloaded once to the local cache as `words_alpha.txt`; set
NANOCHAT_WORD_LIST_URL to fetch it from elsewhere (tests serve it on loopback).
"""

import os
import random

from nanochat.common import download_file_with_lock
from nanochat.tasks.common import Task
from nanochat.tasks.gsm8k import extract_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
TEST_RANDOM_SEED_OFFSET = 10_000_000  # larger than the word list, so train and test seeds never overlap

# User phrasings (data augmentation), several languages. The order matters: examples index into it by seed.
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]


def load_words() -> list[str]:
    path = download_file_with_lock(os.environ.get("NANOCHAT_WORD_LIST_URL", WORD_LIST_URL), "words_alpha.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def _seed(split: str, index: int) -> int:
    return index if split == "train" else TEST_RANDOM_SEED_OFFSET + index


class SpellingBee(Task):
    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be train or test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words()

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(_seed(self.split, index))
        # the draw order below is part of the data format: changing it changes every example
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        user_msg = template.format(
            letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}"
        )
        if rng.random() < 0.5:
            user_msg += "?"
        return {
            "messages": [
                {"role": "user", "content": user_msg},
                {"role": "assistant", "content": self._answer_parts(word, letter, count)},
            ]
        }

    @staticmethod
    def _answer_parts(word: str, letter: str, count: int) -> list[dict]:
        manual = (
            f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of '{letter}':\n"
        )
        running = 0
        for position, char in enumerate(word, 1):
            if char == letter:
                running += 1
                manual += f"{position}:{char} hit! count={running}\n"  # no space before char: " a" != "a" as tokens
            else:
                manual += f"{position}:{char}\n"
        manual += f"\nThis gives us {running}."
        return [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        assert isinstance(assistant_response, str), "completions are scored as plain strings"
        reference = conversation["messages"][-1]["content"][-1]["text"]
        return int(extract_answer(assistant_response) == extract_answer(reference))

    def reward(self, conversation: dict, assistant_response: str) -> float:
        return float(self.evaluate(conversation, assistant_response))


class SimpleSpelling(Task):
    """'Spell the word: w' -> 'w:w,o,r,d', over the word list shuffled with Random(42)."""

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SimpleSpelling split must be train or test, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words()
        random.Random(42).shuffle(self.words)

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        word = random.Random(_seed(self.split, index)).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ]
        }
