"""Labels and provenance inside every image file catalogen writes, in PNG, JPEG, WebP and AVIF.

Each file says, in the places existing readers look:

- that it was made with a trained model: XMP `Iptc4xmpExt:DigitalSourceType`, the IPTC code
  `trainedAlgorithmicMedia` for generated images, `compositeWithTrainedAlgorithmicMedia` for
  product photos whose own pixels were kept (a cut-out, a scene around the photo's product);
- what made it: XMP `xmp:CreatorTool` (`catalogen <version>`) and `catalogen:Models` (a bag of
  `repo@revision`), and `catalogen:Stage`;
- the A1111 `parameters` text (prompt, negative prompt, settings line; see catalogen.media.pngmeta), where
  A1111 puts it: a PNG `parameters` text chunk; in JPEG, WebP and AVIF the EXIF UserComment, written
  as A1111 writes it (b"UNICODE\\0" and UTF-16 big-endian, piexif's `UserComment.dump(..., "unicode")`);
- the full provenance JSON (what `catalogen reproduce` reads back): in PNG the `catalogen` text
  chunk; in JPEG, WebP and AVIF the XMP property `catalogen:Provenance` (namespace `NS`), the same
  JSON text. PNGs carry the XMP too, in an `XML:com.adobe.xmp` iTXt chunk. `read_label` reads all of
  it back from any of the four formats.

Renditions (tasks/renditions.py) also embed an sRGB ICC profile (`srgb_profile`, deterministic).
Everything here is a pure function of its arguments: the same pixels and label give the same bytes.

    >>> label = Label(TRAINED, parameters, provenance)
    >>> data = encode(image, "jpeg", label, quality=90, icc=True)
    >>> read_label(data).source_type
    'trainedAlgorithmicMedia'
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal
from xml.sax.saxutils import escape, unescape

from PIL import Image, ImageCms, PngImagePlugin

import catalogen

TRAINED = "trainedAlgorithmicMedia"
COMPOSITE = "compositeWithTrainedAlgorithmicMedia"
IPTC_CODES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
NS = "https://catalogen.dev/ns/1.0/"  # the XMP namespace of catalogen's own properties
XMP_KEY = "XML:com.adobe.xmp"  # the PNG iTXt keyword readers look for XMP under
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\0"

Format = Literal["png", "jpeg", "webp", "avif"]
FORMATS: tuple[str, ...] = ("png", "jpeg", "webp", "avif")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "avif": "avif"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}


@dataclass(frozen=True)
class Label:
    """What an image says about itself: its IPTC source type, A1111 parameters and provenance."""

    source_type: str | None  # TRAINED, COMPOSITE, or None (a catalog photo nobody relabelled)
    parameters: str | None = None  # A1111 text; None: none (a cut-out has no generation parameters)
    provenance: dict[str, Any] = field(default_factory=dict)


def source_type(from_photo: bool) -> str:
    """The IPTC digital source type of an image: a product photo's own pixels kept, or generated."""
    return COMPOSITE if from_photo else TRAINED


def models_of(provenance: dict[str, Any]) -> list[str]:
    """`repo@revision` of every model the provenance names (a key `X` with `X_revision` beside it)."""
    found = []
    for key in sorted(provenance):
        revision = provenance.get(f"{key}_revision")
        if revision and isinstance(provenance[key], str):
            found.append(f"{provenance[key]}@{revision}")
    return found


def _provenance_text(provenance: dict[str, Any]) -> str:
    return json.dumps(provenance, sort_keys=True, ensure_ascii=False)


def xmp_packet(label: Label) -> bytes:
    """An XMP packet with the IPTC digital source type, the generator, the models and the provenance JSON."""
    attributes = [f'xmp:CreatorTool="{escape(f"catalogen {catalogen.__version__}", {chr(34): "&quot;"})}"']
    if label.source_type:
        attributes.append(f'Iptc4xmpExt:DigitalSourceType="{IPTC_CODES}{label.source_type}"')
    stage = label.provenance.get("stage")
    if stage:
        attributes.append(f'catalogen:Stage="{escape(str(stage), {chr(34): "&quot;"})}"')
    models = "".join(f"<rdf:li>{escape(m)}</rdf:li>" for m in models_of(label.provenance))
    body = (
        f"<catalogen:Models><rdf:Bag>{models}</rdf:Bag></catalogen:Models>" if models else ""
    ) + f"<catalogen:Provenance>{escape(_provenance_text(label.provenance))}</catalogen:Provenance>"
    text = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        f'    xmlns:catalogen="{NS}"\n'
        f'    {" ".join(attributes)}>\n'
        f"   {body}\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )
    return text.encode("utf-8")


def user_comment(parameters: str) -> bytes:
    """The EXIF UserComment value as A1111 writes it (piexif's `UserComment.dump(text, encoding="unicode")`)."""
    return UNICODE_PREFIX + parameters.encode("utf-16-be")


def exif_bytes(parameters: str) -> bytes:
    """An EXIF block holding only the A1111 parameters in the Exif IFD's UserComment."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(parameters)
    return exif.tobytes()


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """LittleCMS's built-in sRGB profile, with its creation date fixed (so the bytes never vary)."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = bytes([0x07, 0xE8, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])  # 2024-01-01 00:00:00 (the header's dateTime)
    return bytes(data)


def _png(image: Image.Image, label: Label, icc: bool) -> bytes:
    info = PngImagePlugin.PngInfo()
    if label.parameters is not None:
        info.add_text("parameters", label.parameters)
    info.add_text("catalogen", _provenance_text(label.provenance))
    info.add_itxt(XMP_KEY, xmp_packet(label).decode("utf-8"))
    buffer = io.BytesIO()
    extra = {"icc_profile": srgb_profile()} if icc else {}
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6, **extra)
    return buffer.getvalue()


def encode(image: Image.Image, format: str, label: Label, quality: int = 90, icc: bool = False) -> bytes:
    """The image's bytes in `format` (png, jpeg, webp, avif), labelled (see the module's docstring).

    `quality` applies to jpeg, webp and avif (1-100); png is lossless. `icc` embeds `srgb_profile`.
    JPEG is written without chroma subsampling (4:4:4), so flat colours stay flat up to product edges.
    """
    if format == "png":
        return _png(image, label, icc)
    if format not in PIL_FORMATS:
        raise ValueError(f"unknown image format {format!r}; choose from {', '.join(FORMATS)}")
    options: dict[str, Any] = {"quality": quality, "xmp": xmp_packet(label)}
    if label.parameters is not None:
        options["exif"] = exif_bytes(label.parameters)
    if icc:
        options["icc_profile"] = srgb_profile()
    if format == "jpeg":
        options.update(subsampling=0, optimize=False)
        image = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    elif format == "webp":
        options.update(method=4)
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[format], **options)
    return buffer.getvalue()


# --- reading back ---------------------------------------------------------------------------------


_SOURCE_TYPE = re.compile(r'Iptc4xmpExt:DigitalSourceType(?:="|>)' + re.escape(IPTC_CODES) + r'(\w+)')
_PROVENANCE = re.compile(r"<catalogen:Provenance>(.*?)</catalogen:Provenance>", re.S)


def _decode_comment(value: bytes | str) -> str:
    """A UserComment's text: A1111's UNICODE (UTF-16 BE) prefix, else ASCII or UTF-8 after its 8-byte code."""
    if isinstance(value, str):
        return value
    if value.startswith(UNICODE_PREFIX):
        return value[len(UNICODE_PREFIX):].decode("utf-16-be", errors="replace")
    return value[8:].decode("utf-8", errors="replace") if len(value) > 8 else ""


def read_label(data: bytes) -> Label:
    """The label of image bytes catalogen wrote, in any of its formats (fields it lacks are None / {})."""
    with Image.open(io.BytesIO(data)) as image:  # the header and metadata only: no pixel is decoded
        info = dict(image.info)  # a PNG's text chunks before its pixels, as catalogen and A1111 write them
        text = {k: v for k, v in info.items() if isinstance(v, str)} if image.format == "PNG" else {}
        exif = image.getexif().get_ifd(EXIF_IFD) if image.format != "PNG" else {}  # a PNG's would decode it
    xmp = text.get(XMP_KEY) or info.get(XMP_KEY) or info.get("xmp") or ""
    xmp = xmp.decode("utf-8", errors="replace") if isinstance(xmp, bytes) else str(xmp)
    found_type = _SOURCE_TYPE.search(xmp)
    parameters = text.get("parameters")
    if parameters is None and USER_COMMENT in exif:
        parameters = _decode_comment(exif[USER_COMMENT])
    provenance_text = text.get("catalogen")
    if provenance_text is None:
        match = _PROVENANCE.search(xmp)
        provenance_text = unescape(match.group(1)) if match else None
    provenance = json.loads(provenance_text) if provenance_text else {}
    return Label(found_type.group(1) if found_type else None, parameters, provenance)
