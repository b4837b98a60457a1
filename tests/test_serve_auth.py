"""Auth of `streamer serve`: every route of the real app refuses a missing or a wrong token (the routes are
read from the app, not listed by hand), cookie sessions, the failed-login limit, the token store and the
`streamer tokens` commands, and serve.auth false refused beyond loopback. A real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import stat
import subprocess
from html.parser import HTMLParser

import httpx
import pytest
import websockets
from starlette.routing import Mount

from streamer import cli
from streamer.config import load_settings
from streamer.errors import ConfigError
from streamer.serve.app import CONTENT_SECURITY_POLICY, OPEN, create_app
from streamer.serve.auth import SESSION_COOKIE, TokenStore, store_path
from streamer.serve.context import ServeContext
from streamer.serve.server import HttpServer, bind_socket, check_tls


def _serve(tmp_path, **serve):
    settings = load_settings(overrides={"serve": serve} if serve else None)
    tokens = TokenStore(tmp_path / "tokens.json")
    _, token = tokens.create("admin")
    ctx = ServeContext(settings=settings, tokens=tokens)
    app = create_app(ctx)
    tls = (settings.serve.tls_cert_file, settings.serve.tls_key_file) if settings.serve.tls else None
    return app, ctx, token, HttpServer(app, bind_socket("127.0.0.1", 0), ctx, tls=tls).start()


def self_signed(folder):
    """A certificate for 127.0.0.1 and its key, made by the openssl command (as a site would)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing (apt-get install openssl)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app, ctx, token, http = _serve(tmp_path_factory.mktemp("auth"), login_attempts_per_minute=10_000)
    yield app, ctx, token, http
    http.stop()


def _routes(app):
    """(kind, method, path) for every route of the app, included routers and mounts too."""
    found = []

    def walk(routes):
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI's included routers
                walk(route.original_router.routes)
            elif isinstance(route, Mount):
                found.extend(("http", "GET", f"{route.path}/{name}") for name in ("index.html", "app.js", "nope.css"))
            elif type(route).__name__.endswith("WebSocketRoute"):
                found.append(("ws", "GET", route.path))
            else:
                path = re.sub(r"\{[^}]+\}", "x", route.path)
                found.extend(("http", method, path) for method in sorted(route.methods or ()))

    walk(app.routes)
    return found


def _ws_status(url, headers):
    async def connect():
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=5):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(connect())


def test_every_route_refuses_a_missing_or_wrong_token(server):
    app, _, token, http = server
    routes = _routes(app)
    paths = {path for _, _, path in routes}
    # The app's real routes are all there (a vacuous loop would prove nothing).
    assert {"/api/v1/verify", "/api/v1/people/x", "/api/v1/streams/x/live.mjpeg", "/api/v1/events/ws", "/docs",
            "/openapi.json", "/", "/static/index.html", "/api/v1/strangers", "/api/v1/strangers/x/thumbnail.jpg",
            "/api/v1/strangers/x/promote", "/docs-assets/index.html"} <= paths and len(routes) > 30
    with httpx.Client(base_url=http.url, timeout=10, follow_redirects=False) as client:
        for kind, method, path in routes:
            if kind == "ws":
                url = http.url.replace("http", "ws") + path
                for headers in ({}, {"Authorization": "Bearer stk_wrong"}, {"Cookie": f"{SESSION_COOKIE}=forged"}):
                    assert _ws_status(url, headers) == 403, (path, headers)
                assert _ws_status(url, {"Authorization": f"Bearer {token}"}) == 101
                continue
            if (method, path) in OPEN:
                continue
            for headers in ({}, {"Authorization": "Bearer stk_wrong"}, {"Authorization": f"Basic {token}"},
                            {"Cookie": f"{SESSION_COOKIE}=forged"}):
                answer = client.request(method, path, headers=headers)
                if path.startswith("/api/") or method not in ("GET", "HEAD"):
                    assert answer.status_code == 401, (method, path, headers, answer.status_code)
                    assert list(answer.json()) == ["error"]
                else:  # a page: to the login page
                    assert (answer.status_code, answer.headers["location"]) == (303, "/login"), (method, path)
            allowed = client.request(method, path, headers={"Authorization": f"Bearer {token}"})
            assert allowed.status_code not in (401, 303), (method, path)
    # Only what the login page needs is open.
    assert {path for _, path in OPEN} == {"/login", "/api/v1/login", "/static/login.js", "/static/style.css"}


def test_cookie_login_logout_and_revocation(server, tmp_path):
    _, ctx, token, http = server
    with httpx.Client(base_url=http.url, timeout=10) as client:
        assert client.get("/login").status_code == 200
        assert client.post("/api/v1/login", json={"token": "stk_wrong"}).status_code == 401
        assert client.post("/api/v1/login", json={}).json() == {"error": "missing field token"}
        answer = client.post("/api/v1/login", json={"token": token})
        assert answer.status_code == 204
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/" in cookie and token not in cookie
        assert client.get("/api/v1/me").json() == {"token": "admin"}
        assert client.post("/api/v1/logout").status_code == 204
        assert client.get("/api/v1/me").status_code == 401
        # A session ends with its token.
        record, other = ctx.tokens.create("kiosk")
        assert client.post("/api/v1/login", json={"token": other}).status_code == 204
        assert client.get("/api/v1/me").json() == {"token": "kiosk"}
        ctx.tokens.revoke(record.id)
        assert client.get("/api/v1/me").status_code == 401
        assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {other}"}).status_code == 401


def test_failed_logins_are_rate_limited_per_client(tmp_path):
    _, _, token, http = _serve(tmp_path, login_attempts_per_minute=3)
    try:
        with httpx.Client(base_url=http.url, timeout=10) as client:
            for _ in range(2):
                assert client.post("/api/v1/login", json={"token": "stk_guess"}).status_code == 401
            # A wrong bearer token is a failed login too (else guessing would just move there).
            assert client.get("/api/v1/me", headers={"Authorization": "Bearer stk_guess"}).status_code == 401
            refused = client.post("/api/v1/login", json={"token": token})  # even the right one, for a minute
            assert refused.status_code == 429 and "too many failed logins" in refused.json()["error"]
            assert "Retry-After" in refused.headers
            assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 429
    finally:
        http.stop()


def test_websocket_from_another_site_is_refused(server):
    _, _, token, http = server
    url = http.url.replace("http", "ws") + "/api/v1/events/ws"
    headers = {"Authorization": f"Bearer {token}"}
    assert _ws_status(url, {**headers, "Origin": "http://evil.example"}) == 403
    assert _ws_status(url, {**headers, "Origin": http.url}) == 101


def test_token_store_keeps_hashes_only_mode_0600(tmp_path):
    store = TokenStore(tmp_path / "t.json")
    record, token = store.create("admin")
    raw = (tmp_path / "t.json").read_text()
    assert token not in raw and record.hash in raw
    assert stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == 0o600
    assert store.verify(token) == record and store.verify(token + "x") is None and store.verify("") is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a streamer token file"):
        TokenStore(tmp_path / "bad.json").records()


def test_tokens_cli_create_list_revoke(tmp_path, capsys):
    gallery = tmp_path / "people.db"
    assert cli.main(["tokens", "create", "dashboard", "--gallery", str(gallery)]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[-1]
    assert out == token + "\n" and token.startswith("stk_")
    path = tmp_path / "people.db.tokens.json"  # beside the gallery, where `streamer serve` looks
    assert TokenStore(path).verify(token).name == "dashboard" and token not in path.read_text()
    assert cli.main(["tokens", "list", "--gallery", str(gallery), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], sorted(r)) for r in rows] == [("dashboard", ["created", "id", "name"])]
    assert cli.main(["tokens", "revoke", rows[0]["id"], "--gallery", str(gallery)]) == 0
    assert TokenStore(path).verify(token) is None
    capsys.readouterr()
    assert cli.main(["tokens", "revoke", "dashboard", "--gallery", str(gallery)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no token with id or name 'dashboard'" in err
    # With --config and no gallery: beside the config file; serve.token_store wins over both.
    config = tmp_path / "conf" / "streamer.yaml"
    config.parent.mkdir()
    config.write_text("serve:\n  bind: 127.0.0.1:8099\n")
    assert cli.main(["tokens", "create", "--config", str(config)]) == 0
    assert (tmp_path / "conf" / "streamer.tokens.json").is_file()
    config.write_text(f"serve:\n  token_store: {tmp_path / 'elsewhere.json'}\n")
    assert store_path(load_settings(config), config) == tmp_path / "elsewhere.json"


def test_auth_off_only_on_loopback(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="serve.auth cannot be false"):
        load_settings(overrides={"serve": {"auth": False, "bind": "0.0.0.0:8080"}})
    monkeypatch.setenv("STREAMER_SERVE__AUTH", "false")
    assert cli.main(["serve", "--bind", "0.0.0.0:8080"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serve.auth cannot be false" in err
    monkeypatch.delenv("STREAMER_SERVE__AUTH")
    _, _, _, http = _serve(tmp_path, auth=False, bind="127.0.0.1:0")
    try:
        assert httpx.get(http.url + "/api/v1/me", timeout=10).json() == {"token": None}
    finally:
        http.stop()


class _Refs(HTMLParser):
    """Every URL a page loads: src and href attributes."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls.extend(value for name, value in attrs if name in ("src", "href") and value)


def test_docs_work_offline_and_every_page_has_the_csp(server):
    """/docs loads Swagger UI from this server only (the CDN FastAPI uses is out of reach offline)."""
    _, _, token, http = server
    with httpx.Client(base_url=http.url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = _Refs()
        refs.feed(page.text)
        assert len(refs.urls) >= 4 and "://" not in page.text.replace("http://www.w3.org", ""), refs.urls
        assert "<script>" not in page.text  # no inline script: the CSP would refuse it
        for url in refs.urls:
            assert url.startswith("/") and not url.startswith("//"), url
            if url.endswith((".js", ".css", ".png", ".json")):
                asset = client.get(url)
                assert asset.status_code == 200 and len(asset.content) > 100, (url, asset.status_code)
        assert "SwaggerUIBundle" in client.get("/docs-assets/swagger-ui-bundle.js").text
        assert "://" not in client.get("/static/docs.js").text
        assert client.get("/openapi.json").json()["paths"]["/api/v1/strangers/{stranger_id}/promote"]
        # The Content-Security-Policy on every answer: pages, assets, API, redirects, errors.
        for path in ("/docs", "/", "/static/app.js", "/api/v1/me", "/api/v1/nowhere"):
            assert client.get(path).headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
    for path in ("/login", "/"):
        answer = httpx.get(http.url + path, timeout=10)
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src" not in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY and "default-src 'self'" in CONTENT_SECURITY_POLICY


def test_https_with_a_certificate_and_a_secure_cookie(tmp_path):
    cert, key = self_signed(tmp_path)
    _, _, token, http = _serve(tmp_path, tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        assert http.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=http.url, timeout=10, verify=trusted) as client:
            answer = client.post("/api/v1/login", json={"token": token})
            assert answer.status_code == 204
            cookie = answer.headers["set-cookie"]
            assert "; Secure" in cookie and "HttpOnly" in cookie, cookie
            assert client.get("/api/v1/me").json() == {"token": "admin"}  # the cookie goes back over HTTPS
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate gets nowhere
            httpx.get(http.url + "/login", timeout=10)
        with pytest.raises(httpx.HTTPError):  # and plain HTTP on the port is no way in
            httpx.get(http.url.replace("https", "http") + "/api/v1/me", headers={"Authorization": f"Bearer {token}"},
                      timeout=10)
    finally:
        http.stop()
    # Without TLS the cookie is not Secure (a loopback console over plain HTTP must still log in).
    plain = tmp_path / "plain"
    plain.mkdir()
    _, _, token, http = _serve(plain)
    try:
        cookie = httpx.post(http.url + "/api/v1/login", json={"token": token}, timeout=10).headers["set-cookie"]
        assert "Secure" not in cookie
    finally:
        http.stop()


def test_plain_http_beyond_loopback_is_refused_and_tls_files_are_checked(tmp_path):
    cert, key = self_signed(tmp_path)
    with pytest.raises(ConfigError, match=r"serve.bind 0.0.0.0:8080 listens beyond loopback without TLS.*"
                                          r"serve.tls_cert_file.*serve.allow_plain_http"):
        load_settings(overrides={"serve": {"bind": "0.0.0.0:8080"}})
    assert load_settings(overrides={"serve": {"bind": "0.0.0.0:8080", "allow_plain_http": True}}).serve.tls is False
    served = load_settings(overrides={"serve": {"bind": "[::]:8443", "tls_cert_file": str(cert),
                                                "tls_key_file": str(key)}}).serve
    assert served.tls and served.tls_cert_file == cert
    with pytest.raises(ConfigError, match="go together"):
        load_settings(overrides={"serve": {"tls_cert_file": str(cert)}})
    with pytest.raises(ConfigError, match=r"serve.tls_key_file.*is not a file"):
        load_settings(overrides={"serve": {"tls_cert_file": str(cert), "tls_key_file": str(tmp_path / "nope.pem")}})
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot use them for HTTPS"):
        check_tls(tmp_path / "junk.pem", key)
    other, _ = self_signed(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    with pytest.raises(ConfigError, match="cannot use them for HTTPS"):  # a key of another certificate
        check_tls(other, key)
