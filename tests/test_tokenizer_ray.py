"""python -m pytest tests/test_tokenizer_ray.py -q

`python -m ray_jobs.tok_train --ray`: tokenizer training as one Ray task on a real local cluster. The task gets the
driver's base dir through its runtime_env, trains, and sends the encoding back; the driver writes the files.
"""

import os

import pytest
import ray

from nanochat.common import NanochatError
from nanochat.tokenizer import RustBPETokenizer, get_token_bytes, get_tokenizer
from ray_jobs import tok_train
from tests.test_tokenizer_jobs import corpus_docs, reference_training_text, write_shards

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_tok_train_as_ray_task(cluster, base_dir, capsys):
    docs = corpus_docs()
    os.makedirs(base_dir / "base_data_climbmix")
    write_shards(str(base_dir / "base_data_climbmix"), docs)
    cfg = tok_train.TokTrainConfig(max_chars=30000, vocab_size=350, use_ray=True)
    summary = tok_train.main(cfg)
    assert ray.is_initialized()  # an existing cluster is used and left running
    assert summary["node"] and summary["vocab_size"] == 350
    assert " on Ray node " in capsys.readouterr().out
    # the task read the shards under the driver's base dir (passed via runtime_env, not inherited)
    expected = RustBPETokenizer.train_from_iterator(iter(reference_training_text(docs, 30000, 10_000)), 350)
    tok = get_tokenizer()
    assert tok.enc._mergeable_ranks == expected.enc._mergeable_ranks
    assert get_token_bytes().shape == (350,)


def test_user_error_inside_task_is_reraised_plainly(cluster, base_dir):
    # no shards: the NanochatError raised inside the task reaches the driver as itself, not a RayTaskError
    with pytest.raises(NanochatError, match="python -m nanochat.dataset") as info:
        tok_train.train_on_ray(tok_train.TokTrainConfig(vocab_size=300, use_ray=True))
    assert not isinstance(info.value, ray.exceptions.RayTaskError)
