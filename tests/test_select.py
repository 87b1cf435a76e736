"""Best-of-N, quality gates and what follows from them (catalogen/review/select.py, rules.py, state.py).

Refusals and one tiny-profile run go through the CLI; the ranking and gates are also checked on small
tables with the columns a run has (and a score column another stage adds: any numeric column works).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, prompts, write_catalog
from typer.testing import CliRunner

from catalogen.cli import app
from catalogen.config import ReviewSettings, SelectSettings, load_config
from catalogen.review.decisions import Decision, now, record
from catalogen.review.select import NOT_CHOSEN, decide
from catalogen.review.state import current
from catalogen.run.plan import NOT_APPROVED
from catalogen.storage.store import RunStore

AT = datetime(2026, 1, 1, tzinfo=timezone.utc)
TINY = ["--set", "generate.steps=2", "--set", "generate.width=32", "--set", "generate.height=32"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# --- refused before any work ------------------------------------------------------------------------


@pytest.mark.parametrize("setting, expected", [
    ("select.by=__import__('os').system('true')", "select.by \"__import__('os').system('true')\": "
     "__import__('os').system(…) is a function call"),
    ("select.by=abs(generate_seed)", "select.by 'abs(generate_seed)': abs(…) is a function call"),
    ("select.by=generate_seed.real", "select.by 'generate_seed.real': generate_seed.real is an attribute"),
    ("select.by=generate_prompt", "select.by 'generate_prompt': column generate_prompt holds text, not numbers"),
    ("select.by=score_aestetic + 1", "select.by 'score_aestetic + 1': the run's results has no column 'score_aestetic'"),
    ("select.by=generate_seed['x']", "select.by \"generate_seed['x']\": generate_seed['x'] is not allowed"),
    ("select.require=[nope == 1]", "select.require.0 'nope == 1': the run's results has no column 'nope'"),
    ("review.reject_if=[generate_safety_flagged == maybe]",
     "review.reject_if.0 'generate_safety_flagged == maybe': column generate_safety_flagged holds true/false; "
     "'maybe' is neither"),
    ("review.approve_if=[caption_status != degenerate]",  # caption is not among the run's stages
     "review.approve_if.0 'caption_status != degenerate': the run's results has no column 'caption_status'"),
])
def test_a_bad_score_or_rule_is_refused_in_one_line_before_any_work(tmp_path: Path, setting: str, expected: str):
    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(2))
    out = tmp_path / "out"
    result = invoke("run", str(catalog), "--out", str(out), "--dry-run", "--set", setting)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "(from --set" in lines[0], result.output
    assert "Traceback" not in result.output and not out.exists()
    checked = invoke("validate", str(catalog), "--set", setting)  # `validate` refuses the same way
    assert checked.exit_code == 1 and expected in checked.output


def test_a_catalog_column_and_a_later_stage_column_are_known(tmp_path: Path):
    catalog = write_catalog(tmp_path / "catalog.parquet", {**prompts(2), "margin": [0.2, 0.4]})
    result = invoke("validate", str(catalog), "--set", "select.by=margin * 10 - (generate_guidance_scale / 2)",
                    "--set", "review.reject_if=[near_duplicate_of != null]")
    assert result.exit_code == 0, result.output


# --- ranking and gates on tables --------------------------------------------------------------------


def table(**columns) -> pa.Table:
    base = {"id": ["a", "a", "a", "b", "b", "c", "c"], "variant": [0, 1, 2, 0, 1, 0, 1],
            "status": ["ok", "ok", "ok", "ok", "failed", "ok", "ok"]}
    return pa.table({**base, **columns}).cast(pa.schema([pa.field("variant", pa.int32()) if n == "variant" else
                                                         pa.field(n, pa.table({n: v}).schema.field(n).type)
                                                         for n, v in {**base, **columns}.items()]))


def rows(decided: pa.Table) -> list[tuple]:
    return list(zip(decided.column("id").to_pylist(), decided.column("variant").to_pylist(),
                    decided.column("select_rank").to_pylist(), decided.column("selected").to_pylist(),
                    decided.column("review_state").to_pylist(), decided.column("review_reason").to_pylist()))


def test_candidates_rank_by_a_weighted_score_ties_to_the_lower_variant():
    scores = table(score_aesthetic=[5.0, 6.0, 6.0, 4.0, 9.0, None, 1.0], caption_clip_score=[20.0, 0, 0, 0, 0, 0, 0])
    decided = decide(scores, SelectSettings(by="score_aesthetic + 0.05 * caption_clip_score"), None, AT)
    assert rows(decided) == [
        ("a", 0, 1, True, "approved", None),  # 5 + 0.05 * 20 = 6.0: ties with variants 1 and 2, and is the lowest
        ("a", 1, 2, False, "alternate", NOT_CHOSEN),
        ("a", 2, 3, False, "alternate", NOT_CHOSEN),
        ("b", 0, 2, True, "approved", None),  # variant 1 scores higher but failed
        ("b", 1, 1, False, "alternate", "status failed"),
        ("c", 0, 2, False, "alternate", NOT_CHOSEN),  # no score ranks last
        ("c", 1, 1, True, "approved", None),
    ]
    kept = decide(scores, SelectSettings(by="score_aesthetic", keep=2), None, AT)
    assert kept.column("selected").to_pylist() == [False, True, True, True, False, True, True]


def test_an_id_whose_candidates_all_fail_require_has_none_selected_and_says_which_rule():
    decided = decide(table(product_identical=[True, False, True, False, True, True, None]),
                     SelectSettings(require=["product_identical == true", "variant <= 1"]), None, AT)
    assert rows(decided) == [
        ("a", 0, 1, True, "approved", None),
        ("a", 1, 2, False, "alternate", "fails select.require: product_identical == true"),
        ("a", 2, 3, False, "alternate", "fails select.require: variant <= 1"),
        ("b", 0, 1, False, "alternate", "fails select.require: product_identical == true"),
        ("b", 1, 2, False, "alternate", "status failed"),
        ("c", 0, 1, True, "approved", None),
        ("c", 1, 2, False, "alternate", "fails select.require: product_identical == true"),  # null never passes
    ]
    assert decided.column("review_by").to_pylist()[:2] == ["default", "select"]


def test_gates_reject_approve_or_leave_for_a_person():
    gated = table(caption_status=["ok", "ok", "ok", "degenerate", "ok", "ok", "ok"],
                  caption_clip_score=[30.0, 0, 0, 40.0, 0, 24.9, 20.0],
                  near_duplicate_of=pa.array([None] * 7, pa.string()))
    review = ReviewSettings(reject_if=["caption_status == degenerate", "near_duplicate_of != null"],
                            approve_if=["caption_clip_score >= 25", "near_duplicate_of == null"])
    decided = decide(gated, SelectSettings(by="caption_clip_score"), review, AT)
    chosen = [(r[0], r[4], r[5]) for r in rows(decided) if r[3]]
    assert chosen == [("a", "approved", None), ("b", "rejected", "caption_status == degenerate"),
                      ("c", "needs_review", "approve_if does not hold: caption_clip_score >= 25")]
    assert decided.column("review_by").to_pylist()[0] == "review.approve_if"
    assert decided.column("review_by").to_pylist()[3] == "review.reject_if"
    assert decided.column("review_at").to_pylist()[0] == AT
    # the edge: 25.0 passes `>= 25`
    edge = gated.set_column(gated.schema.get_field_index("caption_clip_score"), "caption_clip_score",
                            pa.array([30.0, 0, 0, 40.0, 0, 25.0, 20.0]))
    assert rows(decide(edge, SelectSettings(by="caption_clip_score"), review, AT))[5][3:5] == (True, "approved")
    nothing = decide(gated, SelectSettings(by="caption_clip_score"), ReviewSettings(), AT)
    assert {r[4] for r in rows(nothing) if r[3]} == {"needs_review"}


def test_no_select_or_review_section_approves_every_candidate_that_succeeded():
    decided = decide(table(), SelectSettings(), None, AT)
    assert [r[3:5] for r in rows(decided)] == [(True, "approved")] * 4 + [(False, "alternate")] + [(True, "approved")] * 2
    assert set(decided.column("review_by").to_pylist()) == {"default", "select"}
    assert decided.column("review_at").null_count == 7


def test_the_storefront_configs_ship_gates_and_renditions_for_approved_rows():
    for name in ("products.yaml", "photos.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.review is not None and cfg.review.approve_if and cfg.review.reject_if, name
        assert cfg.renditions.only == "approved", name
    assert load_config(None).renditions.only == "all" and load_config(None).review is None


# --- a run: gates, decisions, renditions for approved rows, status, export ---------------------------


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory) -> tuple[Path, Path]:
    """Two products, two candidates each; the higher variant chosen; no gate approves: both need review."""
    folder = tmp_path_factory.mktemp("gated")
    catalog = write_catalog(folder / "catalog.parquet", prompts(2, "p"))
    config = folder / "run.yaml"
    config.write_text(json.dumps({
        "num_variants": 2, "stages": ["generate", "renditions"],
        "select": {"by": "variant"}, "review": {"approve_if": ["generate_steps >= 50"], "reject_if": []},
        "renditions": {"only": "approved", "items": [{"name": "thumb", "size": 16, "format": "png"}]},
    }))
    out = folder / "out"
    result = invoke("run", str(catalog), "--config", str(config), "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert f"2 row(s) need review: catalogen review {out}" in result.output
    return catalog, out


def results(out: Path) -> dict[tuple[str, int], dict]:
    return {(r["id"], r["variant"]): r for r in pq.read_table(out / "results.parquet").to_pylist()}


def parts(out: Path, stage: str) -> list[Path]:
    return sorted((out / "stages" / stage).glob("part-*.parquet"))


def test_a_run_leaves_unapproved_rows_for_review_and_makes_no_renditions_for_them(gated_run):
    _, out = gated_run
    found = results(out)
    assert {k: (r["selected"], r["review_state"]) for k, r in found.items()} == {
        ("p-0", 0): (False, "alternate"), ("p-0", 1): (True, "needs_review"),
        ("p-1", 0): (False, "alternate"), ("p-1", 1): (True, "needs_review")}
    assert {(r["renditions_status"], r["renditions_error"]) for r in found.values()} == {("skipped", NOT_APPROVED)}
    assert all(r["status"] == "ok" and r.get("renditions_thumb_path") is None for r in found.values())
    status = invoke("status", str(out))
    assert status.exit_code == 0
    assert f"review: 0 approved, 0 rejected, 2 needs review, 2 alternate; decide: catalogen review {out}" in status.output


def test_an_approval_makes_just_its_renditions_on_the_next_run_and_export_keeps_approved_rows(gated_run, tmp_path):
    catalog, out = gated_run
    store = RunStore(out)
    chosen = results(out)[("p-0", 1)]
    record(store, Decision(id="p-0", decision="approve", variant=1, key=chosen["image_sha256"], reviewer="ana", at=now()))
    generate_parts = parts(out, "generate")
    result = invoke("run", str(catalog), "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert parts(out, "generate") == generate_parts  # nothing upstream recomputed
    made = [pq.read_table(p) for p in parts(out, "renditions")]
    newest = max(made, key=lambda t: max(t.column("finished_at").to_pylist()))
    assert newest.select(["id", "variant", "status"]).to_pylist() == [{"id": "p-0", "variant": 1, "status": "ok"}]
    found = results(out)
    assert (out / found[("p-0", 1)]["renditions_thumb_path"]).is_file()
    assert found[("p-1", 1)]["renditions_error"] == NOT_APPROVED

    status = invoke("status", str(out))
    assert "review: 1 approved, 0 rejected, 1 needs review, 2 alternate" in status.output
    exported = invoke("export", str(out), "--format", "imagefolder", "--out", str(tmp_path / "approved"), "--approved")
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((tmp_path / "approved" / "manifest.json").read_text())
    assert manifest["rows"] == 1 and manifest["options"]["review"] == "approved"
    assert manifest["excluded"]["not approved: alternate: ana chose variant 1"] == 1
    assert manifest["excluded"]["not approved: needs_review: approve_if does not hold: generate_steps >= 50"] == 1
    assert manifest["excluded"]["not approved: alternate: not chosen: another candidate ranks higher"] == 1
    selected = invoke("export", str(out), "--format", "imagefolder", "--out", str(tmp_path / "selected"), "--selected")
    assert json.loads((tmp_path / "selected" / "manifest.json").read_text())["rows"] == 2, selected.output
    both = invoke("export", str(out), "--format", "hf", "--out", str(tmp_path / "x"), "--approved", "--selected")
    assert both.exit_code == 2 and not (tmp_path / "x").exists()


def test_the_flows_final_state_and_artifact_say_how_many_rows_need_review(gated_run):
    """A run that leaves rows for review ends Completed; its message and artifact give the exact command."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.run import artifact_key, catalogen_run

    catalog, out = gated_run
    waiting = sum(r["review_state"] == "needs_review" for r in current(RunStore(out)).to_pylist())
    state = catalogen_run(catalog=str(catalog), out=str(out), return_state=True)
    assert state.is_completed() and waiting >= 1
    assert state.message.endswith(f"; {waiting} row(s) need review: catalogen review {out}"), state.message
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(out)])),
                                      sort=ArtifactSort.UPDATED_DESC, limit=1)
    assert f"{waiting} needs review" in found[0].data and f"catalogen review {out}" in found[0].data


def test_a_change_of_by_reranks_without_running_a_stage(gated_run):
    catalog, out = gated_run
    before = {stage: parts(out, stage) for stage in ("generate", "renditions")}
    result = invoke("run", str(catalog), "--out", str(out), *TINY, "--set", "select.by=0 - variant")
    assert result.exit_code == 0, result.output
    assert {stage: parts(out, stage) for stage in before} == before
    found = results(out)
    assert [found[("p-1", v)]["selected"] for v in (0, 1)] == [True, False]


def test_regenerate_rejected_remakes_only_that_row_as_a_new_variant_with_the_note(gated_run):
    catalog, out = gated_run
    store = RunStore(out)
    old = results(out)
    record(store, Decision(id="p-1", decision="regenerate", variant=1, key=old[("p-1", 1)]["image_sha256"],
                           reviewer="ana", at=now(), note="on a marble table"))
    before = parts(out, "generate")
    result = invoke("run", str(catalog), "--out", str(out), *TINY, "--regenerate-rejected")
    assert result.exit_code == 0, result.output
    new = [p for p in parts(out, "generate") if p not in before]
    assert len(new) == 1 and pq.read_table(new[0]).select(["id", "variant"]).to_pylist() == [{"id": "p-1", "variant": 2}]
    found = results(out)
    assert set(found) == set(old) | {("p-1", 2)}
    assert all(found[k]["image_sha256"] == old[k]["image_sha256"] for k in old)  # nothing overwritten
    remade = found[("p-1", 2)]
    assert remade["generate_prompt"] == f"{old[('p-1', 1)]['generate_prompt']}, on a marble table"
    assert remade["generate_seed"] not in {found[("p-1", v)]["generate_seed"] for v in (0, 1)}
    now_ = {(r["id"], r["variant"]): r for r in current(store).to_pylist()}
    assert (now_[("p-1", 1)]["review_state"], now_[("p-1", 1)]["review_reason"]) == ("rejected", "regenerate: on a marble table")
    assert now_[("p-1", 2)]["review_state"] in ("needs_review", "alternate")  # judged on its own, not by the old decision
    history = json.loads(next((out / "review" / "regenerated").glob("*.json")).read_text())
    assert history == {"id": "p-1", "variant": 2, "from_variant": 1, "note": "on a marble table",
                       "decision": history["decision"]}
    again = invoke("run", str(catalog), "--out", str(out), *TINY, "--regenerate-rejected")  # recorded once
    assert again.exit_code == 0 and set(results(out)) == set(found)
    assert set(parts(out, "generate")) == set(before) | set(new)
