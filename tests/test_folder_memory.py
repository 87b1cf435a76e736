"""A run folder remembers how it was made: re-runs, hints, trials, and clean / verify / status agreeing."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app

CONFIG = {"stages": ["generate", "remove_bg"], "rows_per_shard": 2,
          "generate": {"steps": 3, "width": 32, "height": 32},
          "remove_bg": {"canvas": {"enabled": True, "size": 48}}}


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def verified(out: Path) -> bool:
    code, output = cli("verify", str(out))
    return code == 0 and output.endswith("every image matches its recorded sha256\n")


def hint(output: str, marker: str) -> list[str]:
    """The command a line of the output tells the user to run, as argv without `catalogen`."""
    line = next(line for line in output.splitlines() if marker in line)
    command = shlex.split(line.split(marker, 1)[1].strip())
    assert command[:2] == ["catalogen", "run"], line
    return command[1:]


def pending(status_output: str) -> int:
    """The generate row's pending count in `status`'s table."""
    cells = next(line.replace("│", " ").split() for line in status_output.splitlines() if "│ generate" in line)
    return int(cells[-1])


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Path]:
    """A folder made with a config file of its own (not the defaults): generate -> remove_bg, 3 steps."""
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(4))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    code, output = cli("run", str(catalog), "--config", str(config), "--out", str(out))
    assert code == 0, output
    return catalog, out


def test_verify_hint_reproduces_the_folders_settings(made: tuple[Path, Path]):
    catalog, out = made
    before = pd.read_parquet(out / "results.parquet")
    (out / before.generate_image_path[1]).unlink()

    code, output = cli("verify", str(out))
    assert code == 3 and "image missing" in output
    command = hint(output, "redo them with:")
    assert command == ["run", str(catalog), "--out", str(out), "--retry-failed"]
    code, output = cli(*command)  # exactly what the user was told, with no --config
    assert code == 0, output
    assert "settings changed" not in output

    after = pd.read_parquet(out / "results.parquet")
    assert len(after) == 4 and (after.status == "ok").all()
    assert set(after.generate_steps) == {3} and "remove_bg_status" in after  # not the defaults (25 steps, generate only)
    redone = after.generate_finished_at != before.generate_finished_at
    assert redone.tolist() == [False, True, False, False]  # that row, not the others
    assert after.generate_image_sha256.tolist() == before.generate_image_sha256.tolist()  # same settings, same image
    assert verified(out)


def test_changed_settings_are_announced_and_clean_verify_status_then_agree(made: tuple[Path, Path]):
    catalog, out = made
    old = pd.read_parquet(out / "results.parquet")
    code, output = cli("run", str(catalog), "--out", str(out), "--set", "generate.steps=2")
    assert code == 0, output
    assert ("settings changed since the folder's last run: generate.steps: 3 -> 2 (from --set generate.steps=2); "
            "so generate 4 of 4 rows pending, remove_bg 4 of 4 rows pending") in " ".join(output.split())

    code, output = cli("clean", str(out), "--yes")
    assert code == 0 and "removed 12 image(s)" in output  # 4 generated, 4 cut-outs, 4 canvases of 3 steps
    new = pd.read_parquet(out / "results.parquet")
    for column in ("generate_image_path", "remove_bg_image_path", "remove_bg_canvas_path", "image_path"):
        assert all((out / p).is_file() for p in new[column]), column  # every image a current result points at
        assert not any((out / p).exists() for p in old[column])

    assert verified(out)
    code, output = cli("status", str(out))
    assert code == 0 and "redo" not in output and "make the pending" not in output
    code, output = cli("run", str(catalog), "--out", str(out), "--retry-failed")
    assert code == 0 and "4 rows: 4 ok" in output and "settings changed" not in output
    assert verified(out)

    # A changed image is caught in the stage that made it; the hint redoes that row and what reads it.
    (out / new.remove_bg_canvas_path[0]).write_bytes(b"not the canvas")
    code, output = cli("verify", str(out))
    assert code == 3 and "remove_bg: row-0 v0: verify: image changed since it was written" in output
    code, output = cli("status", str(out))
    assert "redo the failed rows:" in output
    code, output = cli(*hint(output, "redo the failed rows:"))
    assert code == 0, output
    assert verified(out)


def test_a_trial_never_drops_rows_done_before_and_says_it_is_a_trial(tmp_path: Path):
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(6))
    fast = ["--set", "generate.steps=2", "--set", "generate.width=32", "--set", "generate.height=32"]
    trial = tmp_path / "trial"
    code, output = cli("run", str(catalog), "--out", str(trial), "--limit", "2", *fast)
    assert code == 0, output
    assert len(pd.read_parquet(trial / "results.parquet")) == 2
    assert json.loads((trial / "run.json").read_text())["trial"] == {"selection": "--limit 2", "rows": 2, "of": 6}
    code, output = cli("status", str(trial))
    assert "trial subset (--limit 2): 2 of 6 rows" in output and pending(output) == 4
    assert "trial subset" in (trial / "report.html").read_text()
    first = pd.read_parquet(trial / "results.parquet")

    # The two commands status prints, run exactly as printed. The trial's again, in a new folder:
    # the same 2 rows, with the trial's settings (the same images), and it is a trial itself.
    again = trial.parent / "trial-trial"
    repeat = hint(output, "repeat the trial in a new folder, with these settings:")
    assert repeat[repeat.index("--out") + 1] == str(again) and repeat[repeat.index("--out") + 2:][:2] == ["--limit", "2"]
    code, repeated = cli(*repeat)
    assert code == 0 and "2 rows: 2 ok" in repeated, repeated
    assert pd.read_parquet(again / "results.parquet").image_sha256.tolist() == first.image_sha256.tolist()
    code, status_again = cli("status", str(again))
    assert "trial subset (--limit 2): 2 of 6 rows" in status_again and pending(status_again) == 4
    assert hint(status_again, "repeat the trial in a new folder, with these settings:")[3] == str(trial.parent / "trial-trial-trial")
    # verify's hint on a trial folder stays within the trial's rows
    (again / pd.read_parquet(again / "results.parquet").image_path[1]).unlink()
    code, verified_output = cli("verify", str(again))
    redo = hint(verified_output, "redo them with:")
    assert code == 3 and redo[-3:] == ["--limit", "2", "--retry-failed"], verified_output
    code, redone = cli(*redo)
    assert code == 0 and "2 rows: 2 ok" in redone and verified(again)
    assert pd.read_parquet(again / "results.parquet").image_sha256.tolist() == first.image_sha256.tolist()

    # The rest of the catalog, into the trial's folder with its settings: nothing stays pending.
    rest = hint(output, "make the rest of the catalog in this folder:")
    assert rest == ["run", str(catalog), "--out", str(trial)]
    code, output = cli(*rest)
    assert code == 0 and "6 rows: 6 ok" in output
    assert json.loads((trial / "run.json").read_text())["trial"] is None
    code, output = cli("status", str(trial))
    assert pending(output) == 0 and "make the" not in output and "repeat" not in output
    whole = pd.read_parquet(trial / "results.parquet")
    assert whole.image_sha256[:2].tolist() == first.image_sha256.tolist()

    code, output = cli("run", str(catalog), "--out", str(trial), "--sample", "3", "--set", "generate.steps=3")
    assert code == 0, output
    after = pd.read_parquet(trial / "results.parquet")
    assert len(after) == 6  # never fewer rows than were done
    assert (after.generate_steps == 3).sum() == 3 and (after.generate_steps == 2).sum() == 3
    kept = after.generate_steps == 2
    assert after[kept].image_sha256.isin(whole.image_sha256).all()
    assert json.loads((trial / "run.json").read_text())["trial"] is None  # the folder holds the whole catalog
