"""
The Gradio chat page, built inside the ingress replica and mounted into its FastAPI app at "/".

Streaming replies, temperature / top-k / max-tokens controls, a model picker when the app serves several models,
a new-conversation (clear) button and regenerate (retry) / undo / edit on messages (Gradio's ChatInterface), and a
status line that says clearly when the engine is not ready. It talks to the engine deployment through
serve.api.EngineClient (no HTTP hop, no torch here). Ray's stock GradioServer is broken with Gradio 6, hence
serve.ingress + gr.mount_gradio_app (see serve.app).

With an API key set, the page opens on Gradio's login form: any user name, the key as the password (compared in
constant time); Gradio's session cookie then authorizes the page's own calls. The page's backend reaches the engines
in-process, so the key never travels further. The API is also usable from `gradio_client`:
Client(url, auth=("user", key)).predict(message, temperature, top_k, max_tokens, model, api_name="/chat").
"""

from __future__ import annotations

import gradio as gr

from serve.guard import check_key
from serve.protocol import ApiError, parse_chat_request

NOT_READY = "⚠️ The engine is not ready (the model may still be loading, or every replica is down). Try again shortly."


def _text(content) -> str:
    """Gradio message content: a string, or a list of parts / a dict with "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_text(c) for c in content)
    return ""


def make_respond(client):
    """The ChatInterface function: (message, history, temperature, top_k, max_tokens, model) -> growing reply."""

    async def respond(message, history, temperature, top_k, max_tokens, model=None):
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in (history or [])
                    if m.get("role") in ("user", "assistant") and _text(m["content"])]
        messages.append({"role": "user", "content": _text(message)})
        body = {"messages": messages, "temperature": float(temperature), "top_k": int(top_k),
                "max_tokens": int(max_tokens), "model": model or None}
        try:
            req = parse_chat_request(body, openai=False, defaults=client.defaults)
            text = ""
            async for ev in client.events(req):
                if ev["type"] == "delta":
                    text += ev["text"]
                    yield text
                elif ev["type"] == "error":
                    yield text + f"\n\n⚠️ {ev['message']}"
                    return
            if not text:
                yield "(empty reply)"
        except ApiError as e:
            yield NOT_READY if e.status == 503 else f"⚠️ {e.message}"

    return respond


def build_ui(client) -> gr.Blocks:
    """client: serve.api.EngineClient."""
    respond = make_respond(client)

    async def status():
        stats = await client.stats()
        if stats is None:
            return NOT_READY
        served = ", ".join(client.models.names)
        return (f"Engine ready: **{served}** on {stats['device']} · batch {stats['running']}/"
                f"{stats['max_batch_size']} running")

    with gr.Blocks(title="nanochat") as demo:
        gr.Markdown("# nanochat")
        status_line = gr.Markdown("Checking the engine…")
        temperature = gr.Slider(0.0, 2.0, value=client.defaults.temperature, step=0.05, label="Temperature",
                                render=False)
        top_k = gr.Slider(0, 200, value=client.defaults.top_k, step=1, label="Top-k (0 = off)", render=False)
        max_tokens = gr.Slider(1, 4096, value=client.defaults.max_tokens, step=1, label="Max tokens", render=False)
        names = client.models.names
        model = gr.Dropdown(names, value=names[0], label="Model", visible=len(names) > 1, render=False)
        if len(names) > 1:
            model.render()  # above the chat, where it is seen: the answer depends on it
        gr.ChatInterface(respond, additional_inputs=[temperature, top_k, max_tokens, model],
                         additional_inputs_accordion=gr.Accordion("Sampling", open=False, render=False),
                         api_name="chat", chatbot=gr.Chatbot(label="nanochat", height=480, placeholder="Ask anything"))
        demo.load(status, outputs=status_line)
    return demo


def mount_ui(app, client, api_key: str | None = None):
    """Mount the chat page at "/" of `app` (after the API routes, which therefore take precedence)."""
    auth = None
    if api_key:
        def auth(username, password):
            return check_key(api_key, password or "")

    return gr.mount_gradio_app(app, build_ui(client), path="/", auth=auth,
                               auth_message="This server needs its API key: any user name, the key as password.")
