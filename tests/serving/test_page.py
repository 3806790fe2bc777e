"""The page at `/`, without a browser (tests/serving/test_page_browser.py drives it in one): served to anyone, one
self-contained file, and a policy that lets it reach this server only."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from gpt2cli import get_tokenizer
    from gpt2cli.serving.app import ServerState, create_app
    from gpt2cli.settings.sections import ServeSettings

    state = ServerState(ServeSettings(api_key="secret"), "tiny", get_tokenizer())  # no engine: the model "loads"
    return TestClient(create_app(state, log=lambda record: None))


def test_the_page_needs_no_key_and_reaches_nothing_but_this_server(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert client.get("/v1/models").status_code == 401  # what the page calls still asks for the key
    html = response.text
    assert "<script>" in html and "<style>" in html
    for reference in ("://", "src=", "@import", "url("):  # nothing loaded from anywhere (the icon is `data:,`)
        assert reference not in html


def test_every_element_the_script_uses_is_on_the_page(client):
    html = client.get("/").text
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', html))
    assert used and used <= ids, used - ids
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenizer_info", "/health"):
        assert f'"{route}"' in html
