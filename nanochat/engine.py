"""
Inference engine: KV cache, sampling, batched streaming generation with the calculator tool.

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                     # one token per row per step; mask 1 = sampled, 0 = forced
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The engine works on token ids only; the tokenizer is needed just for the tool (special-token ids, and to decode
the expression / encode the result). Quick self-check: `python -m nanochat.engine` (random small model).

Behaviour choices that differ from upstream nanochat (outputs are unchanged where upstream is well-defined):
- The KV cache keeps one length per row (`cache_seqlens`), so rows may sit at different positions (continuous
  batching: `reset_rows`, `copy_row_from`). `get_pos()` still means row 0's length.
- Rows that have finished are dropped from the model's batch (the cache is compacted), instead of being decoded
  until every row is done. Sampling still draws for all rows from one (num_samples, vocab) tensor, so the random
  stream, and therefore every live row's tokens, is the same as upstream's. A finished row's later entries in the
  stream repeat its terminal token with mask 0 (upstream yields meaningless samples there).
- The cache holds prompt + max_tokens - 1 positions and no forward pass runs after the last token (upstream runs
  one whose logits are never used). With max_tokens=None generation stops when the model's context
  (`config.sequence_len`) is full, instead of overrunning the cache.
- The calculator evaluates a whitelisted AST instead of calling eval(), also allows `**` with a bounded exponent,
  and accepts `'text'.count('x')` even when the text contains words like "open".
"""

import ast
import math
import operator
import time
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# Calculator tool

CALC_TIMEOUT_S = 3.0  # same budget as upstream's alarm; checked between AST nodes, so it works in any thread
CALC_MAX_EXPR_CHARS = 1000
CALC_MAX_EXPONENT = 100  # |b| in a ** b
CALC_MAX_INT_BITS = 4096  # refuse intermediate ints above ~1e1233

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """The expression is outside the calculator's grammar or budget."""


def _eval_arith(node, deadline):
    if time.monotonic() > deadline:
        raise _Refused("timeout")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _UNARYOPS[type(node.op)](_eval_arith(node.operand, deadline))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_arith(node.left, deadline), _eval_arith(node.right, deadline)
        if isinstance(node.op, ast.Pow) and (abs(right) > CALC_MAX_EXPONENT or abs(left) > 2 ** 64):
            raise _Refused("exponent too large")
        value = _BINOPS[type(node.op)](left, right)
        if isinstance(value, complex) or (isinstance(value, int) and value.bit_length() > CALC_MAX_INT_BITS):
            raise _Refused("result out of range")
        return value
    raise _Refused(f"{type(node).__name__} is not allowed")


def _eval_count(node):
    """Exactly `'literal'.count('literal'[, int[, int]])`, the string tool upstream's calculator supports."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and not node.keywords and 1 <= len(node.args) <= 3):
        raise _Refused("only 'text'.count('x') is supported")
    needle, *bounds = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
    if not isinstance(needle, str) or any(type(b) is not int for b in bounds):
        raise _Refused("count() takes a string literal (and optional int bounds)")
    return node.func.value.value.count(needle, *bounds)


def use_calculator(expr):
    """Evaluate a calculator expression from the model; returns an int/float/count, or None if refused.

    Grammar: numeric literals, + - * / // ** (|exponent| <= 100), unary +/-, parentheses; or a single
    `'text'.count('x')`. Commas are stripped first (they are digit separators, "1,000"). Nothing is ever passed
    to eval(): the expression is parsed with `ast` and walked over a whitelist, under a time budget.
    """
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > CALC_MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
        if isinstance(tree, ast.Call):
            return _eval_count(tree)
        value = _eval_arith(tree, time.monotonic() + CALC_TIMEOUT_S)
    except (_Refused, SyntaxError, ValueError, ArithmeticError, MemoryError, RecursionError):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Pre-allocated keys/values for every layer, laid out for flash_attn_with_kvcache.

    k_cache, v_cache: (n_layers, B, T_max, H_kv, D). cache_seqlens: (B,) int32, tokens cached per row (rows may
    differ). prev_embedding: (B, 1, C) pre-smear embedding of each row's last token (the model sets it), or None.
    host_lengths=True keeps `host_seqlens`, a Python copy of the lengths that the model reads instead of the device
    tensor (no device->host sync per layer; flash_attention.py protocol item 5). The methods below keep it in step;
    whoever writes cache_seqlens directly must update host_seqlens too (or leave host_lengths off).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype, host_lengths=False):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)  # FA3 wants int32
        self.host_seqlens = [0] * batch_size if host_lengths else None
        self.prev_embedding = None

    def _lengths(self):
        """Per-row lengths as a list (from the host copy when there is one)."""
        return list(self.host_seqlens) if self.host_seqlens is not None else self.cache_seqlens.tolist()

    def reset(self):
        self.cache_seqlens.zero_()
        if self.host_seqlens is not None:
            self.host_seqlens = [0] * self.batch_size
        self.prev_embedding = None

    def get_pos(self):
        """Row 0's length (upstream's meaning: all rows at one position)."""
        return self.host_seqlens[0] if self.host_seqlens is not None else self.cache_seqlens[0].item()

    def get_layer_cache(self, layer_idx):
        """(k, v) views for one layer, each (B, T_max, H_kv, D)."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens
        if self.host_seqlens is not None:
            self.host_seqlens = [n + num_tokens for n in self.host_seqlens]

    def _check_compatible(self, other):
        if (self.n_layers, self.n_heads, self.head_dim) != (other.n_layers, other.n_heads, other.head_dim):
            raise ValueError(f"KV caches differ in (layers, kv heads, head dim): "
                             f"{(self.n_layers, self.n_heads, self.head_dim)} vs "
                             f"{(other.n_layers, other.n_heads, other.head_dim)}")

    def prefill(self, other):
        """Copy another (usually batch-1) cache into this empty one; a batch-1 source is replicated to every row."""
        assert int(self.cache_seqlens.max()) == 0, "prefill() needs an empty cache"
        self._check_compatible(other)
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot prefill {self.batch_size} rows from a cache with {other.batch_size} rows")
        lens = other._lengths()
        n = max(lens)
        if n > self.max_seq_len:
            raise ValueError(f"source holds {n} tokens but this cache has room for {self.max_seq_len}")
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]  # broadcasts over rows when other has one row
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        self.cache_seqlens.copy_(other.cache_seqlens.expand(self.batch_size))
        if self.host_seqlens is not None:
            self.host_seqlens = lens * self.batch_size if len(lens) == 1 else lens
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()

    def reset_rows(self, rows):
        """Mark rows empty (their slots are reused by the next request); other rows are untouched."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.cache_seqlens.device)
        self.cache_seqlens[idx] = 0
        if self.host_seqlens is not None:
            for r in rows:
                self.host_seqlens[r] = 0
        if self.prev_embedding is not None:
            self.prev_embedding[idx] = 0

    def copy_row_from(self, dst_row, src_cache, src_row=0):
        """Copy one prefilled row of src_cache (its k/v, length and smear state) into row dst_row of this cache."""
        self._check_compatible(src_cache)
        n = src_cache._lengths()[src_row] if isinstance(src_cache, KVCache) else int(src_cache.cache_seqlens[src_row])
        if n > self.max_seq_len:
            raise ValueError(f"source row holds {n} tokens but this cache has room for {self.max_seq_len}")
        self.k_cache[:, dst_row, :n] = src_cache.k_cache[:, src_row, :n]
        self.v_cache[:, dst_row, :n] = src_cache.v_cache[:, src_row, :n]
        self.cache_seqlens[dst_row] = n
        if self.host_seqlens is not None:
            self.host_seqlens[dst_row] = n
        if src_cache.prev_embedding is not None:
            if self.prev_embedding is None:
                C = src_cache.prev_embedding.size(-1)
                self.prev_embedding = src_cache.prev_embedding.new_zeros(self.batch_size, 1, C)
            self.prev_embedding[dst_row] = src_cache.prev_embedding[src_row]

    def keep_rows(self, rows):
        """Shrink the batch to `rows` (ascending row ids), moving their data to the front; storage is reused."""
        n = len(rows)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.cache_seqlens.device)
        if list(rows) != list(range(n)):
            used = max(self._lengths())
            self.k_cache[:, :n, :used] = self.k_cache[:, idx, :used]  # the gather copies before assigning
            self.v_cache[:, :n, :used] = self.v_cache[:, idx, :used]
        self.k_cache, self.v_cache = self.k_cache[:, :n], self.v_cache[:, :n]
        self.cache_seqlens = self.cache_seqlens[idx].contiguous()
        if self.host_seqlens is not None:
            self.host_seqlens = [self.host_seqlens[r] for r in rows]
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[idx]
        self.batch_size = n


# -----------------------------------------------------------------------------
# Sampling


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, vocab) -> next token ids (B, 1). temperature 0 = argmax; top_k keeps the k largest logits."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k)
        choice = torch.multinomial(F.softmax(vals / temperature, dim=-1), num_samples=1, generator=rng)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


# -----------------------------------------------------------------------------
# Engine


class RowState:
    """Per-row generation state: tokens so far, queued forced tokens, and the tool state machine."""

    def __init__(self, current_tokens):
        self.current_tokens = current_tokens
        self.forced_tokens = deque()  # tool output waiting to be injected, one per step
        self.in_python_block = False
        self.python_expr_tokens = []
        self.completed = False


class Engine:
    def __init__(self, model, tokenizer, static=None):
        """static: decode with fixed shapes (nanochat.static_decode), replayed as CUDA graphs on CUDA; None = on CUDA.
        It keeps one static KV cache, grown to the most rows (bucketed) and positions (in blocks of 256) any call has
        needed, so each graph is captured once per Engine unless a later call needs a bigger cache."""
        self.model = model
        self.tokenizer = tokenizer  # used only for the calculator tool and the special-token ids
        self.static = static
        self._decoder = None

    def _new_cache(self, batch_size, seq_len):
        cfg = self.model.config
        return KVCache(batch_size=batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len,
                       head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer,
                       device=self.model.get_device(), dtype=COMPUTE_DTYPE, host_lengths=True)

    def _static_decoder(self, num_samples, capacity):
        """The graph decoder for this call, or None for the eager path (CPU, or too long for the static cache)."""
        device = self.model.get_device()
        use = (device.type == "cuda") if self.static is None else self.static
        limit = self.model.config.sequence_len
        if not use or capacity > limit:
            return None
        old = self._decoder
        if old is None or old.rows < num_samples or old.capacity < capacity:
            from nanochat.static_decode import StaticDecoder

            rows = max(old.rows if old else 1, 1 << (num_samples - 1).bit_length())
            positions = max(old.capacity if old else 0, min(limit, -(-capacity // 256) * 256))
            self._decoder = None  # free the old cache (and its graphs) first
            self._decoder = StaticDecoder(self.model, rows, positions, use_graphs=device.type == "cuda")
        return self._decoder

    def _budget(self, tokens, num_samples, max_tokens, temperature, top_k):
        """Validate the request; return how many steps to run."""
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of int token ids")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be None, 0 (off) or positive, got {top_k}")
        if max_tokens is not None:
            if max_tokens < 0:
                raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
            return max_tokens
        room = self.model.config.sequence_len - len(tokens)
        if room <= 0:
            raise ValueError(f"the prompt ({len(tokens)} tokens) already fills the model's context "
                             f"({self.model.config.sequence_len}); pass max_tokens explicitly to go beyond it")
        return room

    def _step_row(self, state, sampled, ids):
        """Pick a row's next token (forced tool output first) and advance its tool state machine. -> (token, mask)"""
        forced = len(state.forced_tokens) > 0
        token = state.forced_tokens.popleft() if forced else sampled
        state.current_tokens.append(token)
        if token == ids["assistant_end"] or token == ids["bos"]:
            state.completed = True
        if token == ids["python_start"]:
            state.in_python_block, state.python_expr_tokens = True, []
        elif token == ids["python_end"] and state.in_python_block:
            state.in_python_block = False
            if state.python_expr_tokens:
                result = use_calculator(self.tokenizer.decode(state.python_expr_tokens))
                if result is not None:
                    state.forced_tokens.append(ids["output_start"])
                    state.forced_tokens.extend(self.tokenizer.encode(str(result)))
                    state.forced_tokens.append(ids["output_end"])
            state.python_expr_tokens = []
        elif state.in_python_block:
            state.python_expr_tokens.append(token)
        return token, 0 if forced else 1

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, token_masks): lists of num_samples ints per step, mask 1 = sampled, 0 = forced.

        Stops after max_tokens steps or when every row has emitted <|assistant_end|> or <|bos|>.
        """
        steps = self._budget(tokens, num_samples, max_tokens, temperature, top_k)
        if steps == 0:
            return
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        special = self.tokenizer.encode_special
        ids = {name: special(f"<|{name}|>") for name in
               ("python_start", "python_end", "output_start", "output_end", "assistant_end")}
        ids["bos"] = self.tokenizer.get_bos_token_id()

        # 1) Batch-1 prefill. Positions needed: the prompt plus every generated token except the last one.
        capacity = len(tokens) + steps - 1
        static = self._static_decoder(num_samples, capacity)
        cache = self._new_cache(1, capacity if num_samples == 1 and static is None else len(tokens))
        logits = self.model.forward(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=cache)
        logits = logits[:, -1, :].expand(num_samples, -1)  # (N, vocab): each row samples its own first token
        # 2) Replicate the prompt's cache to num_samples rows (of the static decoder's cache with graphs).
        if static is not None:
            n = len(tokens)
            static.cache.k_cache[:, :num_samples, :n] = cache.k_cache[:, :, :n]
            static.cache.v_cache[:, :num_samples, :n] = cache.v_cache[:, :, :n]
            static.cache.prev_embedding[:num_samples] = cache.prev_embedding
        elif num_samples > 1:
            decode_cache = self._new_cache(num_samples, capacity)
            decode_cache.prefill(cache)
            cache = decode_cache
        rows = [RowState(list(tokens)) for _ in range(num_samples)]
        live = list(range(num_samples))  # row ids still in the model's batch, in cache order

        # 3) Decode loop
        for step in range(steps):
            # One draw over all num_samples rows keeps the random stream identical to upstream's.
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for i, state in enumerate(rows):
                if state.completed:  # finished earlier: repeat its terminal token, not sampled
                    column.append(state.current_tokens[-1])
                    masks.append(0)
                else:
                    token, mask = self._step_row(state, sampled[i], ids)
                    column.append(token)
                    masks.append(mask)
            yield column, masks
            if step == steps - 1:
                break
            still = [i for i in live if not rows[i].completed]
            if not still:
                break
            if static is not None:  # fixed shapes: every row decodes (finished rows too), one graph replay
                static.tokens[:num_samples, 0].copy_(torch.tensor(column, dtype=torch.long))
                static.cache.cache_seqlens.fill_(len(tokens) + step)
                logits = static.step(num_samples, len(tokens) + step)[:num_samples]
                continue
            if len(still) < len(live):
                cache.keep_rows([live.index(i) for i in still])
                live = still
            out = self.model.forward(torch.tensor([[column[i]] for i in live], dtype=torch.long, device=device),
                                     kv_cache=cache)[:, -1, :]  # (len(live), vocab)
            if len(live) == num_samples:
                logits = out
            else:  # finished rows get dummy logits; their draws are discarded
                logits = out.new_zeros(num_samples, out.size(-1))
                logits[live] = out

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate() to the end. -> (results, masks): per row the prompt + generated tokens (the terminal
        <|assistant_end|>/<|bos|> excluded) and a mask (0 for the prompt and forced tokens, 1 for sampled ones)."""
        stop = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in stop:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks


if __name__ == "__main__":
    # Self-check on a small random model: Engine (KV cache) vs GPT.generate (full recompute), greedy.
    from nanochat.gpt import GPT, GPTConfig

    class _Bytes:
        specials = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

        def encode_special(self, s):
            return 256 + self.specials.index(s)

        def get_bos_token_id(self):
            return 256

        def encode(self, s):
            return list(s.encode())

        def decode(self, ids):
            return bytes(t for t in ids if t < 256).decode(errors="replace")

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    for p in model.parameters():  # init_weights zeroes some projections; random weights make a better check
        torch.nn.init.normal_(p, std=0.5)
    prompt = [256] + list(b"The engine says")
    naive = list(model.generate(prompt, max_tokens=20, temperature=0.0))
    fast, _ = Engine(model, _Bytes()).generate_batch(prompt, max_tokens=20, temperature=0.0)
    print("naive :", naive)
    print("engine:", fast[0][len(prompt):])
    print("match:", naive[:len(fast[0]) - len(prompt)] == fast[0][len(prompt):])
