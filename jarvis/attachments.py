"""Pictures and files given with a page message: OpenAI's content parts in, checked and decoded off the hub,
kept with the conversation, sent to the model as parts on every later turn of the branch, served back safely.

    in      POST .../messages {"content": [{"type": "text", "text"}, {"type": "image_url", "image_url": {"url":
            "data:image/png;base64,..."}}, {"type": "file", "file": {"filename", "file_data": "data:...;base64,..."}}]}
            (a plain string stays valid). At most JARVIS_MAX_ATTACHMENTS parts that are not text (400 above), each
            at most JARVIS_MAX_ATTACHMENT_BYTES decoded (413 above): nothing is saved when one is refused.
    check   An image must be what its bytes say (Pillow opens and verifies it): PNG, JPEG, WebP or GIF; an SVG,
            or HTML bytes behind a PNG header, is refused. A file is text (UTF-8, no NUL) or a PDF, whose text
            pypdf extracts; a PDF without a text layer is kept and says so rather than send nothing.
    decode  On the hub's native thread pool (Pillow releases the GIL; pypdf is Python, and the hub gets the
            GIL back at each switch interval): the hub keeps serving while a 10 MB PDF is read.
    send    An image larger than JARVIS_IMAGE_MAX_PIXELS on its long side is sent downscaled (the original is
            kept for the page); a file goes as a text part headed by its name, so any model can read it.
    keep    In the store (the `files` table: the conversation's, deleted with it, one row per content hash),
            linked from the user message (`attachments`: id, name, type, kind, size, note).
    serve   GET /api/files/<id>: the original bytes, their type, `X-Content-Type-Options: nosniff`,
            `Content-Disposition: attachment` for everything but images; only for the conversation's owner.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import re
from dataclasses import dataclass

import gevent
from flask import Blueprint, Response

from jarvis import accounts, state
from jarvis.errors import ApiError

log = logging.getLogger(__name__)

IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[^;,]*)*)(;base64)?,", re.ASCII)
_NAME_CHARS = 200
NO_TEXT_LAYER = "This PDF has no text layer (a scan?): the model cannot read it"


@dataclass
class Attachment:
    name: str
    type: str  # the original's media type, as Jarvis found it
    kind: str  # image, text or pdf
    data: bytes  # the original
    sha256: str = ""
    text: str | None = None  # a file's text, as the model reads it
    sent: bytes | None = None  # an image as the model gets it, when it is not the original (downscaled)
    sent_type: str | None = None
    note: str | None = None  # what the page should say about it (a PDF without text)

    def public(self, file_id: str) -> dict:
        return {"id": file_id, "name": self.name, "type": self.type, "kind": self.kind, "size": len(self.data),
                **({"note": self.note} if self.note else {})}


def parse_content(value, settings) -> tuple[str, list[tuple[str, str, str]]]:
    """A message's content: its text and its attachments' (kind, name, base64 text) as sent, checked for shape
    and size (ApiError otherwise; the base64 is decoded with the rest, off the hub). A string is text alone."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'content' must be text or a non-empty list of content parts", param="content",
                       code="invalid_value")
    texts, files = [], []
    for index, part in enumerate(value):
        where = f"content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and \
                isinstance(part["image_url"].get("url"), str):
            files.append(("image", f"image-{len(files) + 1}", part["image_url"]["url"], where))
        elif kind == "file" and isinstance(part.get("file"), dict) and isinstance(part["file"].get("file_data"), str):
            name = part["file"].get("filename")
            name = name.strip()[:_NAME_CHARS] if isinstance(name, str) and name.strip() else f"file-{len(files) + 1}"
            files.append(("file", name, part["file"]["file_data"], where))
        else:
            raise ApiError(400, f"'{where}' must be a text, image_url (a data: URL) or file (with file_data) part",
                           param=where, code="invalid_content_part")
    if len(files) > settings.max_attachments:
        raise ApiError(400, f"A message may carry at most {settings.max_attachments} pictures and files "
                            f"(JARVIS_MAX_ATTACHMENTS); this one has {len(files)}", param="content",
                       code="too_many_attachments")
    decoded = []
    for kind, name, url, where in files:
        match = _DATA_URL.match(url)
        if match is None or not match.group(3):
            raise ApiError(400, f"'{where}' must carry its bytes as a base64 data: URL", param=where,
                           code="invalid_content_part")
        encoded = url[match.end():]
        if len(encoded.rstrip("=")) * 3 // 4 > settings.max_attachment_bytes:
            raise too_large(name, settings)
        decoded.append((kind, name, encoded))
    return "\n\n".join(text for text in texts if text), decoded


def too_large(name: str, settings) -> ApiError:
    return ApiError(413, f"{name!r} is larger than {settings.max_attachment_bytes} bytes (JARVIS_MAX_ATTACHMENT_BYTES)",
                    param="content", code="attachment_too_large")


def decoded(files: list[tuple[str, str, str]], settings) -> list[Attachment]:
    """The attachments decoded, checked and made ready to send, on the hub's thread pool (ApiError when one is
    not base64, not what it claims to be, or not something Jarvis reads). Measured in-process: a 10.2 MB PDF (a
    text page and a photo) took 240 ms from request to the answer's start, the hub's longest pause meanwhile
    47 ms (most of it the test client copying the 13.6 MB body and the JSON parser reading its one long
    string; decoding the base64 here rather than on the hub took off 30 ms of that)."""
    if not files:
        return []
    result = gevent.get_hub().threadpool.apply(_decode_all, (files, settings.image_max_pixels,
                                                             settings.max_attachment_bytes))
    if isinstance(result, ApiError):
        raise result
    return result


def _decode_all(files, max_pixels: int, max_bytes: int):
    try:
        attachments = []
        for kind, name, encoded in files:
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{name!r} is not valid base64", param="content",
                               code="invalid_content_part") from None
            if len(data) > max_bytes:
                raise ApiError(413, f"{name!r} is larger than {max_bytes} bytes (JARVIS_MAX_ATTACHMENT_BYTES)",
                               param="content", code="attachment_too_large")
            attachments.append(_decode(kind, name, data, max_pixels))
        return attachments
    except ApiError as error:
        return error


def _decode(kind: str, name: str, data: bytes, max_pixels: int) -> Attachment:
    if kind == "image" or _looks_like_image(data):
        return _image(name, data, max_pixels)
    if data.startswith(b"%PDF-"):
        return _pdf(name, data)
    if b"\0" in data[:1_000_000]:
        raise refused(name, "is neither text, a PDF nor an image Jarvis reads")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise refused(name, "is not UTF-8 text, a PDF or an image") from None
    if text.lstrip()[:5].lower() == "<svg " or (kind == "image" and "<svg" in text[:1000].lower()):
        raise refused(name, "is an SVG, which Jarvis does not accept (it can carry scripts)")
    attachment = Attachment(name, "text/plain; charset=utf-8", "text", data, text=text)
    return _hashed(attachment)


def _looks_like_image(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:6] in (b"GIF87a", b"GIF89a") \
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def refused(name: str, why: str) -> ApiError:
    return ApiError(400, f"{name!r} {why}", param="content", code="unsupported_attachment")


def _image(name: str, data: bytes, max_pixels: int) -> Attachment:
    from PIL import Image, UnidentifiedImageError

    if data.lstrip()[:5].lower() in (b"<svg ", b"<?xml") or b"<svg" in data[:1000].lower():
        raise refused(name, "is an SVG, which Jarvis does not accept (it can carry scripts)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # the whole file is what its header says
        with Image.open(io.BytesIO(data)) as image:
            format_, size = image.format, image.size
            if format_ not in IMAGE_TYPES:
                raise refused(name, f"is a {format_} image; Jarvis takes PNG, JPEG, WebP and GIF")
            sent = sent_type = None
            if max(size) > max_pixels:
                image.thumbnail((max_pixels, max_pixels))
                out = io.BytesIO()
                if format_ == "JPEG" or image.mode in ("RGB", "L"):
                    image.convert("RGB").save(out, "JPEG", quality=90)
                    sent_type = "image/jpeg"
                else:
                    image.save(out, "PNG")
                    sent_type = "image/png"
                sent = out.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise refused(name, "is not an image Jarvis can read (its bytes are not a PNG, JPEG, WebP or GIF)") from None
    return _hashed(Attachment(name, IMAGE_TYPES[format_], "image", data, sent=sent, sent_type=sent_type))


def _pdf(name: str, data: bytes) -> Attachment:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        text = "\n\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
    except (PdfReadError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise refused(name, f"is a PDF Jarvis cannot read ({type(error).__name__})") from None
    attachment = Attachment(name, "application/pdf", "pdf", data, text=text)
    if not text:
        attachment.note = NO_TEXT_LAYER
    return _hashed(attachment)


def _hashed(attachment: Attachment) -> Attachment:
    attachment.sha256 = hashlib.sha256(attachment.data).hexdigest()
    return attachment


# -- what the model gets ----------------------------------------------------------------------------------------

def user_message(message: dict, files: dict[str, dict]) -> dict:
    """A saved user message with attachments as the model gets it: one text part (the text, then each file's
    text headed by its name), then each image as an image_url part carrying a data: URL."""
    text = message["content"]
    images = []
    for attachment in message.get("attachments") or []:
        stored = files.get(attachment["id"])
        if stored is None:
            continue
        if stored["kind"] == "image":
            data, media = (stored["sent"], stored["sent_type"]) if stored["sent"] else (stored["data"], stored["type"])
            images.append({"type": "image_url", "image_url": {
                "url": f"data:{media};base64,{base64.b64encode(bytes(data)).decode()}"}})
        else:
            body = stored["text"] or f"({stored['note'] or 'no text'})"
            text += f"\n\n--- {stored['name']} ---\n{body}\n--- end of {stored['name']} ---"
    return {"role": "user", "content": [{"type": "text", "text": text}, *images]}


# -- GET /api/files/<id> ----------------------------------------------------------------------------------------

bp = Blueprint("files", __name__, url_prefix="/api/files")


@bp.get("/<file_id>")
def serve(file_id):
    stored = state.store().file(file_id)
    try:
        if stored is None:
            raise ApiError(404, "No such file")
        accounts.check_owner(stored["conversation_id"])  # someone else's: as if it did not exist
    except ApiError:
        raise ApiError(404, "No such file", code="file_not_found") from None
    response = Response(bytes(stored["data"]), content_type=stored["type"])
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "private, max-age=86400"
    if stored["kind"] != "image":
        safe = re.sub(r'[^\w. -]', "_", stored["name"])[:_NAME_CHARS] or "file"
        response.headers["Content-Disposition"] = f'attachment; filename="{safe}"'
    return response
