"""Pictures and files with a page message (jarvis.attachments), in-process: OpenAI's content parts in, checked
and decoded off the hub, kept with the conversation, sent to the model as parts on every turn, served back."""

from __future__ import annotations

import base64
import gc
import io
import json
import random
import time

import pytest
from PIL import Image

from jarvis import state
from tests.clients import content_of, sse
from tests.hub import hub_gaps


def png(width: int = 4, height: int = 3, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def text_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer says `text` (written by hand: no PDF writer is a dependency)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def image_part(data: bytes, media: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{base64.b64encode(data).decode()}"}}


def file_part(name: str, data: bytes, media: str = "text/plain") -> dict:
    return {"type": "file", "file": {"filename": name, "file_data": f"data:{media};base64,"
                                                                      f"{base64.b64encode(data).decode()}"}}


def post(client, conversation_id, content):
    return client.post(f"/api/conversations/{conversation_id}/messages", json={"content": content})


def new(client) -> str:
    return client.post("/api/conversations", json={}).json["id"]


def test_a_picture_and_a_file_reach_the_model_as_parts_on_every_turn_and_are_served_back(client, backend):
    picture, log = png(), b"2026-12-02 ERROR disk full on /var\n"
    conversation_id = new(client)
    response = post(client, conversation_id, [{"type": "text", "text": "What went wrong?"}, image_part(picture),
                                              file_part("server.log", log)])
    assert response.status_code == 200 and content_of(sse(response.get_data())) == "w0 w1 w2 "
    [user] = [m for m in backend.requests[0].body["messages"] if m["role"] == "user"]
    text, image = user["content"]
    assert text["type"] == "text" and text["text"].startswith("What went wrong?")
    assert "--- server.log ---\n2026-12-02 ERROR disk full on /var" in text["text"]
    assert image == image_part(picture)  # the same bytes, as a data: URL
    post(client, conversation_id, "And now?").get_data()  # a later turn re-sends them
    assert backend.requests[1].body["messages"][0] == user
    saved = client.get(f"/api/conversations/{conversation_id}").json["messages"][0]
    assert saved["content"] == "What went wrong?"
    kinds = {attachment["kind"]: attachment for attachment in saved["attachments"]}
    served = client.get(f"/api/files/{kinds['image']['id']}")
    assert served.data == picture and served.headers["Content-Type"] == "image/png"
    assert served.headers["X-Content-Type-Options"] == "nosniff" and "Content-Disposition" not in served.headers
    served = client.get(f"/api/files/{kinds['text']['id']}")
    assert served.data == log and served.headers["Content-Disposition"] == 'attachment; filename="server.log"'
    assert client.get("/api/files/nothing-by-this-id").status_code == 404


def test_a_pdfs_text_reaches_the_model_and_one_without_text_says_so(client, backend):
    conversation_id = new(client)
    post(client, conversation_id, [{"type": "text", "text": "Summarise"},
                                   file_part("report.pdf", text_pdf("Quarterly revenue grew 12 percent"),
                                             "application/pdf")]).get_data()
    assert "Quarterly revenue grew 12 percent" in backend.requests[0].body["messages"][0]["content"][0]["text"]
    scan = io.BytesIO()
    Image.new("RGB", (300, 200), (255, 255, 255)).save(scan, "PDF")  # a picture in a PDF: no text layer
    post(client, conversation_id, [file_part("scan.pdf", scan.getvalue(), "application/pdf")]).get_data()
    message = client.get(f"/api/conversations/{conversation_id}").json["messages"][-2]
    assert "no text layer" in message["attachments"][0]["note"]
    assert "no text layer" in backend.requests[1].body["messages"][-1]["content"][0]["text"]


def test_too_large_too_many_and_false_pictures_are_refused_and_nothing_is_saved(client, backend):
    conversation_id = new(client)
    big = post(client, conversation_id, [file_part("big.txt", b"a" * (12 * 1024 * 1024))])  # the limit: 10 MB
    assert big.status_code == 413 and big.json["error"]["code"] == "attachment_too_large"
    many = post(client, conversation_id, [image_part(png())] * 11)
    assert many.status_code == 400 and many.json["error"]["code"] == "too_many_attachments"
    html = b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>"
    for part in (image_part(html), image_part(b'<svg xmlns="http://www.w3.org/2000/svg"><script/></svg>',
                                               "image/svg+xml"),
                 file_part("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
                 file_part("bin.dat", b"\x00\x01\x02binary")):
        refused = post(client, conversation_id, [{"type": "text", "text": "look"}, part])
        assert refused.status_code == 400 and refused.json["error"]["code"] == "unsupported_attachment", refused.json
    bad = post(client, conversation_id, [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}])
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_content_part"
    assert client.get(f"/api/conversations/{conversation_id}").json["messages"] == []
    assert backend.requests == []


def test_a_large_picture_is_sent_downscaled_and_served_whole(client, backend):
    photo = png(4000, 3000, (10, 120, 200))
    conversation_id = new(client)
    post(client, conversation_id, [{"type": "text", "text": "What colour?"}, image_part(photo)]).get_data()
    url = backend.requests[0].body["messages"][0]["content"][1]["image_url"]["url"]
    sent = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(sent)) as image:
        assert max(image.size) <= 2048 and image.size == (2048, 1536)
    [attachment] = client.get(f"/api/conversations/{conversation_id}").json["messages"][0]["attachments"]
    assert client.get(f"/api/files/{attachment['id']}").data == photo


def test_one_file_sent_twice_is_kept_once_and_deleting_the_conversation_deletes_it(app, client, backend):
    conversation_id = new(client)
    for _ in range(2):
        post(client, conversation_id, [{"type": "text", "text": "again"},
                                       file_part("notes.md", b"# Notes\n")]).get_data()
    first, _, second, _ = client.get(f"/api/conversations/{conversation_id}").json["messages"]
    assert first["attachments"][0]["id"] == second["attachments"][0]["id"]
    file_id = first["attachments"][0]["id"]
    assert client.delete(f"/api/conversations/{conversation_id}").status_code == 204
    with app.app_context():
        assert state.store().file(file_id) is None
    assert client.get(f"/api/files/{file_id}").status_code == 404


def big_pdf(text: str, side: int = 2950) -> bytes:
    """A PDF of about 10 MB as people send them: a page with a text layer, then a photo-sized picture (noise, so
    that it does not compress)."""
    from pypdf import PdfReader, PdfWriter

    picture = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.randbytes(side * side * 3)).save(picture, "PDF", quality=95)
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(text_pdf(text))))
    writer.append(PdfReader(picture))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.serial  # it measures the hub's pauses: beside three other test processes on two cores, the
# machine itself paused this one for 0.5 s once (with the collector off), which no code of Jarvis's did
def test_reading_a_large_pdf_never_stops_the_hub(make_client, backend):
    big = big_pdf("The total is 42")
    assert len(big) > 8 * 1024 * 1024
    client = make_client()
    conversation_id = new(client)
    body = json.dumps({"content": [file_part("big.pdf", big, "application/pdf")]})  # (the client's work, before)
    # The collector stays off while the hub is watched: in a test process that ran hundreds of tests before this
    # one, a full collection of its heap paused it for 1.1 s in CI (this test's own work is not the point).
    gc.collect()
    gc.disable()
    try:
        started = time.monotonic()
        with hub_gaps() as gaps:
            response = client.post(f"/api/conversations/{conversation_id}/messages", data=body,
                                   content_type="application/json")
            took = time.monotonic() - started
            response.get_data()
    finally:
        gc.enable()
    assert response.status_code == 200, response.get_json()
    assert "The total is 42" in backend.requests[0].body["messages"][0]["content"][0]["text"]
    print(f"a {len(big) / 1e6:.1f} MB PDF: sent and started in {took * 1000:.0f} ms; the hub's longest gap "
          f"{max(gaps) * 1000:.1f} ms")
    # Judged against the same run: a hub blocked by the decoding would have one gap of nearly all of `took`.
    assert len(gaps) > 5 and max(gaps) < max(took / 3, 0.1), (max(gaps), took)


@pytest.mark.parametrize("content", [[], "", [{"type": "text", "text": " "}], [{"type": "video"}]])
def test_a_message_needs_some_text_or_an_attachment(client, backend, content):
    response = post(client, new(client), content)
    assert response.status_code == 400


def test_export_and_import_carry_the_pictures_and_files_checked_again(client, backend):
    picture = png(8, 8, (0, 200, 0))
    conversation_id = new(client)
    post(client, conversation_id, [{"type": "text", "text": "Look"}, image_part(picture),
                                   file_part("a.txt", b"alpha")]).get_data()
    exported = client.get(f"/api/conversations/{conversation_id}/export").json
    [conversation] = exported["conversations"]
    assert {stored["name"] for stored in conversation["files"]} == {"image-1", "a.txt"}
    imported = client.post("/api/conversations/import", json=exported)
    assert imported.status_code == 201, imported.json
    [message] = [m for m in client.get(f"/api/conversations/{imported.json['data'][0]}").json["messages"]
                 if m["role"] == "user"]
    served = {attachment["name"]: client.get(f"/api/files/{attachment['id']}").data
              for attachment in message["attachments"]}
    assert served == {"image-1": picture, "a.txt": b"alpha"}
    original = client.get(f"/api/conversations/{conversation_id}").json["messages"][0]["attachments"]
    assert {a["id"] for a in original}.isdisjoint({a["id"] for a in message["attachments"]})  # its own copies
    # A file in an import is checked as a sent one is: an SVG posing as a picture is refused, nothing written.
    conversation["files"][0]["data"] = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode()
    conversation["files"][0]["type"] = "image/svg+xml"
    before = len(client.get("/api/conversations").json["data"])
    refused = client.post("/api/conversations/import", json=exported)
    assert refused.status_code == 400 and len(client.get("/api/conversations").json["data"]) == before
    conversation["messages"][0]["attachments"] = [{"id": "not-in-files"}]
    refused = client.post("/api/conversations/import", json=exported)
    assert refused.status_code == 400 and "not-in-files" in refused.json["error"]["message"]


def test_with_accounts_another_persons_file_does_not_exist(app, backend):
    from tests.test_accounts import add_user, signed_in

    add_user(app, "alice")
    add_user(app, "bob")
    alice, bob = signed_in(app, "alice"), signed_in(app, "bob")
    conversation_id = new(alice)
    post(alice, conversation_id, [{"type": "text", "text": "mine"}, file_part("diary.txt", b"dear diary")]).get_data()
    [attachment] = alice.get(f"/api/conversations/{conversation_id}").json["messages"][0]["attachments"]
    assert alice.get(f"/api/files/{attachment['id']}").data == b"dear diary"
    refused = bob.get(f"/api/files/{attachment['id']}")
    assert refused.status_code == 404 and refused.json["error"]["code"] == "file_not_found"
    assert app.test_client().get(f"/api/files/{attachment['id']}").status_code == 401  # signed out


def test_an_upstream_that_refuses_pictures_says_so_and_the_message_is_kept(client, backend):
    from jarvis.errors import ApiError

    backend.fail_next(ApiError(400, "image input is not supported by this model", code="invalid_request_error"))
    conversation_id = new(client)
    refused = post(client, conversation_id, [{"type": "text", "text": "What is this?"}, image_part(png())])
    assert refused.status_code == 400 and "image input is not supported" in refused.json["error"]["message"]
    [kept] = client.get(f"/api/conversations/{conversation_id}").json["messages"][:1]
    assert kept["content"] == "What is this?" and kept["attachments"][0]["kind"] == "image"


def test_the_context_is_counted_from_the_text_when_no_answer_said_its_usage_and_the_window_may_be_unknown(
        client, backend):
    conversation_id = new(client)
    post(client, conversation_id, "x" * 400).get_data()  # the fake backend's answers carry no usage
    measured = client.get(f"/api/conversations/{conversation_id}/context").json
    assert measured == {"used": (400 + len("w0 w1 w2 ")) // 4, "estimated": True, "window": None}
