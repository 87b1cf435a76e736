"""C2PA content credentials: images signed with a certificate chain made here, every manifest read
back with the SDK's own reader (signature, digital source type, ingredient), tampering detected,
and every bad certificate or key refused before a run writes anything."""

from __future__ import annotations

import datetime
import io
import os
import time
from pathlib import Path

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image
from typer.testing import CliRunner

import catalogen
from catalogen.cli import app
from catalogen.config import load_config
from catalogen.media.credentials import (
    COMPOSITE,
    MAX_PEM_BYTES,
    TRAINED,
    CredentialError,
    CredentialSettings,
    load_signer,
    read_credentials,
    sign_for_run,
    sign_image,
)

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "catalogen tests")])


def _usage(*, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=not signing,
                         crl_sign=not signing, encipher_only=False, decipher_only=False)


class PKI:
    """A CA and signing certificates issued by it, written as PEM files into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = (
            x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(signing=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str = "signer", *, eku: bool = True, valid: tuple[int, int] = (-1, 30),
              self_signed: bool = False, curve: ec.EllipticCurve | None = None, ca_first: bool = False,
              key_format: str = "pkcs8", password: bytes | None = None) -> CredentialSettings:
        key = ec.generate_private_key(curve or ec.SECP256R1())
        issuer_key = key if self_signed else self.ca_key
        builder = (
            x509.CertificateBuilder().subject_name(_name(name))
            .issuer_name(_name(name) if self_signed else self.ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW + valid[0] * DAY).not_valid_after(NOW + valid[1] * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(signing=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        cert_pem = builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        chain = cert_pem if self_signed else (self.ca_pem + cert_pem if ca_first else cert_pem + self.ca_pem)
        fmt = {"pkcs8": serialization.PrivateFormat.PKCS8, "sec1": serialization.PrivateFormat.TraditionalOpenSSL}[key_format]
        encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        (self.folder / f"{name}.pem").write_bytes(chain)
        (self.folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
        return CredentialSettings(certificate=self.folder / f"{name}.pem", private_key=self.folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signer(pki: PKI):
    return load_signer(pki.issue("good"))


def encode(fmt: str, color: str = "teal", size: tuple[int, int] = (48, 40)) -> bytes:
    image = Image.new("RGB", size, color)
    image.putpixel((3, 5), (250, 10, 20))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return buffer.getvalue()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


# --- signing and reading back ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(MIMES))
def test_a_generated_image_gets_a_created_action_with_its_source_type(fmt: str, signer, pki: PKI):
    original = encode(fmt)
    signed = sign_image(original, MIMES[fmt], source_type=TRAINED, models=["tiny:sd15@abc123"],
                        title=f"row-1.{fmt.lower()}", signer=signer)
    assert pixels(signed) == pixels(original)  # the manifest goes beside the pixels, not into them

    found = read_credentials(signed, MIMES[fmt])
    assert found["state"] == "Valid" and found["failures"] == []
    trusted = read_credentials(signed, MIMES[fmt], trust_anchors=pki.ca_pem)
    assert trusted["state"] == "Trusted" and trusted["failures"] == []
    [action] = found["actions"]
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"] == TRAINED == found["source_type"]
    assert action["softwareAgent"]["name"] == "catalogen"
    assert action["softwareAgent"]["version"] == catalogen.__version__
    assert action["parameters"]["models"] == ["tiny:sd15@abc123"]
    assert found["ingredients"] == []
    assert found["signer"]["common_name"] == "good" and found["title"] == f"row-1.{fmt.lower()}"


@pytest.mark.parametrize(("fmt", "photo_fmt"), [("PNG", "JPEG"), ("JPEG", "PNG"), ("WEBP", "WEBP")])
def test_a_product_photo_is_an_edit_of_the_catalog_photo_its_ingredient(fmt: str, photo_fmt: str, signer):
    photo = encode(photo_fmt, "orange", (30, 30))
    signed = sign_image(encode(fmt), MIMES[fmt], source_type=COMPOSITE, models=["tiny:ip-adapter"],
                        title="sku-7.png", signer=signer, ingredient=photo, ingredient_mime=MIMES[photo_fmt],
                        ingredient_title="sku-7 catalog photo")
    found = read_credentials(signed, MIMES[fmt])
    assert found["state"] == "Valid", found["failures"]
    assert [a["action"] for a in found["actions"]] == ["c2pa.opened", "c2pa.edited"]
    assert found["source_type"] == COMPOSITE == found["actions"][1]["digitalSourceType"]
    assert found["ingredients"] == [{"title": "sku-7 catalog photo", "format": MIMES[photo_fmt], "relationship": "parentOf"}]


def test_the_run_hook_picks_the_source_type_and_is_off_without_settings(pki: PKI):
    image = encode("PNG")
    off = load_config(None, {})
    assert off.outputs.credentials is None
    assert sign_for_run(image, "image/png", off, title="a.png", models=["m"]) == image

    settings = pki.issue("hook")
    on = load_config(None, {"outputs.credentials.certificate": str(settings.certificate),
                            "outputs.credentials.private_key": str(settings.private_key)})
    generated = read_credentials(sign_for_run(image, "image/png", on, title="a.png", models=["m"]), "image/png")
    assert generated["state"] == "Valid" and generated["source_type"] == TRAINED
    product = sign_for_run(image, "image/png", on, title="b.png", models=["m"],
                           ingredient=encode("JPEG"), ingredient_mime="image/jpeg")
    found = read_credentials(product, "image/png")
    assert found["source_type"] == COMPOSITE and found["ingredients"][0]["relationship"] == "parentOf"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "avif"])
def test_the_label_and_icc_profile_survive_signing(fmt: str, signer):
    from catalogen.media import labels

    label = labels.Label(labels.COMPOSITE, "a shoe\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 40x30, Model: m",
                         {"stage": "style", "model": "m", "model_revision": "abc"})
    data = labels.encode(Image.new("RGB", (40, 30), "teal"), fmt, label, icc=True)
    mime = f"image/{fmt}"
    signed = sign_image(data, mime, source_type=COMPOSITE, models=labels.models_of(label.provenance), title="t",
                        signer=signer)
    assert read_credentials(signed, mime)["state"] == "Valid"
    assert read_credentials(signed, mime)["actions"][0]["parameters"]["models"] == ["m@abc"]
    assert labels.read_label(signed) == label
    with Image.open(io.BytesIO(signed)) as image:
        assert image.info.get("icc_profile") == labels.srgb_profile()


def _flip_in_png_pixels(data: bytes) -> bytes:
    start = data.index(b"IDAT") + 4 + 2  # past the chunk type and the zlib header
    return data[:start] + bytes([data[start] ^ 0x01]) + data[start + 1:]


def _flip_in_jpeg_scan(data: bytes) -> bytes:
    at = len(data) - 10  # inside the entropy-coded scan, before the EOI marker
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


@pytest.mark.parametrize(("fmt", "tamper"), [("PNG", _flip_in_png_pixels), ("JPEG", _flip_in_jpeg_scan)])
def test_tampered_pixels_are_detected(fmt: str, tamper, signer):
    signed = sign_image(encode(fmt), MIMES[fmt], source_type=TRAINED, models=[], title="t", signer=signer)
    found = read_credentials(tamper(signed), MIMES[fmt])
    assert found["state"] == "Invalid"
    assert any("mismatch" in code for code in found["failures"]), found["failures"]


def test_a_tampered_manifest_is_detected(signer):
    signed = sign_image(encode("PNG"), "image/png", source_type=TRAINED, models=["a"], title="t", signer=signer)
    at = signed.index(b"c2pa.actions") + 2
    changed = signed[:at] + bytes([signed[at] ^ 0x01]) + signed[at + 1:]
    assert read_credentials(changed, "image/png")["state"] == "Invalid"


def test_an_unsigned_image_has_no_credentials():
    assert read_credentials(encode("PNG"), "image/png")["state"] is None


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + os.urandom(2000), os.urandom(4096)])
def test_garbage_reads_as_no_or_invalid_credentials(data: bytes):
    assert read_credentials(data, "image/png")["state"] in (None, "Invalid")


def test_a_truncated_signed_file_is_not_valid(signer):
    signed = sign_image(encode("PNG"), "image/png", source_type=TRAINED, models=[], title="t", signer=signer)
    assert read_credentials(signed[: len(signed) - 200], "image/png")["state"] != "Valid"


def test_a_stage_that_cannot_sign_fails_its_row_as_a_write_error(pki: PKI, tmp_path: Path):
    """A key gone after the check: the stage's image cannot be signed, which raises an OSError (the
    stages record it as the row's failure); with signing off the bytes pass through unchanged."""
    import torch

    from catalogen.media.credentials import SigningFailed, sign_stage_image
    from catalogen.run.devices import Device
    from catalogen.stage import StageContext
    from catalogen.storage.store import RunStore

    image = encode("PNG")
    off = StageContext(load_config(None, {}), RunStore(tmp_path / "run"), {}, Device("cpu", "cpu"), torch.float32)
    assert sign_stage_image(image, "images/generate/a.png", off) is image
    settings = pki.issue("vanishing")
    cfg = load_config(None, {"outputs.credentials.certificate": str(settings.certificate),
                             "outputs.credentials.private_key": str(settings.private_key)})
    settings.private_key.unlink()
    ctx = StageContext(cfg, RunStore(tmp_path / "run"), {}, Device("cpu", "cpu"), torch.float32)
    with pytest.raises(SigningFailed, match="outputs.credentials.private_key .*cannot read it") as caught:
        sign_stage_image(image, "images/generate/a.png", ctx)
    assert isinstance(caught.value, OSError)


def test_a_sec1_key_is_accepted(pki: PKI):
    loaded = load_signer(pki.issue("sec1", key_format="sec1"))
    signed = sign_image(encode("PNG"), "image/png", source_type=TRAINED, models=[], title="t", signer=loaded)
    assert read_credentials(signed, "image/png")["state"] == "Valid"


# --- refused before the run ------------------------------------------------------------------------


def _swap_key(pki: PKI) -> CredentialSettings:
    one, other = pki.issue("mine"), pki.issue("theirs")
    return CredentialSettings(certificate=one.certificate, private_key=other.private_key)


def _file(pki: PKI, name: str, data: bytes, which: str) -> CredentialSettings:
    good = pki.issue(f"base-{name}")
    path = pki.folder / name
    path.write_bytes(data)
    return good.model_copy(update={which: path})


BAD = {
    "missing certificate": (lambda p: pki_missing(p, "certificate"), "certificate", "cannot read it (No such file"),
    "missing key": (lambda p: pki_missing(p, "private_key"), "private_key", "cannot read it (No such file"),
    "certificate is a folder": (lambda p: pki_folder(p), "certificate", "not a file"),
    "garbage certificate": (lambda p: _file(p, "garbage.pem", os.urandom(5000), "certificate"), "certificate", "not PEM"),
    "huge certificate": (lambda p: _file(p, "huge.pem", b"-----BEGIN CERTIFICATE-----\n" + b"A" * (MAX_PEM_BYTES + 10), "certificate"),
                         "certificate", "more than a PEM certificate can be"),
    "broken PEM": (lambda p: _file(p, "broken.pem", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "certificate"),
                   "certificate", "not a PEM certificate chain"),
    "key is a certificate": (lambda p: _file(p, "cert-as-key.key", p.ca_pem, "private_key"), "private_key", "not a PEM private key"),
    "wrong key": (_swap_key, "private_key", "not the key of the certificate"),
    "expired": (lambda p: p.issue("expired", valid=(-30, -1)), "certificate", "expired on"),
    "not yet valid": (lambda p: p.issue("future", valid=(2, 30)), "certificate", "is not valid before"),
    "self-signed": (lambda p: p.issue("selfie", self_signed=True), "certificate", "self-signed"),
    "chain out of order": (lambda p: p.issue("upside", ca_first=True), "certificate", "list the signing certificate first"),
    "no extended key usage": (lambda p: p.issue("no-eku", eku=False), "certificate", "the C2PA SDK refuses it"),
    "encrypted key": (lambda p: p.issue("locked", password=b"secret"), "private_key", "the key is encrypted"),
    "key for another algorithm": (lambda p: p.issue("p384", curve=ec.SECP384R1()), "private_key", "cannot sign es256"),
}


def pki_missing(pki: PKI, which: str) -> CredentialSettings:
    return pki.issue(f"gone-{which}").model_copy(update={which: pki.folder / "nowhere" / "x.pem"})


def pki_folder(pki: PKI) -> CredentialSettings:
    (pki.folder / "a-folder").mkdir(exist_ok=True)
    return pki.issue("folder").model_copy(update={"certificate": pki.folder / "a-folder"})


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_certificate_or_key_is_refused_in_one_line_naming_setting_and_file(case: str, pki: PKI):
    make, which, message = BAD[case]
    settings = make(pki)
    with pytest.raises(CredentialError) as caught:
        load_signer(settings)
    text = str(caught.value)
    assert "\n" not in text
    assert f"outputs.credentials.{which} '{getattr(settings, which)}'" in text, text
    assert message in text, text


def test_a_fifo_or_device_is_not_read(pki: PKI, tmp_path: Path):
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        settings = pki.issue("dev").model_copy(update={"certificate": path})
        started = time.monotonic()
        with pytest.raises(CredentialError, match="not a file"):
            load_signer(settings)
        assert time.monotonic() - started < 1


def test_a_huge_garbage_file_fails_fast(pki: PKI, tmp_path: Path):
    huge = tmp_path / "huge.key"
    with huge.open("wb") as handle:
        handle.truncate(2 << 30)  # 2 GiB, sparse: nothing is read
    settings = pki.issue("hugekey").model_copy(update={"private_key": huge})
    started = time.monotonic()
    with pytest.raises(CredentialError, match="more than a PEM private_key can be"):
        load_signer(settings)
    assert time.monotonic() - started < 1


def test_the_setting_is_checked_by_the_configuration_model(tmp_path: Path, monkeypatch):
    with pytest.raises(Exception, match="unknown setting; did you mean 'outputs.credentials.certificate'"):
        load_config(None, {"outputs.credentials.certificat": "x.pem"})
    with pytest.raises(Exception, match="timestamp_url must be an http"):
        load_config(None, {"outputs.credentials": {"certificate": "a", "private_key": "b", "timestamp_url": "ftp://x"}})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"outputs.credentials": {"certificate": "certs/a.pem", "private_key": "~/b.key"}})
    assert cfg.outputs.credentials.certificate == tmp_path / "certs" / "a.pem"  # absolute, as run.json records it
    assert cfg.outputs.credentials.private_key == Path.home() / "b.key"


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _credential_args(settings: CredentialSettings) -> list[str]:
    return ["--set", f"outputs.credentials.certificate={settings.certificate}",
            "--set", f"outputs.credentials.private_key={settings.private_key}"]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_the_cli_refuses_a_bad_certificate_before_writing_anything(command: str, pki: PKI, tmp_path: Path):
    settings = pki.issue("expired-cli", valid=(-30, -1))
    out = tmp_path / "out"
    before = _tree(tmp_path) | _tree(pki.folder)
    args = [command, "catalogs/demo_prompts.parquet", *_credential_args(settings)]
    result = CliRunner().invoke(app, args + (["--out", str(out)] if command == "run" else []))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: invalid configuration:")
    [line] = [l for l in result.output.splitlines() if "outputs.credentials" in l]
    assert f"outputs.credentials.certificate '{settings.certificate}'" in line and "expired on" in line
    assert "(from --set outputs.credentials.certificate=" in line
    assert "Traceback" not in result.output
    assert not out.exists() and _tree(tmp_path) | _tree(pki.folder) == before


def test_both_unreadable_files_are_named_at_once(tmp_path: Path):
    (tmp_path / "chain.pem").write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(app, ["validate", "catalogs/demo_prompts.parquet", *_credential_args(
        CredentialSettings(certificate=tmp_path / "chain.pem", private_key=tmp_path / "absent.key"))])
    assert result.exit_code == 1
    assert result.output.splitlines()[1:] == [
        f"  outputs.credentials.certificate '{tmp_path / 'chain.pem'}': not PEM (no '-----BEGIN' line) "
        f"(from --set outputs.credentials.certificate={tmp_path / 'chain.pem'})",
        f"  outputs.credentials.private_key '{tmp_path / 'absent.key'}': cannot read it (No such file or directory) "
        f"(from --set outputs.credentials.private_key={tmp_path / 'absent.key'})",
    ]


def test_validate_accepts_a_good_certificate(pki: PKI):
    result = CliRunner().invoke(app, ["validate", "catalogs/demo_prompts.parquet", *_credential_args(pki.issue("ok-cli"))])
    assert result.exit_code == 0, result.output


# --- in a run ---------------------------------------------------------------------------------------

FEWER_STEPS = ["--set", "generate.steps=2", "--set", "style.steps=2", "--set", "upscale.steps=2"]


def _run(out: Path, settings: CredentialSettings, *args: str) -> pd.DataFrame:
    result = CliRunner().invoke(app, ["run", *args, "--out", str(out), *FEWER_STEPS, *_credential_args(settings)])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "results.parquet")


def _images(out: Path, df, columns: list[str]) -> list[tuple[str, bytes]]:
    found = []
    for column in columns:
        for relative in df[column]:
            found.append((column, (out / relative).read_bytes()))
    return found


def test_every_image_of_a_generated_run_is_signed(pki: PKI, tmp_path: Path, monkeypatch):
    from conftest import REPO

    from catalogen.media.labels import read_label

    monkeypatch.chdir(REPO)
    out = tmp_path / "prompts"
    df = _run(out, pki.issue("run-prompts"), "catalogs/demo_prompts.parquet", "--limit", "2",
              "--set", "generate.width=32", "--set", "generate.height=32")
    assert (df.status == "ok").all() and len(df) == 2
    for _, data in _images(out, df, ["image_path"]):
        found = read_credentials(data, "image/png", trust_anchors=pki.ca_pem)
        assert found["state"] == "Trusted", found["failures"]
        assert [a["action"] for a in found["actions"]] == ["c2pa.created"]
        assert found["source_type"] == TRAINED and found["ingredients"] == []
        assert any(m.startswith("tiny:") or "@" in m for m in found["actions"][0]["parameters"]["models"])
        assert read_label(data).source_type == "trainedAlgorithmicMedia"  # the XMP label survives signing
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0  # the recorded sha256 is the signed file's


def test_every_image_of_a_product_photo_run_is_an_edit_leading_back_to_the_photo(pki: PKI, tmp_path: Path, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    out = tmp_path / "photos"
    df = _run(out, pki.issue("run-photos"), "catalogs/demo_photos.parquet", "--config", "configs/photos.yaml",
              "--limit", "2")
    assert (df.status == "ok").all() and len(df) == 2 and (df.stage == "renditions").all()
    renditions = sorted(c for c in df.columns if c.startswith("renditions_") and c.endswith("_path"))
    assert renditions, list(df.columns)
    columns = ["remove_bg_image_path", "remove_bg_canvas_path", "style_image_path", "upscale_image_path", *renditions]
    for column, data in _images(out, df, columns):
        mime = Image.MIME[Image.open(io.BytesIO(data)).format]
        found = read_credentials(data, mime, trust_anchors=pki.ca_pem)
        assert found["state"] == "Trusted", (column, found["failures"])
        assert [a["action"] for a in found["actions"]] == ["c2pa.opened", "c2pa.edited"], column
        assert found["source_type"] == COMPOSITE, column
        [ingredient] = found["ingredients"]
        assert ingredient["relationship"] == "parentOf"
        chain = ingredient
        while chain.get("ingredients"):  # an earlier stage's signed image, back to the catalog photo
            assert chain["source_type"] == COMPOSITE
            [chain] = chain["ingredients"]
        assert chain["title"] == "catalog photo" and "source_type" not in chain, (column, found["ingredients"])
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
