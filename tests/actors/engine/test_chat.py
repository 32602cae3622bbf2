"""Chat requests: messages rendered with the checkpoint's own chat template, as transformers
renders and tokenizes them; refusals name the field."""

from __future__ import annotations

import copy

import pytest

from specserve.actors.convert import prompt_from_pb
from specserve.actors.demo import demo_path
from specserve.actors.engine.build import load_tokenizer
from specserve.actors.engine.chat import MAX_MESSAGES, render_chat
from specserve.actors.engine.request import InvalidRequestError
from specserve.v1 import generation_pb2

CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fibonacci(n):"},
        {"role": "assistant", "content": "    return n"}, {"role": "user", "content": "Make it iterative. é ✓"}]
# a template in the style of instruct checkpoints: BOS as text, alternation enforced
STRICT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 0 and "
          "messages[loop.index0 - 1]['role'] == 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}"
          "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(demo_path("target"))


def transformers_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def test_the_demo_template_renders_like_transformers_apply_chat_template(tokenizer):
    ids = render_chat(tokenizer, CHAT)
    assert ids == transformers_ids(tokenizer, CHAT)
    assert tokenizer.decode(ids).endswith("# assistant:\n")  # the generation prompt is added


def test_a_template_that_writes_special_tokens_renders_like_transformers(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = STRICT
    ids = render_chat(strict, CHAT)
    assert ids == transformers_ids(strict, CHAT)
    assert ids[0] == strict.bos_token_id and ids.count(strict.bos_token_id) == 1 + len(CHAT)  # bos == eos here


def test_what_the_template_refuses_is_invalid_argument_on_messages(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = STRICT
    with pytest.raises(InvalidRequestError, match="roles must alternate") as err:
        render_chat(strict, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert err.value.field == "messages"


def test_a_checkpoint_without_a_chat_template_refuses_messages(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        render_chat(bare, CHAT)
    assert err.value.field == "messages"


def test_bad_messages_are_refused_naming_the_field(tokenizer):
    with pytest.raises(InvalidRequestError) as err:
        render_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "", "content": "b"}])
    assert err.value.field == "messages.1.role"
    with pytest.raises(InvalidRequestError, match=f"more than {MAX_MESSAGES}"):
        render_chat(tokenizer, [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1))


def test_a_request_holds_exactly_one_of_prompt_ids_and_messages(tokenizer):
    chat = [generation_pb2.ChatMessage(**m) for m in CHAT]
    request = generation_pb2.GenerateRequest(messages=chat)
    assert prompt_from_pb(request, tokenizer) == transformers_ids(tokenizer, CHAT)
    for extra in ({"prompt": "x"}, {"prompt_token_ids": [1]}):
        with pytest.raises(InvalidRequestError, match="exactly one of prompt, prompt_token_ids and messages"):
            prompt_from_pb(generation_pb2.GenerateRequest(messages=chat, **extra), tokenizer)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        prompt_from_pb(generation_pb2.GenerateRequest(), tokenizer)
