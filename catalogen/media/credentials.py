"""C2PA content credentials: a signed manifest inside each image saying how it was made.

With `outputs.credentials` set (a certificate chain and its private key), every image a stage
writes (its final image, remove_bg's canvas, each rendition) gets a C2PA manifest, made with the
`c2pa-python` SDK and signed with that certificate: the stages call `sign_stage_image` on the
bytes they encoded. A generated image gets one `c2pa.created` action with the IPTC digital source
type `trainedAlgorithmicMedia`; a product photo's image (its own pixels kept) gets `c2pa.opened` of
its parent ingredient, then `c2pa.edited` with `compositeWithTrainedAlgorithmicMedia`. The parent
is the catalog's photo where the stage read it, else the earlier stage's image, itself signed, so
the chain of ingredients leads back to the photo. The actions' software agent is catalogen and its
version; their parameters name the models (`repo@revision`, from the image's label, see
catalogen.media.labels). Google Merchant Center, Adobe's Content Credentials verifier, `c2patool` and any
C2PA reader show it.

The certificate is checked before a run writes anything (`credential_faults`, with the other
configuration checks in catalogen.run.plan): files that cannot be read, a chain that is not PEM, a
key that does not belong to the certificate or does not fit `algorithm`, a certificate outside its
validity, a self-signed signing certificate, a chain out of order, anything the SDK refuses (a
probe image is signed and read back). Each fault is one line naming the setting and the file.

    >>> signer = load_signer(cfg.outputs.credentials)
    >>> signed = sign_image(png_bytes, "image/png", source_type=TRAINED, models=["tiny:sd15@3f2a"],
    ...                     title="row-1.png", signer=signer)
    >>> read_credentials(signed, "image/png")["source_type"]
    'http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia'
"""

from __future__ import annotations

import datetime
import io
import json
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

import catalogen

if TYPE_CHECKING:
    import c2pa

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
TRAINED = IPTC + "trainedAlgorithmicMedia"  # made by a generative model
COMPOSITE = IPTC + "compositeWithTrainedAlgorithmicMedia"  # a capture (the product's own pixels) with generated parts

MAX_PEM_BYTES = 1 << 20  # a certificate chain or key file larger than this is not one
MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
              ".avif": "image/avif"}
SETTING = "outputs.credentials"

Algorithm = Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"]


class CredentialSettings(BaseModel):
    """Where the signing certificate and key are; setting this section turns signing on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    certificate: Path = Field(
        description="PEM certificate chain: the signing (end-entity) certificate first, then its intermediates; "
        "issued by a CA (C2PA refuses self-signed ones), key usage digitalSignature and an extended key usage "
        "such as emailProtection or documentSigning",
    )
    private_key: Path = Field(description="PEM private key of the signing certificate (PKCS#8 or SEC1, unencrypted)")
    algorithm: Algorithm = Field("es256", description="signature algorithm; must fit the key (es256: EC P-256)")
    timestamp_url: str | None = Field(
        None, description="RFC 3161 time-stamp authority (needs the network at signing time); none: no time-stamp",
    )
    thumbnail: bool = Field(False, description="embed a JPEG thumbnail of each image in its manifest (larger files)")

    @field_validator("certificate", "private_key")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Recorded in run.json: a resumed run or a worker elsewhere reads the same files.
        return Path(os.path.abspath(os.path.expanduser(value)))

    @field_validator("timestamp_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"timestamp_url must be an http:// or https:// URL, not {value!r}")
        return value


class CredentialError(ValueError):
    """A certificate or key that cannot sign, or an image that could not be signed; one line."""


class LoadedSigner:
    """A checked certificate and key, ready to sign; the SDK's signer is made once per process."""

    def __init__(self, settings: CredentialSettings, certificate_pem: bytes, key_pem: bytes) -> None:
        self.settings = settings
        self.certificate_pem = certificate_pem  # the chain as given
        self.key_pem = key_pem  # PKCS#8, as the SDK wants it
        self._lock = threading.Lock()
        self._native: dict[int, "c2pa.Signer"] = {}

    def native(self) -> "c2pa.Signer":
        """The SDK's signer, for this process (one made before a fork is closed in the child)."""
        import c2pa

        with self._lock:
            found = self._native.get(os.getpid())
            if found is None:
                info = c2pa.C2paSignerInfo(self.settings.algorithm, self.certificate_pem, self.key_pem,
                                           self.settings.timestamp_url)
                found = self._native[os.getpid()] = c2pa.Signer.from_info(info)
            return found


# --- checking the certificate before the run ------------------------------------------------------


def _read_pem(path: Path, what: str, origin: str) -> bytes:
    """A PEM file's bytes, read only if it is a plain file of a plausible size."""
    where = f"{SETTING}.{what} {str(path)!r}"
    try:
        info = path.stat()
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read it ({exc.strerror or exc}) (from {origin})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CredentialError(f"{where}: not a file (from {origin})")
    if info.st_size > MAX_PEM_BYTES:
        raise CredentialError(f"{where}: {info.st_size} bytes, more than a PEM {what} can be "
                              f"({MAX_PEM_BYTES} at most) (from {origin})")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise CredentialError(f"{where}: cannot read it ({exc.strerror or exc}) (from {origin})") from None
    if len(data) > MAX_PEM_BYTES:  # grew since stat
        raise CredentialError(f"{where}: more than {MAX_PEM_BYTES} bytes, not a PEM {what} (from {origin})")
    if b"-----BEGIN " not in data:
        raise CredentialError(f"{where}: not PEM (no '-----BEGIN' line) (from {origin})")
    return data


_KEY_TYPES = {"es256": ("EC", "secp256r1"), "es384": ("EC", "secp384r1"), "es512": ("EC", "secp521r1"),
              "ps256": ("RSA", None), "ps384": ("RSA", None), "ps512": ("RSA", None), "ed25519": ("Ed25519", None)}


def _key_kind(key: Any) -> tuple[str, str | None]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "EC", key.curve.name
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA", None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519", None
    return type(key).__name__, None


def load_signer(settings: CredentialSettings, origin_of: Callable[[str], str] | None = None) -> LoadedSigner:
    """Check the certificate chain and key, and return them ready to sign; CredentialError if they cannot.

    Every check names the setting and the file: unreadable or not PEM, a key of the wrong type for
    `algorithm`, a key that is not the certificate's, a certificate expired or not yet valid, a
    self-signed end-entity certificate, a chain whose certificates do not issue one another, and
    anything else the C2PA SDK refuses (found by signing a 1x1 image and reading it back).
    `origin_of(dotted setting)` says where a setting came from (`RunConfig.origin`).
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_where = f"{SETTING}.certificate {str(settings.certificate)!r}"
    key_where = f"{SETTING}.private_key {str(settings.private_key)!r}"
    cert_from = origin_of(f"{SETTING}.certificate") if origin_of else "the configuration"
    key_from = origin_of(f"{SETTING}.private_key") if origin_of else "the configuration"
    chain_pem = _read_pem(settings.certificate, "certificate", cert_from)
    key_pem = _read_pem(settings.private_key, "private_key", key_from)

    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise CredentialError(f"{cert_where}: not a PEM certificate chain ({_first_line(exc)}) (from {cert_from})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CredentialError(f"{key_where}: the key is encrypted; give an unencrypted PEM key (from {key_from})") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CredentialError(f"{key_where}: not a PEM private key ({_first_line(exc)}) (from {key_from})") from None

    kind, curve = _key_kind(key)
    want_kind, want_curve = _KEY_TYPES[settings.algorithm]
    if (kind, curve if want_curve else None) != (want_kind, want_curve):
        have = f"{kind} {curve}" if curve else kind
        want = f"{want_kind} {want_curve}" if want_curve else want_kind
        raise CredentialError(f"{key_where}: a {have} key cannot sign {settings.algorithm} (needs {want}); "
                              f"set {SETTING}.algorithm to fit the key (from {key_from})")

    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    mine = key.public_key().public_bytes(serialization.Encoding.DER, public)
    holders = [n for n, cert in enumerate(chain) if cert.public_key().public_bytes(serialization.Encoding.DER, public) == mine]
    if holders and holders[0] > 0:
        raise CredentialError(f"{cert_where}: the key's certificate is number {holders[0] + 1} in the chain; list the "
                              f"signing certificate first, then its issuers (from {cert_from})")
    if not holders:
        raise CredentialError(f"{key_where}: not the key of the certificate in {str(settings.certificate)!r} "
                              f"(subject {leaf.subject.rfc4514_string()}) (from {key_from})")

    now = datetime.datetime.now(datetime.timezone.utc)
    for position, cert in enumerate(chain):
        label = "the signing certificate" if position == 0 else f"certificate {position + 1} of the chain"
        if cert.not_valid_after_utc < now:
            raise CredentialError(f"{cert_where}: {label} ({cert.subject.rfc4514_string()}) expired on "
                                  f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (from {cert_from})")
        if cert.not_valid_before_utc > now:
            raise CredentialError(f"{cert_where}: {label} ({cert.subject.rfc4514_string()}) is not valid before "
                                  f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (from {cert_from})")
    if leaf.issuer == leaf.subject and _issued_by(leaf, leaf):
        raise CredentialError(f"{cert_where}: the signing certificate is self-signed, which C2PA does not accept; "
                              f"use one issued by a CA, with the CA's certificate after it (from {cert_from})")
    for position, (cert, issuer) in enumerate(zip(chain, chain[1:]), start=1):
        if not _issued_by(cert, issuer):
            raise CredentialError(f"{cert_where}: certificate {position} of the chain ({cert.subject.rfc4514_string()}) "
                                  f"is not issued by the next one ({issuer.subject.rfc4514_string()}); "
                                  f"list the signing certificate first, then its issuers in order (from {cert_from})")

    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    loaded = LoadedSigner(settings, chain_pem, pkcs8)
    _probe(loaded, cert_where, cert_from)
    return loaded


def _issued_by(cert: Any, issuer: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_PROBE_PNG = (  # 1x1 grey PNG
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
    b"\x00\x00\x00\nIDATx\x9cc\xf8\x0f\x00\x01\x01\x01\x00\x18\xdd\x8d\xb0\x00\x00\x00\x00IEND\xaeB`\x82"
)


def _probe(loaded: LoadedSigner, where: str, origin: str) -> None:
    """Sign a 1x1 image and read it back: what the SDK refuses is refused now, not in every row."""
    import c2pa

    hint = ("C2PA needs a signing certificate issued by a CA, with key usage digitalSignature and an extended "
            "key usage such as emailProtection or documentSigning")
    try:
        signed = sign_image(_PROBE_PNG, "image/png", source_type=TRAINED, models=[], title="probe.png",
                            signer=loaded)
    except (c2pa.C2paError, CredentialError) as exc:
        raise CredentialError(f"{where}: the C2PA SDK refuses it: {_sdk_message(exc)}; {hint} (from {origin})") from None
    state = read_credentials(signed, "image/png")
    if state["state"] not in ("Valid", "Trusted"):
        raise CredentialError(f"{where}: a manifest it signs does not validate ({', '.join(state['failures'])}); "
                              f"{hint} (from {origin})")


def _sdk_message(exc: BaseException) -> str:
    text = _first_line(exc)
    for prefix in ("Signature: ", "Verify: ", "Other: "):
        text = text.removeprefix(prefix)
    return text


def credential_faults(cfg: Any) -> list[str]:
    """The configuration check: one line per fault of `outputs.credentials` (none when it is off)."""
    settings = configured(cfg)
    if settings is None:
        return []
    unreadable = []
    for what in ("certificate", "private_key"):  # both files' faults at once, before the rest
        try:
            _read_pem(getattr(settings, what), what, cfg.origin(f"{SETTING}.{what}"))
        except CredentialError as exc:
            unreadable.append(str(exc))
    if unreadable:
        return unreadable
    try:
        load_signer(settings, cfg.origin)
    except CredentialError as exc:
        return [str(exc)]
    return []


def configured(cfg: Any) -> CredentialSettings | None:
    """`outputs.credentials` of a run configuration, or None when signing is off."""
    outputs = getattr(cfg, "outputs", None)
    return getattr(outputs, "credentials", None)


# --- signing ---------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: dict[str, LoadedSigner] = {}


def signer_for(settings: CredentialSettings) -> LoadedSigner:
    """The checked signer of these settings, loaded once per process."""
    key = settings.model_dump_json()
    with _cache_lock:
        found = _cache.get(key)
        if found is None:
            found = _cache[key] = load_signer(settings)
        return found


def _context(thumbnail: bool) -> "c2pa.Context":
    import c2pa

    return c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": thumbnail}}})


def sign_image(
    data: bytes,
    mime: str,
    *,
    source_type: str,
    models: list[str],
    title: str,
    signer: LoadedSigner,
    ingredient: bytes | None = None,
    ingredient_mime: str | None = None,
    ingredient_title: str = "catalog photo",
    generator: str = "catalogen",
    generator_version: str = catalogen.__version__,
) -> bytes:
    """`data` (an encoded image of type `mime`) with a signed C2PA manifest embedded; the pixels are untouched.

    Without `ingredient`: one `c2pa.created` action with `source_type`. With one (the catalog's
    photo, of type `ingredient_mime`): it becomes the manifest's parent ingredient, opened
    (`c2pa.opened`) then `c2pa.edited` with `source_type`. The edit or creation action's software
    agent is the generator and its version; its parameters list `models`.
    Raises CredentialError (one line) if the SDK cannot sign it.

    Args:
        data (`bytes`): PNG, JPEG or WebP bytes (any type the SDK embeds into).
        mime (`str`): `image/png`, `image/jpeg`, `image/webp` …
        source_type (`str`): an IPTC digital source type URL: `TRAINED` or `COMPOSITE`.
        models (`list[str]`): the models that made it, e.g. `["stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe"]`.
        title (`str`): the asset's name in the manifest (its file name).
        signer (`LoadedSigner`): from `load_signer` or `signer_for`.
    """
    import c2pa

    agent = {"name": generator, "version": generator_version}
    main_action: dict[str, Any] = {
        "action": "c2pa.edited" if ingredient is not None else "c2pa.created",
        "digitalSourceType": source_type,
        "softwareAgent": agent,
        "parameters": {"models": list(models)},
    }
    actions = [main_action]
    if ingredient is not None:
        actions.insert(0, {"action": "c2pa.opened", "parameters": {"ingredientIds": ["catalog-photo"]}})
    manifest = {
        "claim_generator_info": [agent],
        "title": title,
        "format": mime,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
    }
    try:
        builder = c2pa.Builder(manifest, _context(signer.settings.thumbnail))
        with builder:
            if ingredient is not None:
                if not ingredient_mime:
                    raise CredentialError("an ingredient needs its MIME type (ingredient_mime)")
                builder.add_ingredient({"title": ingredient_title, "relationship": "parentOf", "label": "catalog-photo"},
                                       ingredient_mime, io.BytesIO(ingredient))
            out = io.BytesIO()
            builder.sign(signer.native(), mime, io.BytesIO(data), out)
    except c2pa.C2paError as exc:
        raise CredentialError(f"C2PA signing of {title} failed: {_sdk_message(exc)}") from None
    return out.getvalue()


def sign_for_run(data: bytes, mime: str, cfg: Any, *, title: str, models: list[str],
                 ingredient: bytes | None = None, ingredient_mime: str | None = None,
                 source_type: str | None = None) -> bytes:
    """The hook for stages: `data` signed when the run's `outputs.credentials` is set, else unchanged.

    The source type defaults to COMPOSITE when there is an ingredient (the catalog photo, whose
    pixels were kept), else TRAINED.
    """
    settings = configured(cfg)
    if settings is None:
        return data
    if source_type is None:
        source_type = COMPOSITE if ingredient is not None else TRAINED
    return sign_image(data, mime, source_type=source_type, models=models, title=title,
                      signer=signer_for(settings), ingredient=ingredient, ingredient_mime=ingredient_mime)


class SigningFailed(OSError):
    """An image a stage made could not be signed: its row fails, as when the file cannot be written."""


def sign_stage_image(data: bytes, relative: str, ctx: Any, *, ingredient: bytes | None = None,
                     row: Mapping[str, Any] | None = None, ingredient_title: str = "catalog photo") -> bytes:
    """What a stage calls on the encoded bytes of each image it writes: signed when the run's
    `outputs.credentials` is set, else `data` unchanged. Call it after any check of the bytes' pixels.

    The source type and the models come from the label the bytes already carry (catalogen.media.labels);
    the title is the file's name. `ingredient` is the product photo the image was made from, for a
    row whose own pixels were kept: the catalog's photo, or the earlier stage's image (itself signed,
    so the chain of manifests leads back to the photo). Instead of the bytes, a stage may give its
    planned `row`: for a product-photo row (`source_identity` set) its input (`source_image`, else
    `source_bytes`) is read again as the ingredient, only when signing is on. Raises SigningFailed
    (an OSError) when the image cannot be signed, so the stage fails the row as it does a file it
    cannot write.

        >>> data = sign_stage_image(encode_png(image, parameters, provenance), relative, ctx)
    """
    settings = configured(ctx.config)
    if settings is None:
        return data
    from catalogen.media import labels

    if ingredient is None and row is not None and row.get("source_identity") is not None:
        from catalogen.media.images import read_source

        try:
            ingredient = read_source(row.get("source_image"), row.get("source_bytes"), ctx.store.root, ctx.config.images)
        except Exception as exc:  # noqa: BLE001 - an input read a moment ago and gone now: the row fails
            raise SigningFailed(f"C2PA signing of {Path(relative).name}: cannot read its ingredient "
                                f"{row.get('source_image') or 'the catalog bytes'} ({exc})") from None
        if row.get("source_image") and not os.path.isabs(str(row["source_image"])) and "://" not in str(row["source_image"]):
            ingredient_title = Path(str(row["source_image"])).name  # an earlier stage's image, signed in turn
    try:
        label = labels.read_label(data)
        return sign_image(
            data, mime_of(relative), source_type=IPTC + (label.source_type or labels.TRAINED),
            models=labels.models_of(label.provenance), title=Path(relative).name, signer=signer_for(settings),
            ingredient=ingredient, ingredient_mime=_sniff_mime(ingredient) if ingredient is not None else None,
            ingredient_title=ingredient_title,
        )
    except CredentialError as exc:
        raise SigningFailed(str(exc)) from None


def _sniff_mime(data: bytes) -> str:
    """The MIME type of image bytes (a catalog photo may be any format Pillow reads)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001 - not an image Pillow knows: still an ingredient, by its bytes
        return "application/octet-stream"


# --- reading back ----------------------------------------------------------------------------------


def read_credentials(data: bytes, mime: str | None = None, trust_anchors: str | bytes | None = None) -> dict[str, Any]:
    """What a C2PA reader finds in `data`: validation state, actions, source type, ingredients, signer.

    `state` is None (no manifest), "Invalid", "Valid" (signature and hashes hold) or "Trusted"
    (also chains to one of `trust_anchors`, PEM certificates). `failures` lists the failure codes
    (`signingCredential.untrusted` is left out unless trust anchors are given).
    """
    import c2pa

    settings: dict[str, Any] = {}
    if trust_anchors is not None:
        anchors = trust_anchors.decode() if isinstance(trust_anchors, bytes) else trust_anchors
        settings = {"trust": {"trust_anchors": anchors}, "verify": {"verify_trust": True}}
    context = c2pa.Context.from_dict(settings) if settings else None
    try:
        reader = c2pa.Reader(mime or None, io.BytesIO(data), None, context) if context else c2pa.Reader(mime or None, io.BytesIO(data))
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__:
            return {"state": None, "failures": [], "actions": [], "source_type": None, "ingredients": [],
                    "signer": None, "generator": None, "error": _first_line(exc)}
        return {"state": "Invalid", "failures": [_first_line(exc)], "actions": [], "source_type": None,
                "ingredients": [], "signer": None, "generator": None, "error": _first_line(exc)}
    with reader:
        store = json.loads(reader.json())
    manifests = store.get("manifests", {})
    manifest = manifests.get(store.get("active_manifest") or "", {})
    actions = _actions(manifest)
    failures = [s.get("code") for s in store.get("validation_status", [])
                if trust_anchors is not None or s.get("code") != "signingCredential.untrusted"]
    return {
        "state": store.get("validation_state"),
        "failures": failures,
        "actions": actions,
        "source_type": _source_type(actions),
        "ingredients": _ingredients(manifest, manifests),
        "signer": manifest.get("signature_info"),
        "generator": manifest.get("claim_generator_info"),
        "title": manifest.get("title"),
    }


def _actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for assertion in manifest.get("assertions", []):
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            found += assertion.get("data", {}).get("actions", [])
    return found


def _source_type(actions: list[dict[str, Any]]) -> str | None:
    return next((a["digitalSourceType"] for a in actions if a.get("digitalSourceType")), None)


def _ingredients(manifest: dict[str, Any], manifests: dict[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """A manifest's ingredients; one that carried a manifest of its own (an earlier stage's image) lists
    that manifest's source type and ingredients in turn, so a chain leads back to the catalog photo."""
    found = []
    for ingredient in manifest.get("ingredients", []):
        entry = {k: ingredient.get(k) for k in ("title", "format", "relationship")}
        own = manifests.get(ingredient.get("active_manifest") or "")
        if own is not None and depth < 16:
            entry["source_type"] = _source_type(_actions(own))
            entry["ingredients"] = _ingredients(own, manifests, depth + 1)
        found.append(entry)
    return found


def mime_of(path: str | Path) -> str:
    """An image file's MIME type from its suffix (PNG, JPEG, WebP, AVIF)."""
    suffix = Path(path).suffix.lower()
    if suffix not in MIME_TYPES:
        raise CredentialError(f"{path}: cannot sign a {suffix or 'suffix-less'} file (PNG, JPEG, WebP or AVIF)")
    return MIME_TYPES[suffix]
