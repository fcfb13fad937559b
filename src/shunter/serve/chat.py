"""Chat messages to a prompt: the model's own chat template when it ships one
(`chat_template` in tokenizer_config.json, or a chat_template.jinja file, rendered with Jinja2
as transformers does), else a plain template:

    system: You are terse.
    user: Hello
    assistant:

one `role: content` line per message, then `assistant:` for the model to continue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from shunter.errors import ShunterError

Message = dict[str, str]


def plain_template(messages: list[Message]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def load_chat_template(model_dir: Path) -> Callable[[list[Message]], str]:
    """The function that renders a conversation for this model (see the module docstring)."""
    source, special = _template_source(Path(model_dir))
    if source is None:
        return plain_template
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    except TemplateError as exc:
        raise ShunterError(f"{model_dir}: the chat template does not parse: {exc}") from None

    def render(messages: list[Message]) -> str:
        try:
            return template.render(messages=messages, add_generation_prompt=True, **special)
        except TemplateError as exc:  # a template may raise on a conversation it does not allow
            raise ValueError(f"the model's chat template refused the messages: {exc}") from None

    return render


def _template_source(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    config_path = model_dir / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ShunterError(f"{config_path}: cannot read it: {exc}") from None
        if not isinstance(config, dict):
            raise ShunterError(f"{config_path}: expected a JSON object")
    special = {k: v for k in ("bos_token", "eos_token") if isinstance(v := config.get(k), str)}
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), special
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ShunterError(
            f"{config_path}: field chat_template: expected a string (named templates are not read)"
        )
    return template, special
