"""Run `gpt2 serve`: uvicorn listens at once (answering 503 while the model loads), the engine starts when loaded.

Ctrl-C: uvicorn stops accepting, gives in-flight requests `SHUTDOWN_GRACE_S` to finish, cancels the rest, and then
raises the signal again, which the CLI turns into exit code 130.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpt2cli.data.tokenizer import get_tokenizer
from gpt2cli.serving.app import ServerState, create_app
from gpt2cli.settings.sections import ServeSettings

SHUTDOWN_GRACE_S = 3


def default_model_name(checkpoint: str) -> str:
    """The checkpoint's name as the API's model id: a run folder's or file's name (`runs/x/model.safetensors` → x)."""
    path = Path(checkpoint).resolve()
    if path.is_file() and path.stem in ("model", "pytorch_model"):
        path = path.parent
    return path.stem if path.is_file() else path.name


def request_logger(json_logs: bool) -> Any:
    def log(record: dict[str, Any]) -> None:
        if json_logs:
            line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record})
        else:
            tokens = ""
            if record["prompt_tokens"] is not None:
                tokens = f" prompt={record['prompt_tokens']} completion={record['completion_tokens']}"
            line = (
                f"gpt2 serve: {record['client']} {record['method']} {record['path']} {record['status']}{tokens} "
                f"{record['duration_s']:.3f}s"
            )
        print(line, file=sys.stderr, flush=True)

    return log


def load_engine(checkpoint: str, settings: ServeSettings, state: ServerState) -> None:
    """Load the model and start the engine (on the loader thread); the server answers 503 until this ends."""
    from gpt2cli.generation.loading import load_generation_model
    from gpt2cli.runtime.compile import keep_compiled_code
    from gpt2cli.serving.engine import Engine
    from gpt2cli.serving.protocol import Limits

    def say(line: str) -> None:
        print(f"gpt2 serve: {line}", file=sys.stderr, flush=True)

    if settings.compile:
        keep_compiled_code()  # the next start loads the compiled step rather than compiling it again
    model = load_generation_model(checkpoint, settings, say)
    engine = Engine(
        model, state.tokenizer, settings.max_batch, compile=settings.compile, prompt_lookup=settings.prompt_lookup
    )
    seconds = engine.start()  # every decode shape compiled (and recorded) before the first request
    shapes = engine.buckets.shapes
    if shapes:
        rows, lengths = len({r for r, _ in shapes}), len({length for _, length in shapes})
        say(
            f"decode step compiled for {len(shapes)} shapes ({rows} batch sizes x {lengths} lengths) in {seconds:.1f} s"
        )
    state.limits = Limits(model.config.block_size, model.config.vocab_size, settings.max_n, settings.max_prompts)
    state.engine = engine


def run_server(checkpoint: str, settings: ServeSettings) -> None:
    """Serve until interrupted; a model that fails to load ends the server and raises its error."""
    import uvicorn

    from gpt2cli.formats.chat_template import read_chat_template

    template = read_chat_template(checkpoint)  # a broken one stops the server here, before anything loads
    state = ServerState(
        settings, settings.model_name or default_model_name(checkpoint), get_tokenizer(), chat_template=template
    )
    app = create_app(state, request_logger(settings.json_logs))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        lifespan="off",
    )

    interrupted: list[int] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            interrupted.append(sig)
            if state.engine is not None:  # end every stream now, so that the connections close within the grace
                state.engine.cancel_all()
            super().handle_exit(sig, frame)

    server = Server(config)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            load_engine(checkpoint, settings, state)
        except BaseException as error:  # handed to the main thread, which raises it once the server has stopped
            failure.append(error)
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(
                f"gpt2 serve: {state.model_name} on http://{settings.host}:{port} (max batch {settings.max_batch}, "
                f"{'chat template' if template is not None else 'no chat template'}, Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )

    loader = threading.Thread(target=load, name="gpt2-serve-loader", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.stop()
    loader.join(timeout=1.0)
    if failure:
        raise failure[0]
    if signal.SIGINT in interrupted:  # uvicorn raises it again itself, unless the process started with it ignored
        raise KeyboardInterrupt
