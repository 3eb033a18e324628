"""ARC (AI2 Reasoning Challenge), Easy and Challenge sets, as 4-way (sometimes 3/5-way) categorical chat tasks.

Data: HF `allenai/ai2_arc`, subset ARC-Easy | ARC-Challenge, split train | validation | test.
"""

from nanochat.tasks.common import Task, load_hub_dataset, render_mc


class ARC(Task):
    def __init__(self, subset: str, split: str, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        self.ds = load_hub_dataset("allenai/ai2_arc", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self) -> str:
        return "categorical"

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        letters = row["choices"]["label"]  # usually A-D, a few rows use 1-4 or have 3/5 choices
        answer = row["answerKey"]
        assert answer in letters, f"ARC answer {answer!r} not among {letters}"
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,  # categorical eval restricts the logits to these tokens
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> bool:
        assert assistant_response in conversation["letters"], f"{assistant_response!r} is not one of the choices"
        return assistant_response == conversation["messages"][-1]["content"]
