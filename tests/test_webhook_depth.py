"""The webhook receiver under correctly signed but hostile JSON: nesting deep enough to exhaust the
decoder's recursion is a 400, never a 500, and the receiver goes on serving."""

from __future__ import annotations

import json
import time

from test_webhook import hook, post, signed  # noqa: F401 (fixture)


def _event(data: str) -> str:
    return '{"entity": "model_version_alias", "action": "created", "data": ' + data + "}"


def test_deeply_nested_signed_bodies_get_400_and_the_receiver_keeps_serving(hook):
    """A signed 30,000-deep body answered 500 (RecursionError in json.loads)."""
    deep = ["[" * n + "]" * n for n in (30_000, 10_000, 3_000)]
    deep += ['{"a":' * 10_000 + "1" + "}" * 10_000]  # under MAX_BODY_BYTES, as every body here
    deep += [_event("[" * 20_000 + "]" * 20_000), _event('{"x":' * 10_000 + "null" + "}" * 10_000)]
    started = time.time()
    for body in deep:
        status, answer = post(hook, body.encode(), signed(body))
        assert status == 400, (body[:20], len(body), answer)
    status, answer = post(hook, deep[0].encode(), signed(deep[0]))
    assert answer["message"] == "body is JSON nested too deeply"
    assert time.time() - started < 20
    test_delivery = json.dumps({"entity": "model_version_alias", "action": "created",  # served without the store
                                "data": {"name": "example_model", "alias": "example_alias"}})
    status, answer = post(hook, test_delivery.encode(), signed(test_delivery))
    assert status == 200 and answer["message"].startswith("test delivery received"), answer
