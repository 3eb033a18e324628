"""
Generate tests/fixtures/upstream_checkpoint/ (a tiny nanochat base dir written by upstream's checkpoint_manager) and
check, in the other direction, that upstream loads checkpoints written by ours.

    python dev/make_upstream_fixtures_checkpoint.py /tmp/upstream               # write the fixture
    python dev/make_upstream_fixtures_checkpoint.py /tmp/upstream --check-ours  # + ours -> upstream round trip

The argument is an unpacked upstream checkout (nanochat@92d63d4). Upstream and this repo both name their package
`nanochat`, so each side runs in its own subprocess (this file re-invoked with --role). Nothing from upstream is
copied: the script only calls upstream's public API and saves the files that API writes.

Fixture contents (~450 KB):
  tokenizer/tokenizer.pkl                   upstream RustBPETokenizer, vocab 300, trained on a generated corpus
  base_checkpoints/d2/model_000007.pt       upstream GPT d2 (n_embd 32, window "SL"), init + seeded noise; wte and
                                            value embeddings stored in bf16 like a GPU run (CPU load upcasts)
  base_checkpoints/d2/meta_000007.json      base-train style meta
  chatsft_checkpoints/d2/model_000003.pt    OLD format: no resid_lambdas/x0_lambdas keys, "_orig_mod." prefixes
  chatsft_checkpoints/d2/meta_000003.json   SFT style meta without window_pattern
  expected_logits.pt                        {ids, base, sft}: logits of upstream's own load_model on ids

The format invariants of the checkpoints upstream's own scripts write (file names, model/optimizer keys, dtypes and
shapes, meta fields of base_train, chat_sft and chat_rl) are frozen by dev/make_upstream_fixtures_eval.py, which
runs those scripts, in tests/fixtures/upstream_eval/checkpoint_format.json (asserted by
tests/test_upstream_pipeline.py against what ours writes).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "upstream_checkpoint")


def _corpus():
    # Deterministic text with enough repetition for 35 merges.
    words = ["the", "model", "checkpoint", "loads", "from", "disk", "and", "trains", "on", "tokens", "step"]
    for i in range(400):
        yield " ".join(words[(i * j) % len(words)] for j in range(1, 12)) + f" {i}."


def _logits(load_model, ids):
    import torch

    out = {}
    for source in ("base", "sft"):
        model, _, _ = load_model(source, torch.device("cpu"), phase="eval")
        with torch.no_grad():
            out[source] = model(ids).float()
    return out


def role_upstream_make(upstream, base):
    """Runs with upstream's nanochat on sys.path: writes a base dir through upstream's own functions."""
    sys.path.insert(0, upstream)
    import torch  # noqa: I001
    from nanochat.checkpoint_manager import load_model, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer

    import nanochat

    assert os.path.abspath(nanochat.__file__).startswith(upstream), nanochat.__file__
    torch.set_num_threads(1)
    tok = RustBPETokenizer.train_from_iterator(_corpus(), 300)
    tok.save(os.path.join(base, "tokenizer"))

    def noisy_model(config, seed):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        model.init_weights()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # noise so that every weight influences the logits
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
        return model

    common = dict(sequence_len=32, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    # Base: current format, embeddings in bf16 as a CUDA run saves them.
    config = GPTConfig(**common, window_pattern="SL")
    model = noisy_model(config, 1)
    sd = {k: v.to(torch.bfloat16) if k.startswith(("transformer.wte", "value_embeds")) else v
          for k, v in model.state_dict().items()}
    meta = {"step": 7, "val_bpb": 3.25, "model_config": dict(config.__dict__), "user_config": {"depth": 2},
            "device_batch_size": 2, "max_seq_len": 32, "total_batch_size": 128,
            "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 1, "epoch": 1},
            "loop_state": {"min_val_bpb": 3.25, "smooth_train_loss": 5.5, "total_training_time": 12.0}}
    save_checkpoint(os.path.join(base, "base_checkpoints", "d2"), 7, sd, None, meta)
    # SFT: an old checkpoint (before window_pattern and the resid/x0 scalars), saved from a torch.compile'd model.
    config = GPTConfig(**common, window_pattern="L")
    model = noisy_model(config, 2)
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)  # the values the loader patches in reproduce the old network
        model.x0_lambdas.fill_(0.0)
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    old_config = {k: v for k, v in config.__dict__.items() if k != "window_pattern"}
    meta = {"step": 3, "val_bpb": 2.5, "model_config": old_config, "user_config": {"source": "base"}}
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), 3, sd, None, meta)
    ids = torch.randint(0, tok.get_vocab_size(), (2, 8), generator=torch.Generator().manual_seed(3))
    torch.save({"ids": ids, **_logits(load_model, ids)}, os.path.join(base, "expected_logits.pt"))


def role_ours_resave(base, out_base):
    """Runs with this repo's nanochat: load the fixture with ours and save it again with ours into out_base."""
    sys.path.insert(0, REPO)
    import torch  # noqa: I001
    from nanochat.checkpoint_manager import load_model, save_checkpoint

    expected = torch.load(os.path.join(base, "expected_logits.pt"))
    ours = _logits(load_model, expected["ids"])
    for source, dirname, step in (("base", "base_checkpoints", 11), ("sft", "chatsft_checkpoints", 13)):
        print(f"ours load_model({source!r}) vs upstream logits: max |diff| = "
              f"{(ours[source] - expected[source]).abs().max().item():.3g}")
        model, _, meta = load_model(source, torch.device("cpu"), phase="eval")
        save_checkpoint(os.path.join(out_base, dirname, "d2"), step, model.state_dict(), None,
                        {**meta, "model_config": dict(model.config.__dict__)})
    shutil.copytree(os.path.join(base, "tokenizer"), os.path.join(out_base, "tokenizer"))


def role_upstream_load(upstream, base, expected_path):
    sys.path.insert(0, upstream)
    import torch  # noqa: I001
    from nanochat.checkpoint_manager import load_model

    expected = torch.load(expected_path)
    got = _logits(load_model, expected["ids"])
    for source in ("base", "sft"):
        diff = (got[source] - expected[source]).abs().max().item()
        print(f"upstream load_model({source!r}) of OUR checkpoint vs upstream logits: max |diff| = {diff:.3g}")
        assert diff < 1e-5, f"upstream cannot reproduce {source} from our checkpoint"
    print("OK: upstream loads checkpoints written by ours")


def _run(role, *args, base, cwd):
    env = {**os.environ, "NANOCHAT_DTYPE": "float32", "NANOCHAT_BASE_DIR": base, "PYTHONPATH": ""}
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, *args]
    subprocess.run(cmd, env=env, cwd=cwd, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", nargs="?", help="path to an unpacked upstream nanochat checkout (92d63d4)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--check-ours", action="store_true", help="also check that upstream loads our checkpoints")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--out-base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream-make":
        return role_upstream_make(os.path.abspath(args.upstream), os.environ["NANOCHAT_BASE_DIR"])
    if args.role == "ours-resave":
        return role_ours_resave(os.environ["NANOCHAT_BASE_DIR"], args.out_base)
    if args.role == "upstream-load":
        return role_upstream_load(os.path.abspath(args.upstream), os.environ["NANOCHAT_BASE_DIR"], args.base)
    if not args.upstream or not os.path.isfile(os.path.join(args.upstream, "nanochat", "checkpoint_manager.py")):
        raise SystemExit("pass the path of an unpacked upstream nanochat checkout (with nanochat/checkpoint_manager.py)")
    upstream = os.path.abspath(args.upstream)
    with tempfile.TemporaryDirectory() as tmp:
        made = os.path.join(tmp, "made")
        os.makedirs(made)
        _run("upstream-make", upstream, base=made, cwd=tmp)  # cwd=tmp: keep this repo off upstream's sys.path
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(made, args.out)
        print(f"wrote {args.out}")
        if args.check_ours:
            resaved = os.path.join(tmp, "resaved")
            _run("ours-resave", "--out-base", resaved, base=args.out, cwd=REPO)
            _run("upstream-load", upstream, "--base", os.path.join(args.out, "expected_logits.pt"), base=resaved,
                 cwd=tmp)


if __name__ == "__main__":
    main()
