"""DeepSeek-R1-Distill chat format: the template, prompt rendering, the think-block parser.

The official R1-Distill template (``tokenizer_config.json`` of
deepseek-ai/DeepSeek-R1-Distill-Llama-8B) deletes everything before ``</think>`` from assistant
turns, so a conversation rendered for training would lose the reasoning. Training therefore uses
plain prompt/completion strings: the prompt rendered with the generation prompt (which ends in
``<｜Assistant｜><think>\\n``), the completion ``reasoning + "\\n</think>\\n\\n" + answer``. The
rendered prompt starts with the BOS text, and the Llama-3 tokenizer adds a BOS of its own, so
the text's BOS is dropped (one BOS per sequence, as in pre-training). The data is prepared with
no model at all (:func:`r1_prompt`); training checks that its base's tokenizer renders prompts the
same way (:func:`check_prompt_format`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
"""The chat template of deepseek-ai/DeepSeek-R1-Distill-Llama-8B (its tokenizer_config.json)."""


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn (no system prompt, as DeepSeek recommends for R1 distills),
    rendered with the generation prompt; the BOS text is dropped when the tokenizer adds a BOS
    itself, so the tokenized sequence has one."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def r1_prompt(prompt: str) -> str:
    """What :func:`render_prompt` gives with the R1-Distill-Llama tokenizer, with no tokenizer:
    :data:`R1_DISTILL_TEMPLATE` rendered by transformers' own template renderer (the one
    ``apply_chat_template`` calls), the BOS text dropped because the Llama-3 tokenizer adds one."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([[{"role": "user", "content": prompt}]], chat_template=R1_DISTILL_TEMPLATE,
                                        add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    return rendered[0].removeprefix(BOS)


def check_prompt_format(tokenizer: Any, base: str) -> None:
    """Raise ValueError when ``tokenizer`` (of ``base``) renders a prompt otherwise than
    :func:`r1_prompt`, the form the prepared data is in (another template, no BOS of its own)."""
    probe = "Is this prompt rendered the R1-Distill-Llama way?"
    theirs, ours = render_prompt(tokenizer, probe), r1_prompt(probe)
    if theirs != ours:
        raise ValueError(f"base model {base!r} renders a prompt as {theirs!r}, the prepared data as {ours!r}: "
                         "fine-tune an R1-Distill-Llama base (finetune.base_model)")


def adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizing plain text puts a BOS in front (the Llama-3 tokenizer does)."""
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def completion_text(reasoning: str, answer: str) -> str:
    """What the model learns to write after the generation prompt: the reasoning (the think block
    the prompt opened), ``</think>``, then the answer."""
    return f"{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


@dataclass(frozen=True)
class Reply:
    """A model's reply split into its reasoning and its answer."""

    reasoning: str
    answer: str
    closed: bool
    """Whether the think block was closed (False: generation stopped while still thinking)."""


_OPEN = re.compile(r"^\s*<think>\s*", re.S)


def parse_reply(text: str) -> Reply:
    """Split a reply into reasoning and answer. Handles a reply that repeats ``<think>``, one
    whose think block the prompt opened (``reasoning</think>answer``), one with no think block at
    all (all answer), and one cut off while thinking (all reasoning, no answer)."""
    for special in (EOS, BOS):
        text = text.replace(special, "")
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return Reply(_OPEN.sub("", reasoning).strip(), answer.strip(), True)
    if _OPEN.match(text):
        return Reply(_OPEN.sub("", text).strip(), "", False)
    return Reply("", text.strip(), True)
