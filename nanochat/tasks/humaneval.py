"""HumanEval (164 Python programming problems) as a generative chat task scored by running the tests.

Data: HF `openai/openai_humaneval`, parquet config `openai_humaneval`, split test. A completion passes when
`imports from the prompt + the first fenced code block of the completion (or all of it) + the problem's test
+ check(entry_point)` runs to its end with exit status 0 in `nanochat.execution.execute_code` (5 s, 256 MB by
default): a program that exits early (sys.exit(0) before the asserts) fails.
"""

import re

from nanochat.tasks.common import Task, load_hub_dataset

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The leading `import` / `from` lines of a prompt (comments and blank lines skipped; stop at other code)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python (or bare ```) block of a completion, else the whole completion, stripped."""
    blocks = CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    """The exact program that is executed to score one completion."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return "\n\n".join([imports, extract_program(completion), conversation["test"]]) + (
        f"\ncheck({conversation['entry_point']})"
    )


def example_from_row(row: dict) -> dict:
    """One dataset row (task_id, prompt, canonical_solution, test, entry_point) as a conversation."""
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},  # the signature + docstring to complete
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ],
        "entry_point": row["entry_point"],
        "test": row["test"],
    }


def passes(conversation: dict, completion: str, timeout: float = 5.0,
           maximum_memory_bytes: int = 256 * 1024 * 1024) -> bool:
    """Whether `completion` passes the problem's tests in the sandbox."""
    from nanochat.execution import execute_code  # imported lazily: only generative scoring needs the sandbox

    result = execute_code(build_program(conversation, completion), timeout=timeout,
                          maximum_memory_bytes=maximum_memory_bytes)
    return bool(result.success)


class HumanEval(Task):
    def __init__(self, timeout: float = 5.0, maximum_memory_bytes: int = 256 * 1024 * 1024, **kwargs):
        super().__init__(**kwargs)
        self.timeout, self.maximum_memory_bytes = timeout, maximum_memory_bytes
        self.ds = load_hub_dataset("openai/openai_humaneval", subset="openai_humaneval", split="test").shuffle(seed=42)

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        return example_from_row(self.ds[index])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return passes(conversation, completion, self.timeout, self.maximum_memory_bytes)
