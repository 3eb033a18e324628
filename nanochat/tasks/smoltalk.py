"""SmolTalk (HF `HuggingFaceTB/smol-smoltalk`, split train | test): general chat conversations for SFT.

Train has about 460K conversations, test about 24K. There is no evaluation rule (no eval_type).
"""

from nanochat.tasks.common import Task, load_hub_dataset


class SmolTalk(Task):
    def __init__(self, split: str, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.ds = load_hub_dataset("HuggingFaceTB/smol-smoltalk", split=split).shuffle(seed=42)
        self.length = len(self.ds)

    def num_examples(self) -> int:
        return self.length

    def get_example(self, index: int) -> dict:
        messages = self.ds[index]["messages"]
        # an optional system message, then strictly alternating user/assistant turns with string content
        turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
        assert len(turns) >= 2, f"SmolTalk conversation {index} has fewer than 2 turns"
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            assert message["role"] == expected, f"turn {i} of conversation {index} is {message['role']}, not {expected}"
            assert isinstance(message["content"], str), f"turn {i} of conversation {index} has non-string content"
        return {"messages": messages}
