"""The page of eval/demo.py (Gradio): one prompt for every model, their images side by side.

Shared inputs (prompt, negative prompt, seed) and, per model, its own steps and guidance (a one-step
model starts at 1 and 1), its image, the seconds it took and its U-Net's parameter count. The models
run one after another, each image shown as soon as it is done; one click runs at a time (one GPU).
Nothing is fetched from outside: analytics off, system fonts instead of the theme's web fonts.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version check: read before import

import gradio as gr

from sdkd.cli import limits
from sdkd.cli.errors import UserError, first_line
from sdkd.eval.page.models import DemoModel, format_params, generate

CSS = """
.result-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def result_line(model: DemoModel, seconds: float, steps: int, guidance: float) -> str:
    return (f"**{seconds:.2f} s** · {steps} step{'s' * (steps != 1)} · guidance {guidance:g} · "
            f"U-Net {format_params(model.params)} params")


def build_page(models: list[DemoModel], problems: list[str] = ()) -> gr.Blocks:
    """The page for `models` (all loaded and checked); `problems`: the start-up lines of those left out."""
    # delete_cache: the images Gradio writes for the browser, removed after an hour and when the server stops.
    with gr.Blocks(title="sdkd: teacher and students", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("## Teacher and students, side by side\nOne prompt, one image per model, each with the "
                    "seconds it took (text encoder, every U-Net step and the VAE decode) and its U-Net's size.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="a red fox in the snow", lines=2, scale=4,
                                elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, scale=3, elem_id="negative-prompt")
            with gr.Column(scale=1, min_width=160):
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
        settings, outputs = [], []
        with gr.Row(equal_height=False):
            for i, model in enumerate(models):
                with gr.Column(min_width=220, elem_id=f"model-{i}"):
                    kind = " · one-step" if model.one_step else ""
                    gr.Markdown(f"### {model.name}\n`{model.path}` · U-Net {format_params(model.params)} "
                                f"params{kind}")
                    with gr.Row():
                        settings.append(gr.Number(label="Steps", value=model.default_steps, precision=0, minimum=1,
                                                  maximum=1000, min_width=80, elem_id=f"steps-{i}"))
                        settings.append(gr.Number(label="Guidance", value=model.default_guidance, minimum=0,
                                                  step=0.5, min_width=80, elem_id=f"guidance-{i}"))
                    outputs.append(gr.Image(label=model.name, show_label=False, format="png", type="pil",
                                            interactive=False, height=256, buttons=["download", "fullscreen"],
                                            elem_id=f"image-{i}",
                                            elem_classes="result-image"))
                    outputs.append(gr.Markdown("", elem_id=f"info-{i}"))
        if problems:
            gr.Markdown("Left out at start-up:\n" + "\n".join(f"- {line}" for line in problems))

        def run(prompt_text, negative_text, seed_value, *per_model):
            if not (prompt_text or "").strip():
                raise gr.Error("Type a prompt first.")
            try:  # said once, not once per model
                for name, text in (("prompt", prompt_text), ("negative prompt", negative_text or "")):
                    limits.check_prompt(text, name)
                seed_value = limits.check_seed(seed_value if seed_value is not None else 0, "seed")
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            shown = [gr.skip()] * len(outputs)
            for i in range(len(models)):
                shown[2 * i + 1] = "generating..."
            yield shown
            for i, model in enumerate(models):
                steps, guidance = per_model[2 * i], per_model[2 * i + 1]
                try:
                    result = generate(model, prompt_text, negative_text, steps=steps, guidance=guidance,
                                      seed=seed_value)
                    shown[2 * i] = result.image
                    shown[2 * i + 1] = result_line(model, result.seconds, result.steps, result.guidance)
                except UserError as err:  # e.g. a size or guidance this model cannot take
                    shown[2 * i], shown[2 * i + 1] = None, f"error: {err}"
                except Exception as err:  # noqa: BLE001 (out of memory, ...): the other models still run
                    traceback.print_exc(file=sys.stderr)
                    shown[2 * i], shown[2 * i + 1] = None, f"failed: {first_line(err)}"
                yield shown

        gr.on([button.click, prompt.submit], run, inputs=[prompt, negative, seed, *settings], outputs=outputs)
    return page


class BodyLimit:
    """ASGI middleware: a request whose body is over `max_bytes` is answered 413 unread, so a flood of large
    requests leaves the server's memory flat (a body without Content-Length is counted as it arrives)."""

    def __init__(self, app, max_bytes: int = limits.DEMO_MAX_BODY):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._too_large(send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _TooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = f"request body over {self.max_bytes:,} bytes".encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def serve(page: gr.Blocks, host: str, port: int, share: bool = False) -> None:
    """Serve `page` until Ctrl+C (or SIGTERM); prints the address once the server answers. One generation
    at a time, at most DEMO_MAX_QUEUE waiting (more: 503), no request body over DEMO_MAX_BODY (413); the API
    cannot skip the queue."""
    import signal

    from starlette.middleware import Middleware

    page.queue(default_concurrency_limit=1, max_size=limits.DEMO_MAX_QUEUE, api_open=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a plain stop closes the server like Ctrl+C
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    _, local_url, share_url = page.launch(server_name=host, server_port=port, share=share, quiet=True,
                                          prevent_thread_lock=True, css=CSS, theme=theme,
                                          footer_links=["settings"], app_kwargs={"middleware": [Middleware(BodyLimit)]})
    print(f"demo: {local_url}" + (f" (public: {share_url})" if share_url else "") + " (Ctrl+C to stop)",
          flush=True)
    page.block_thread()
