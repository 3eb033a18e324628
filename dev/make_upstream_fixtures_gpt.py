"""
Generate golden data for tests/test_gpt.py by running upstream nanochat's model once, on CPU, in float32.

    python dev/make_upstream_fixtures_gpt.py /tmp/upstream [--out tests/fixtures/upstream_gpt.pt]

The argument is an unpacked upstream checkout (nanochat@92d63d4, e.g. `git archive 92d63d4 | tar -x -C /tmp/upstream`).
It is put first on sys.path, so `import nanochat` in this process is upstream's package, never ours. Nothing from
upstream is copied: the script only calls its public API and saves tensors/numbers.

What is saved (a plain dict, torch.save, < 2 MB):
  cases[name] = {config, state_dict (init + seeded noise, so every branch of the forward matters), idx, targets,
                 logits, loss, loss_none, kv (prefill length, per-step decode logits), generate (sampled tokens)}
  init_digest = per-key (numel, sum, first 16 values) of upstream's init_weights() under torch.manual_seed
  accounting[depth] = num_scaling_params / estimate_flops / ... for d12, d20, d24 and the cases (meta-device build)
  optim_groups = upstream setup_optimizer() param groups (param names, lr, betas, eps, weight_decay, kind)
"""

import argparse
import os
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", help="path to an unpacked upstream nanochat checkout (92d63d4)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                      "upstream_gpt.pt"))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.upstream, "nanochat", "gpt.py")):
        raise SystemExit(f"{args.upstream} does not look like a nanochat checkout (no nanochat/gpt.py)")
    os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, os.path.abspath(args.upstream))
    import torch  # noqa: I001 (after the sys.path tweak on purpose)
    import nanochat.gpt as up_gpt
    from nanochat.engine import KVCache as UpKVCache

    assert os.path.abspath(up_gpt.__file__).startswith(os.path.abspath(args.upstream)), up_gpt.__file__
    torch.set_num_threads(1)  # deterministic reductions

    # (name, config kwargs, batch, T, prefill length for the KV test)
    cases = [
        ("L_gqa", dict(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                       window_pattern="L"), 2, 64, 40),
        ("SSSL", dict(sequence_len=256, vocab_size=300, n_layer=4, n_head=3, n_kv_head=1, n_embd=48,
                      window_pattern="SSSL"), 1, 200, 150),
        ("SL_odd", dict(sequence_len=256, vocab_size=250, n_layer=3, n_head=2, n_kv_head=2, n_embd=32,
                        window_pattern="sl"), 1, 180, 170),
    ]

    def build(cfg_kwargs):
        with torch.device("meta"):
            model = up_gpt.GPT(up_gpt.GPTConfig(**cfg_kwargs))
        model.to_empty(device="cpu")
        return model

    out = {"upstream_commit": "92d63d4", "cases": {}, "accounting": {}}

    # --- init digest: same seed -> our init_weights must draw the same numbers in the same order
    torch.manual_seed(1234)
    model = build(cases[0][1])
    model.init_weights()
    out["init_digest"] = {k: (v.numel(), float(v.double().sum()), v.flatten()[:16].clone())
                          for k, v in model.state_dict().items()}

    for name, cfg_kwargs, B, T, prefill in cases:
        torch.manual_seed(0)
        model = build(cfg_kwargs)
        model.init_weights()
        with torch.no_grad():  # perturb everything so zero-init projections/lambdas don't hide any path
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.eval()
        V = cfg_kwargs["vocab_size"]
        g = torch.Generator().manual_seed(2)
        idx = torch.randint(0, V, (B, T), generator=g)
        targets = torch.randint(0, V, (B, T), generator=g)
        targets[:, ::7] = -1  # exercise ignore_index
        with torch.no_grad():
            logits = model(idx)
            loss = model(idx, targets)
            loss_none = model(idx, targets, loss_reduction="none")
            # KV cache: prefill `prefill` tokens, then decode the rest one at a time
            head_dim = cfg_kwargs["n_embd"] // cfg_kwargs["n_head"]
            cache = UpKVCache(batch_size=B, num_heads=cfg_kwargs["n_kv_head"], seq_len=T, head_dim=head_dim,
                              num_layers=cfg_kwargs["n_layer"], device="cpu", dtype=torch.float32)
            kv_logits = [model(idx[:, :prefill], kv_cache=cache)[:, -1:]]
            for t in range(prefill, T):
                kv_logits.append(model(idx[:, t:t + 1], kv_cache=cache))
            kv_logits = torch.cat(kv_logits, dim=1)  # (B, T - prefill + 1, V): logits predicting idx[prefill-1:]
        prompt = idx[0, :5].tolist()
        gen = {
            "prompt": prompt,
            "greedy": list(model.generate(prompt, max_tokens=6, temperature=0.0)),
            "sampled": list(model.generate(prompt, max_tokens=6, temperature=1.0, top_k=20, seed=7)),
        }
        out["cases"][name] = {
            "config": cfg_kwargs, "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "idx": idx, "targets": targets, "logits": logits, "loss": loss, "loss_none": loss_none,
            "kv_prefill": prefill, "kv_logits": kv_logits, "generate": gen,
            "window_sizes": list(model.window_sizes),
        }

    # --- accounting (meta-device build only: no memory, runs in milliseconds)
    def depth_config(depth, seq_len=2048, vocab=32768, aspect=64, head_dim=128):
        dim = -(-depth * aspect // head_dim) * head_dim  # base_train's build_model_meta rule
        return dict(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=dim // head_dim,
                    n_kv_head=dim // head_dim, n_embd=dim, window_pattern="SSSL")

    acc_configs = {f"d{d}": depth_config(d) for d in (12, 20, 24)}
    acc_configs["d4_T512_L"] = dict(depth_config(4, seq_len=512), window_pattern="L")
    acc_configs.update({name: c for name, c, *_ in cases})
    for name, cfg_kwargs in acc_configs.items():
        with torch.device("meta"):
            m = up_gpt.GPT(up_gpt.GPTConfig(**cfg_kwargs))
        out["accounting"][name] = {
            "config": cfg_kwargs,
            "num_scaling_params": m.num_scaling_params(),
            "num_matmul_params": m.num_matmul_params(),
            "estimate_flops": m.estimate_flops(),
            "decode_flops": {c: m.estimate_decode_flops(c) for c in (1, 100, 1000, 4096)},
            "prefill_flops": {n: m.estimate_prefill_flops(n) for n in (1, 100, 1000, 4096)},
            "kv_bytes_per_token": m.kv_bytes_per_token(),
            "kv_read_bytes": {c: m.kv_read_bytes(c) for c in (1, 100, 1000, 4096)},
            "window_sizes": list(m.window_sizes),
        }

    # --- optimizer groups (structure only; constructing MuonAdamW does no compute)
    model = build(cases[0][1])
    model.init_weights()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1,
                                scalar_lr=0.5)
    out["optim_groups"] = [{k: ([names[id(p)] for p in v] if k == "params" else v) for k, v in g.items()}
                           for g in opt.param_groups]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
