"""CORE and bits-per-byte: rendering, answer spans, scoring against hand-computed values, the eval bundle download
(loopback HTTP, corruption), the CSV, and the base_eval CLI in --local mode.

python -m pytest tests/test_core_eval.py -q
"""

import json
import math
import os
import random
import zipfile

import pytest
import torch

from nanochat import core_eval
from nanochat.common import NanochatError
from nanochat.core_eval import (
    batch_sequences_lm,
    batch_sequences_mc,
    batch_sequences_schema,
    evaluate_example,
    find_common_length,
    forward_model,
    render_prompts_lm,
    render_prompts_mc,
    render_prompts_schema,
)
from nanochat.loss_eval import evaluate_bpb
from tests.eval_fixtures import ByteTokenizer, fixture_env, make_tiny_checkpoint, serve_fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny models on a shared 2-core machine: more threads only contend
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -----------------------------------------------------------------------------
# Rendering: exact strings


def test_render_mc_with_fewshot_exact():
    item = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shots = [{"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0}]
    assert render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 3",
        "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4",
    ]
    assert render_prompts_mc(item, " ") == ["Q: 2+2? 3", "Q: 2+2? 4"]


def test_render_schema_uses_gold_context_for_fewshot():
    item = {"context_options": ["A went", "B went"], "continuation": "home.", "gold": 0}
    shots = [{"context_options": ["X ran", "Y ran"], "continuation": "away.", "gold": 1}]
    assert render_prompts_schema(item, " ", shots) == ["Y ran away.\n\nA went home.", "Y ran away.\n\nB went home."]


def test_render_lm_trims_context_and_strips_prompt_without():
    item = {"context": "  The sky is  ", "continuation": "blue"}
    shots = [{"context": "Grass is ", "continuation": "green"}]
    assert render_prompts_lm(item, " ", shots) == ["Grass is green\n\nThe sky is", "Grass is green\n\nThe sky is blue"]


# -----------------------------------------------------------------------------
# Answer spans (byte tokenizer: one token per byte, BOS = 256)


def test_common_length_prefix_and_suffix():
    assert find_common_length([[1, 2, 3], [1, 2, 4]], "left") == 2
    assert find_common_length([[9, 2, 3], [1, 2, 3]], "right") == 2
    assert find_common_length([[1, 2], [1, 2, 3]], "left") == 2  # one is a prefix of the other


def test_spans_by_hand():
    tok = ByteTokenizer()
    _, starts, ends = batch_sequences_mc(tok, ["Q: 2+2?\nAnswer: 3", "Q: 2+2?\nAnswer: 45"])
    assert starts == [17, 17] and ends == [18, 19]  # BOS + 16 shared bytes; answers of 1 and 2 bytes
    _, starts, ends = batch_sequences_schema(tok, ["A went home.", "BB went home."])
    assert starts == [2, 3] and ends == [13, 14]  # the shared suffix " went home." is 11 bytes
    tokens, starts, ends = batch_sequences_lm(tok, ["The sky is", "The sky is blue"])
    assert len(tokens) == 1 and starts == [11] and ends == [16]


def test_lm_prompt_must_be_token_prefix():
    with pytest.raises(ValueError, match="prefix"):
        batch_sequences_lm(ByteTokenizer(), ["The sky is", "The sea is blue"])


# -----------------------------------------------------------------------------
# Scoring with a model whose losses are known in closed form


class TableLM(torch.nn.Module):
    """Logits depend only on the current byte: 8.0 for favoured[current], 0 elsewhere (V = 257)."""

    def __init__(self, favoured: dict[str, str]):
        super().__init__()
        self.table = torch.zeros(257, 257)
        for cur, nxt in favoured.items():
            self.table[ord(cur), ord(nxt)] = 8.0

    def forward(self, idx):
        return self.table[idx]


LOSS_HIT = math.log(math.exp(8) + 256) - 8  # target is the favoured byte
LOSS_MISS_ROW = math.log(math.exp(8) + 256)  # row has a favourite, target is another byte
LOSS_FLAT = math.log(257)  # row without favourite


def _meta(kind, shots=0, delim=" "):
    return {"task_type": kind, "num_fewshot": shots, "continuation_delimiter": delim}


def test_mc_losses_and_prediction_by_hand():
    model, tok = TableLM({" ": "c", "c": "a", "a": "t"}), ByteTokenizer()
    item = {"query": "Pet:", "choices": ["cat", "dog"], "gold": 0}
    tokens, starts, ends = batch_sequences_mc(tok, render_prompts_mc(item, " "))
    losses, _ = forward_model(model, core_eval.stack_sequences(tokens, 256))
    cat = losses[0, starts[0] - 1 : ends[0] - 1].mean().item()
    dog = losses[1, starts[1] - 1 : ends[1] - 1].mean().item()
    assert cat == pytest.approx(LOSS_HIT, rel=1e-5)  # c, a, t all favoured
    assert dog == pytest.approx((LOSS_MISS_ROW + 2 * LOSS_FLAT) / 3, rel=1e-5)
    assert evaluate_example(0, model, tok, [item], "cpu", _meta("multiple_choice")) is True
    assert evaluate_example(0, model, tok, [{**item, "gold": 1}], "cpu", _meta("multiple_choice")) is False


def test_schema_prediction_by_hand():
    model, tok = TableLM({"t": " "}), ByteTokenizer()  # only "...cat ran." gets a cheap first suffix token
    item = {"context_options": ["The dog", "The cat"], "continuation": "ran.", "gold": 1}
    assert evaluate_example(0, model, tok, [item], "cpu", _meta("schema")) is True
    assert evaluate_example(0, model, tok, [{**item, "gold": 0}], "cpu", _meta("schema")) is False


def test_lm_correct_only_if_every_token_is_argmax():
    model, tok = TableLM({":": " ", " ": "c", "c": "a", "a": "t"}), ByteTokenizer()
    good = {"context": "Animal:", "continuation": "cat"}
    bad = {"context": "Animal:", "continuation": "cab"}  # the last token is not the argmax
    assert evaluate_example(0, model, tok, [good], "cpu", _meta("language_modeling")) is True
    assert evaluate_example(0, model, tok, [bad], "cpu", _meta("language_modeling")) is False


def test_evaluate_task_mean_and_centering():
    model, tok = TableLM({" ": "c", "c": "a", "a": "t"}), ByteTokenizer()
    data = [{"query": "Pet:", "choices": ["cat", "dog"], "gold": g} for g in (0, 0, 1, 0)]
    acc = core_eval.evaluate_task(model, tok, data, "cpu", _meta("multiple_choice"))
    assert acc == 0.75
    assert core_eval.centered_result(0.75, 50.0) == pytest.approx(0.5)
    assert core_eval.centered_result(0.25, 25.0) == 0.0


# -----------------------------------------------------------------------------
# Few-shot sampling, including --max-per-task below the shot count (upstream crashes there)


def _write_bundle(root, rows, shots):
    bundle = root / "eval_bundle"
    (bundle / "eval_data" / "x").mkdir(parents=True)
    (bundle / "eval_data" / "x" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (bundle / "core.yaml").write_text(
        f"icl_tasks:\n- label: t\n  dataset_uri: x/t.jsonl\n  num_fewshot: [{shots}]\n  icl_task_type: multiple_choice\n"
    )
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,25.0\n")
    return str(bundle)


MC_ROWS = [{"query": f"Q{i}:", "choices": ["cat", "dog"], "gold": i % 2} for i in range(14)]


def test_fewshot_draw_is_upstreams():
    assert core_eval.sample_fewshot(3, 4, 10) == random.Random(1237).sample([0, 1, 2, 4, 5, 6, 7, 8, 9], 4)
    assert core_eval.sample_fewshot(3, 0, 10) == []


def test_max_per_task_at_least_k_plus_one_keeps_upstream_pool(tmp_path):
    bundle = _write_bundle(tmp_path, MC_ROWS, shots=3)
    task = core_eval.load_core_tasks(bundle)[0]
    data, pool, meta = core_eval.load_task_examples(bundle, task, max_per_task=4)
    shuffled = list(MC_ROWS)
    random.Random(1337).shuffle(shuffled)
    assert data == shuffled[:4] and pool is data and meta["num_fewshot"] == 3


def test_max_per_task_below_fewshot_count_draws_from_whole_task(tmp_path):
    bundle = _write_bundle(tmp_path, MC_ROWS, shots=10)
    task = core_eval.load_core_tasks(bundle)[0]
    data, pool, meta = core_eval.load_task_examples(bundle, task, max_per_task=3)
    assert len(data) == 3 and len(pool) == 14 and pool[:3] == data and meta["num_fewshot"] == 10
    with pytest.raises(ValueError):  # what upstream does: sample 10 from the 2 other examples
        random.Random(1234).sample([1, 2], 10)
    model, tok = TableLM({" ": "c", "c": "a", "a": "t"}), ByteTokenizer()
    for idx in range(3):
        shots = core_eval.sample_fewshot(idx, 10, len(pool))
        assert idx not in shots and len(set(shots)) == 10
        prompt = render_prompts_mc(data[idx], " ", [pool[i] for i in shots])[0]
        assert prompt.count("\n\n") == 10 and prompt.endswith(f"{data[idx]['query']} cat")
    acc = core_eval.evaluate_task(model, tok, data, "cpu", meta, pool=pool)
    assert acc == pytest.approx(sum(r["gold"] == 0 for r in data) / 3)


def test_task_smaller_than_fewshot_count_lowers_k(tmp_path, capsys):
    bundle = _write_bundle(tmp_path, MC_ROWS[:4], shots=10)
    data, pool, meta = core_eval.load_task_examples(bundle, core_eval.load_core_tasks(bundle)[0])
    assert meta["num_fewshot"] == 3 and "using 3-shot" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Bits per byte, by hand


class FixedLossModel:
    def __init__(self, losses):
        self.losses = torch.tensor(losses)

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.losses.view(y.shape)


def test_bpb_by_hand():
    token_bytes = torch.tensor([0, 0, 2, 3, 0], dtype=torch.int32)  # ids 0,1,4 are "special" (0 bytes)
    x = torch.zeros(1, 4, dtype=torch.long)
    y = torch.tensor([[2, 4, -1, 3]])  # counted: ids 2 (2 bytes) and 3 (3 bytes); 4 is special, -1 ignored
    model = FixedLossModel([1.0, 2.0, 3.0, 4.0])
    bpb = evaluate_bpb(model, [(x, y), (x, y)], steps=2, token_bytes=token_bytes)
    assert bpb == pytest.approx((2 * (1.0 + 4.0)) / (math.log(2) * 2 * 5))
    y2 = torch.tensor([[2, 3, 3, 2]])  # the fast path (no ignored targets) gives the same formula
    assert evaluate_bpb(model, [(x, y2)], 1, token_bytes) == pytest.approx(10.0 / (math.log(2) * 10))
    assert evaluate_bpb(model, [(x, torch.tensor([[4, 0, -1, 1]]))], 1, token_bytes) == float("inf")


# -----------------------------------------------------------------------------
# The eval bundle over real HTTP on loopback


@pytest.fixture
def bundle_server(tmp_path, base_dir, monkeypatch):
    server = serve_fixtures(tmp_path / "served")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", fixture_env(server)["NANOCHAT_EVAL_BUNDLE_URL"])
    yield server
    server.stop()


def test_bundle_downloaded_once_and_placed(bundle_server, base_dir):
    path = core_eval.ensure_eval_bundle()
    assert path == os.path.join(base_dir, "eval_bundle")
    assert len(core_eval.load_core_tasks(path)) == 5
    assert core_eval.ensure_eval_bundle() == path
    assert bundle_server.requests["eval_bundle.zip"] == 1


@pytest.mark.parametrize("fault", ["garbage", "truncate", "500"])
def test_bad_download_is_retried_not_used(bundle_server, base_dir, fault):
    bundle_server.fail("eval_bundle.zip", fault)
    path = core_eval.ensure_eval_bundle()
    assert core_eval._bundle_problem(path) is None
    assert bundle_server.requests["eval_bundle.zip"] == 2


@pytest.mark.parametrize("damage", ["crc", "not_a_zip"])
def test_corrupt_cached_zip_and_half_extracted_dir_are_replaced(bundle_server, base_dir, tmp_path, damage):
    good = (tmp_path / "served" / "eval_bundle.zip").read_bytes()
    if damage == "crc":  # a zip whose directory is intact but whose member data is flipped
        mid = len(good) // 2
        bad = good[:mid] + bytes(b ^ 0xFF for b in good[mid : mid + 64]) + good[mid + 64 :]
    else:
        bad = b"PK\x03\x04 not really a zip"
    (base_dir / "eval_bundle.zip").write_bytes(bad)
    (base_dir / "eval_bundle").mkdir()
    (base_dir / "eval_bundle" / "core.yaml").write_text("icl_tasks: []\n")  # no eval_meta_data.csv
    path = core_eval.ensure_eval_bundle()
    assert core_eval._bundle_problem(path) is None and len(core_eval.load_core_tasks(path)) == 5
    with zipfile.ZipFile(base_dir / "eval_bundle.zip") as zf:
        assert zf.testzip() is None
    assert bundle_server.requests["eval_bundle.zip"] == 1


def test_always_corrupt_bundle_is_an_error(bundle_server, base_dir):
    bundle_server.fail("eval_bundle.zip", "garbage*")
    with pytest.raises(NanochatError, match="NANOCHAT_EVAL_BUNDLE_URL"):
        core_eval.ensure_eval_bundle(attempts=3)
    assert not (base_dir / "eval_bundle").exists()


def test_core_csv_format_exact():
    core = core_eval.core_summary({"arc_easy": 0.5, "copa": 0.75}, {"arc_easy": 1 / 3, "copa": 0.5})
    assert core["core_metric"] == pytest.approx(5 / 12)
    assert core_eval.format_core_csv(core) == (
        "Task                               , Accuracy  , Centered  \n"
        "arc_easy                           , 0.500000  , 0.333333  \n"
        "copa                               , 0.750000  , 0.500000  \n"
        "CORE                               ,           , 0.416667  \n"
    )


# -----------------------------------------------------------------------------
# Whole CORE on a tiny real GPT, and the base_eval CLI without Ray


def test_evaluate_core_and_base_eval_local_agree(bundle_server, base_dir, capsys):
    from ray_jobs import base_eval

    model, tokenizer, _ = make_tiny_checkpoint(str(base_dir), step=7)
    direct = core_eval.evaluate_core(model, tokenizer, "cpu", max_per_task=6)
    assert set(direct["results"]) == {"arc_easy", "copa", "winograd", "lambada_openai", "bigbench_operators"}
    out = base_eval.main(["--eval", "core", "--max-per-task", "6", "--local", "--device-type", "cpu"])
    assert out["core"] == direct
    printed = capsys.readouterr().out
    assert f"CORE metric: {direct['core_metric']:.4f}" in printed
    assert json.loads(printed.strip().splitlines()[-1])["core"]["core_metric"] == direct["core_metric"]
    csv_text = (base_dir / "base_eval" / "base_model_000007.csv").read_text()
    assert csv_text == core_eval.format_core_csv(direct)


def test_base_eval_missing_checkpoint_names_command(base_dir, capsys):
    from ray_jobs import base_eval

    with pytest.raises(SystemExit) as e:
        base_eval.main(["--eval", "core", "--local"])
    assert e.value.code == 2
    assert "ray_jobs.base_train" in capsys.readouterr().err


def test_base_eval_invalid_mode(base_dir, capsys):
    from ray_jobs import base_eval

    with pytest.raises(SystemExit) as e:
        base_eval.main(["--eval", "core,bogus"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
