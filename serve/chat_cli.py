"""
Chat with a nanochat model in the terminal: in-process by default, or with a running server via --url.

    python -m serve.chat_cli -i sft                          # REPL: 'quit'/'exit' to leave, 'clear' to restart
    python -m serve.chat_cli -i sft -p "Why is the sky blue?"  # one answer, then exit
    python -m serve.chat_cli --url http://localhost:8000      # talk to `python -m serve.chat_web` (or a RayService)
    python -m serve.chat_cli --url http://host:8000 --model base --api-key "$KEY"   # a named model, a keyed server

Flags are upstream's scripts/chat_cli.py (-i/-g/-s/-p/-t 0.6/-k 50/--device-type; replies are capped at 256 tokens
as upstream). Unlike upstream, special tokens are never printed and multi-byte characters are never split
(serve.protocol.TextStream); tool calls show as `expr` → result. In-process generation uses the same batching
scheduler as the server (serve.batching), seed 42 like upstream's Engine default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MAX_TOKENS = 256  # upstream hard-codes this for the CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with the model")
    p.add_argument("-i", "--source", type=str, default="sft", help="Source of the model: base|sft|rl")
    p.add_argument("-g", "--model-tag", type=str, default=None, help="Model tag to load")
    p.add_argument("-s", "--step", type=int, default=None, help="Step to load")
    p.add_argument("-p", "--prompt", type=str, default="", help="Prompt the model, get a single response back")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="Temperature for generation")
    p.add_argument("-k", "--top-k", type=int, default=50, help="Top-k sampling parameter")
    p.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda|cpu|mps; empty = autodetect")
    p.add_argument("--url", type=str, default="", help="chat with a running server instead (e.g. http://host:8000)")
    p.add_argument("--model", type=str, default=None,
                   help="with --url: the served model to talk to (e.g. sft, base:d20); default: the server's default")
    p.add_argument("--api-key", type=str, default=os.environ.get("NANOCHAT_API_KEY"),
                   help="with --url: the server's API key (default: $NANOCHAT_API_KEY)")
    return p.parse_args(argv)


class LocalChat:
    """In-process: the conversation is a token list, as in upstream's CLI."""

    def __init__(self, args):
        from nanochat.checkpoint_manager import load_model
        from serve.batching import BatchScheduler
        from serve.engine_deployment import pick_device

        model, self.tok, _ = load_model(args.source, pick_device(args.device_type), phase="eval",
                                        model_tag=args.model_tag, step=args.step)
        self.scheduler = BatchScheduler(model, self.tok, max_batch_size=1, batch_invariant=False)
        self.args = args
        self.clear()

    def clear(self):
        self.tokens = [self.tok.get_bos_token_id()]

    def reply(self, user_text, write):
        from serve.batching import SamplingParams
        from serve.protocol import TextStream

        sp = self.tok.encode_special
        self.tokens += [sp("<|user_start|>")] + self.tok.encode(user_text) + [sp("<|user_end|>"),
                                                                            sp("<|assistant_start|>")]
        stream, reply = TextStream(self.tok), []

        def on_event(ev):
            reply.append(ev.token)
            write(stream.push(ev.token))

        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=self.args.temperature, top_k=self.args.top_k)
        self.scheduler.submit(self.tokens, params, on_event)
        while self.scheduler.step():
            pass
        write(stream.flush())
        if reply[-1] != sp("<|assistant_end|>"):  # keep the transcript well-formed after a max_tokens cut
            reply.append(sp("<|assistant_end|>"))
        self.tokens += reply


class RemoteChat:
    """--url: the conversation is a message list sent to POST /chat/completions (upstream's SSE format)."""

    def __init__(self, args):
        self.url = args.url.rstrip("/") + "/chat/completions"
        self.args = args
        self.clear()

    def clear(self):
        self.messages = []

    def reply(self, user_text, write):
        import requests

        self.messages.append({"role": "user", "content": user_text})
        body = {"messages": self.messages, "temperature": self.args.temperature, "top_k": self.args.top_k,
                "max_tokens": MAX_TOKENS}
        if self.args.model:
            body["model"] = self.args.model
        headers = {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
        text = ""
        with requests.post(self.url, json=body, headers=headers, stream=True, timeout=300) as r:
            if r.status_code != 200:
                self.messages.pop()
                try:
                    detail = r.json().get("detail") or r.json()["error"]["message"]
                except Exception:
                    detail = r.text.strip()
                raise RuntimeError(f"HTTP {r.status_code}: {detail}")
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    raise RuntimeError(data["error"])
                if "token" in data:
                    text += data["token"]
                    write(data["token"])
        self.messages.append({"role": "assistant", "content": text or " "})


def main(argv=None):
    args = parse_args(argv)
    from nanochat.common import NanochatError

    try:
        chat = RemoteChat(args) if args.url else LocalChat(args)
    except (NanochatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def write(text):
        print(text, end="", flush=True)

    print("\nNanoChat Interactive Mode")
    print("-" * 50)
    print("Type 'quit' or 'exit' to end the conversation")
    print("Type 'clear' to start a new conversation")
    print("-" * 50)
    while True:
        if args.prompt:
            user_input = args.prompt
        else:
            try:
                user_input = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print("\nGoodbye!")
                break
        if user_input.lower() in ("quit", "exit"):
            print("Goodbye!")
            break
        if user_input.lower() == "clear":
            chat.clear()
            print("Conversation cleared.")
            continue
        if not user_input:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            chat.reply(user_input, write)
        except Exception as e:  # a server error or lost connection: report it and keep the REPL alive
            print(f"\n[error: {e}]", end="")
            if args.prompt:
                print()
                return 1
        print()
        if args.prompt:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
