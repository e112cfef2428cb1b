"""The event stream's one-time tickets (api/tickets.py), the end of `?access_token=`, and the security
headers on every response (api/dashboard.py)."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api import tickets
from api.app import create_app
from api.deps import Caller
from api.tickets import TicketBook
from service.settings import Settings
from service.states import JobState
from service.store import Store

ALICE, BOB, ADMIN = (
    {"Authorization": "Bearer a-token"},
    {"Authorization": "Bearer b-token"},
    {"Authorization": "Bearer root-token"},
)
SPEC = {"name": "tiny", "model": {"preset": "tiny"}, "train": {"steps": 3, "global_batch": 8, "micro_batch": 2}}
HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self';",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def _client(tmp_path: Path, **settings: str) -> TestClient:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    return TestClient(create_app(Settings(data_dir=tmp_path, **settings), store=store))


@pytest.fixture
def authed(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path, tokens="a-token:alice,b-token:bob", admin_token="root-token") as client:
        yield client


@pytest.fixture
def open_api(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path) as client:
        yield client


def _ended_job(client: TestClient, headers: dict[str, str]) -> str:
    """A job of the header's user that failed after logging a line: its stream replays, then ends."""
    job = client.post("/v1/jobs", json=SPEC, headers=headers).json()["id"]
    store = client.app.state.store
    for state in (JobState.STARTING, JobState.RUNNING):
        store.transition(job, state, "test")
    store.append_logs(job, ["step 1/3 | loss 4.0000"])
    store.transition(job, JobState.FAILED, "boom")
    return job


def _stream(client: TestClient, job: str, **kwargs: object) -> tuple[int, list[str], dict]:
    """Status, the event kinds sent (an ended job's stream closes by itself) and the body of a refusal."""
    with client.stream("GET", f"/v1/jobs/{job}/stream", **kwargs) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [], r.json()
        kinds = [line.removeprefix("event: ").strip() for line in r.iter_lines() if line.startswith("event:")]
        return r.status_code, kinds, {}


def _ticket(client: TestClient, job: str, headers: dict[str, str]) -> str:
    r = client.post(f"/v1/jobs/{job}/stream-ticket", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 60 and len(r.json()["ticket"]) >= 40
    return r.json()["ticket"]


def test_a_ticket_opens_its_jobs_stream_once_without_a_header(authed: TestClient) -> None:
    job = _ended_job(authed, ALICE)
    ticket = _ticket(authed, job, ALICE)
    status, kinds, _ = _stream(authed, job, params={"ticket": ticket})
    assert status == 200 and kinds[-2:] == ["log", "end"]
    status, _, body = _stream(authed, job, params={"ticket": ticket})  # used up
    assert status == 401 and body["detail"].startswith("ticket: unknown, expired or already used")
    assert f"POST /v1/jobs/{job}/stream-ticket" in body["detail"]
    assert _stream(authed, job, headers=ALICE)[0] == 200  # the header still works, as on every route
    status, _, body = _stream(authed, job)
    assert status == 401 and "missing or unknown bearer token" in body["detail"]


def test_only_the_jobs_owner_or_the_admin_gets_a_ticket(authed: TestClient) -> None:
    job = _ended_job(authed, ALICE)
    r = authed.post(f"/v1/jobs/{job}/stream-ticket", headers=BOB)
    assert r.status_code == 404 and r.json() == {"detail": f"no job {job}"}  # as if there were none
    assert authed.post(f"/v1/jobs/{job}/stream-ticket").status_code == 401
    assert authed.post("/v1/jobs/not-a-job/stream-ticket", headers=ALICE).status_code == 404
    assert _stream(authed, job, params={"ticket": _ticket(authed, job, ADMIN)})[0] == 200
    # A ticket carries its user: bob's ticket for his own job gets him nothing of alice's.
    bobs = _ended_job(authed, BOB)
    status, _, body = _stream(authed, job, params={"ticket": _ticket(authed, bobs, BOB)})
    assert status == 401 and body["detail"].startswith("ticket: issued for another job's stream")


def test_a_ticket_for_job_a_does_not_open_job_b(authed: TestClient) -> None:
    a, b = _ended_job(authed, ALICE), _ended_job(authed, ALICE)
    ticket = _ticket(authed, a, ALICE)
    status, _, body = _stream(authed, b, params={"ticket": ticket})
    assert status == 401
    assert body == {
        "detail": f"ticket: issued for another job's stream, not job {b}; ask POST /v1/jobs/{b}/stream-ticket "
        "for a new one"
    }
    assert _stream(authed, a, params={"ticket": ticket})[0] == 401  # shown to the wrong job, it is spent


def test_an_expired_ticket_is_401(authed: TestClient) -> None:
    job = _ended_job(authed, ALICE)
    book: TicketBook = authed.app.state.tickets
    now = [1000.0]
    book.clock = lambda: now[0]
    ticket = _ticket(authed, job, ALICE)
    now[0] += 59.0
    fresh = _ticket(authed, job, ALICE)
    now[0] += 1.5  # the first is 60.5 s old, the second 1.5 s
    status, _, body = _stream(authed, job, params={"ticket": ticket})
    assert status == 401 and "expired" in body["detail"]
    assert _stream(authed, job, params={"ticket": fresh})[0] == 200


def test_odd_tickets_and_the_old_access_token_are_refused(authed: TestClient) -> None:
    job = _ended_job(authed, ALICE)
    assert _stream(authed, job, params={"ticket": "a-token"})[0] == 401  # a bearer token is no ticket
    status, _, body = _stream(authed, job, params={"ticket": "x" * 500})
    assert status == 422 and "ticket" in str(body["detail"])
    status, _, body = _stream(authed, job, params={"access_token": "a-token"})
    assert status == 422 and body["detail"] == "query: unknown parameter access_token; valid: ticket"
    r = authed.get("/v1/jobs", params={"access_token": "a-token"})
    assert r.status_code == 422 and "unknown parameter access_token" in r.json()["detail"]
    assert "access_token" not in r.json()["detail"].split("valid:")[1]
    r = authed.post(f"/v1/jobs/{job}/stream-ticket", params={"ticket": "x"}, headers=ALICE)
    assert r.status_code == 422 and r.json()["detail"] == "query: unknown parameter ticket; valid: none"


def test_without_tokens_the_stream_needs_no_ticket(open_api: TestClient) -> None:
    job = _ended_job(open_api, {})
    status, kinds, _ = _stream(open_api, job)
    assert status == 200 and "event" in kinds and kinds[-2:] == ["log", "end"]
    assert _stream(open_api, job, params={"ticket": _ticket(open_api, job, {})})[0] == 200


def test_the_book_purges_expired_tickets_and_caps_what_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    book = TicketBook(clock=lambda: now[0])
    alice, bob = Caller("alice", admin=False), Caller("bob", admin=False)
    first = book.issue("a" * 32, alice).ticket
    for _ in range(tickets.PER_USER):
        book.issue("a" * 32, alice)
    assert len(book) == tickets.PER_USER  # a user's oldest ticket makes room for the newest
    with pytest.raises(Exception, match="unknown, expired or already used"):
        book.redeem(first, "a" * 32)
    now[0] += tickets.TTL_S
    book.issue("b" * 32, bob)
    assert len(book) == 1  # alice's expired ones went on the next issue
    monkeypatch.setattr(tickets, "MAX_OUTSTANDING", 3)
    for user in ("carol", "dave"):
        book.issue("c" * 32, Caller(user, admin=False))
    with pytest.raises(Exception, match="3 outstanding") as refused:
        book.issue("c" * 32, Caller("erin", admin=False))
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "60"}


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/vendor/plotly.min.js", "/v1/jobs", "/healthz",
                                  "/metrics", "/v1/jobs/0123/events", "/nowhere"])  # fmt: skip
def test_security_headers_on_every_response(open_api: TestClient, path: str) -> None:
    r = open_api.get(path)
    for name, value in HEADERS.items():
        assert value in r.headers.get(name, ""), (name, r.headers.get(name))
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "unsafe-eval" not in r.headers["content-security-policy"]


def test_swagger_pages_keep_every_header_but_the_csp(open_api: TestClient) -> None:
    r = open_api.get("/docs")  # Swagger UI: a CDN script and an inline one
    assert r.status_code == 200 and "content-security-policy" not in r.headers
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def test_security_headers_on_the_stream_and_refusals(authed: TestClient) -> None:
    job = _ended_job(authed, ALICE)
    with authed.stream("GET", f"/v1/jobs/{job}/stream", headers=ALICE) as r:
        assert r.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in r.headers
    r = authed.get("/v1/jobs")
    assert r.status_code == 401 and r.headers["x-frame-options"] == "DENY"


def test_the_index_page_has_no_inline_script(open_api: TestClient) -> None:
    html = open_api.get("/").text
    for tag in html.split("<script")[1:]:
        assert tag.lstrip().startswith("src=") and tag.split(">", 1)[1].startswith("</script>")
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE)  # no inline event handlers
