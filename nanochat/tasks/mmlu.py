"""MMLU (57 subjects), 4-way multiple choice as a categorical chat task.

Data: HF `cais/mmlu`, subset `all`, split auxiliary_train | validation | dev | test.
"""

from nanochat.tasks.common import Task, load_hub_dataset, render_mc


class MMLU(Task):
    letters = ("A", "B", "C", "D")
    groups = (
        "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
        "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
        "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
        "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_european_history", "high_school_geography",
        "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
        "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
        "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
        "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
        "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
        "prehistory", "professional_accounting", "professional_law", "professional_medicine",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
        "virology", "world_religions",
    )  # fmt: skip

    def __init__(self, subset: str, split: str, **kwargs):
        super().__init__(**kwargs)
        if subset != "all":
            raise ValueError(f"MMLU subset must be 'all', got {subset!r}")
        if split not in ("auxiliary_train", "validation", "dev", "test"):
            raise ValueError(f"MMLU split must be auxiliary_train, validation, dev or test, got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_hub_dataset("cais/mmlu", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self) -> str:
        return "categorical"

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        assert len(row["choices"]) == 4, f"MMLU rows have 4 choices, got {len(row['choices'])}"
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                {"role": "assistant", "content": self.letters[row["answer"]]},  # answer is an index 0..3
            ],
            "subject": row["subject"],
            "letters": self.letters,
        }

    def evaluate(self, conversation: dict, assistant_response: str) -> bool:
        assert assistant_response in self.letters, f"{assistant_response!r} is not one of {self.letters}"
        return assistant_response == conversation["messages"][-1]["content"]
