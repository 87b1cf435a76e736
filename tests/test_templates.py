"""Prompt templates: product fields into clean prompts, with every template fault found before rendering."""

from __future__ import annotations

import itertools
import math
import re
import typing
from pathlib import Path

import pandas
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from catalogen.catalog import CatalogError
from catalogen.prompting.templates import (
    PRESETS,
    TemplateOverride,
    TemplateSettings,
    normalize_prompt,
    render_prompts,
    template_faults,
)

DEMO = Path(__file__).resolve().parents[1] / "catalogs" / "demo_products.parquet"

# What a clean prompt never contains: leaked missing values, empty items, stray separators.
UNCLEAN = re.compile(r"None|\bnan\b|,\s*,|,,|\s{2}|^[\s,]|[\s,]$|\s,")


def assert_clean(text: str) -> None:
    assert not UNCLEAN.search(text), f"unclean prompt: {text!r}"


def faults_text(settings: TemplateSettings, table: pa.Table, with_rows: bool = True) -> str:
    faults = template_faults(settings, table.column_names, table if with_rows else None)
    return "\n".join(str(f) for f in faults)


def products(**columns: list) -> pa.Table:
    """A catalog with ids P0, P1...; NaN in a column of text becomes null, as from pandas."""
    ids = [f"P{i}" for i in range(len(next(iter(columns.values()))))]
    arrays = {name: pa.array(values, from_pandas=True) for name, values in columns.items()}
    return pa.table({"id": ids, **arrays})


# --- normalisation ------------------------------------------------------------------------------

NORMALISED = {
    " photo of  mug ": "photo of mug",
    "mug, , sand,, stoneware": "mug, sand, stoneware",
    ", mug, sand ,": "mug, sand",
    "mug ,sand": "mug,sand",
    "mug\n\nin the\tstudio": "mug in the studio",
    "mug, , ,\n, sand": "mug, sand",
    "1.5 l teapot, 1,000 pieces": "1.5 l teapot, 1,000 pieces",
    "(glossy:1.3), [matte], ((sharp))": "(glossy:1.3), [matte], ((sharp))",
    "( , sand, :1.2), [ stoneware, ]": "(sand:1.2), [stoneware]",
    "a photo, , (red:1.1) ": "a photo, (red:1.1)",
    "": "",
    " , , ": "",
}


@pytest.mark.parametrize("raw", NORMALISED)
def test_normalize_prompt(raw):
    assert normalize_prompt(raw) == NORMALISED[raw]


# --- missing values -----------------------------------------------------------------------------

MISSING = [None, float("nan"), "", "   "]


def test_missing_values_never_leak_into_prompts():
    """Every combination of present and missing fields renders without None, nan or empty items."""
    fields = ["color", "material", "brand", "description"]
    present = {"color": "sand", "material": "stoneware", "brand": "Northfold", "description": "Hand-glazed mug"}
    combos = list(itertools.product([True, False], repeat=len(fields)))
    rows: dict[str, list] = {name: [] for name in fields}
    for number, combo in enumerate(combos):
        for name, has in zip(fields, combo):
            rows[name].append(present[name] if has else MISSING[number % len(MISSING)])
    table = products(title=["Stoneware Mug"] * len(combos), **rows)
    # A NaN in a string column reaches Arrow as null (pandas does the same); NaN stays NaN in floats.
    table = table.append_column("size", pa.array([float("nan"), 38.0] * (len(combos) // 2), pa.float64()))
    template = (
        "{{ title }}, {{ color }} {{ material }}, by {{ brand }}, {{ description }}, size {{ size }},\n"
        "{{ color ~ ' ' ~ material }}, {{ brand | upper }}, {{ description | title }}, {{ [color, material] }}, "
        "{{ 'EU ' ~ size }}"
    )
    settings = [TemplateSettings(prompt=template, negative_prompt="{{ color }}, blurry")]
    settings += [TemplateSettings(preset=name) for name in PRESETS]
    for setting in settings:
        positives, negatives = render_prompts(setting, table)
        for text in positives + negatives:
            assert_clean(text)
    positives, _ = render_prompts(settings[0], table)
    assert positives[0].startswith("Stoneware Mug, sand stoneware, by Northfold, Hand-glazed mug, size")
    assert "size 38," in positives[1]  # whole floats (pandas' ints with gaps) lose their ".0"


def test_pandas_nan_renders_as_nothing():
    frame = pandas.DataFrame(
        {"id": ["a", "b"], "title": ["Mug", "Lamp"], "color": ["sand", math.nan], "weight": [math.nan, 1.5]}
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    positives, _ = render_prompts(TemplateSettings(prompt="{{ title }}, {{ color }}, {{ weight }} kg"), table)
    assert positives == ["Mug, sand, kg", "Lamp, 1.5 kg"]


def test_missing_values_are_falsy_and_take_fallbacks():
    table = products(title=["Mug", "Lamp"], color=[None, "brass"])
    template = "{{ title }}{% if color %} in {{ color }}{% endif %}, {{ color or 'neutral' }} tone"
    positives, _ = render_prompts(TemplateSettings(prompt=template), table)
    assert positives == ["Mug, neutral tone", "Lamp in brass, brass tone"]


# --- faults before rendering --------------------------------------------------------------------


def test_missing_column_is_a_fault_naming_column_and_template():
    table = products(title=["Mug"], color=["sand"])
    settings = TemplateSettings(
        prompt="{{ title }}, {{ colour }}",
        by_category={"footwear": TemplateOverride(negative_prompt="{{ sole }}")},
    )
    faults = template_faults(settings, table.column_names)
    by_column = {f.column: str(f) for f in faults}
    assert set(by_column) == {"colour", "sole", "category"}
    assert "template.prompt" in by_column["colour"] and "did you mean 'color'" in by_column["colour"]
    assert "template.by_category.footwear.negative_prompt" in by_column["sole"]
    assert "template.by_category" in by_column["category"]


def test_a_fault_stops_rendering_before_any_row():
    table = products(title=["Mug"], price=["cheap"])
    settings = TemplateSettings(prompt="{{ title }} {{ price + 1 }} {{ nope }}")
    faults = template_faults(settings, table.column_names, table)
    assert [f.column for f in faults] == ["nope"]  # the bad row is not rendered yet
    with pytest.raises(CatalogError, match="nope"):
        render_prompts(settings, table)


def test_syntax_error_is_a_fault_with_its_line():
    table = products(title=["Mug"])
    settings = TemplateSettings(prompt="{{ title }}\n{% if title %}studio photo\n{{ title }")
    text = faults_text(settings, table)
    assert "template.prompt does not compile: line 3" in text


def test_unknown_filter_is_a_fault_with_its_line():
    text = faults_text(TemplateSettings(prompt="{{ title }},\n{{ title | titel }}"), products(title=["Mug"]))
    assert "line 2" in text and "titel" in text


def test_preset_template_is_named_in_faults():
    text = faults_text(TemplateSettings(preset="product-photo"), pa.table({"id": ["a"], "name": ["Mug"]}))
    assert "template.prompt (preset 'product-photo')" in text and "column 'title'" in text


def test_undefined_names_are_errors_never_empty():
    table = products(title=["Mug", "Lamp"], attributes=[{"size": "M"}, {"size": None}])
    text = faults_text(TemplateSettings(prompt="{{ title }} {{ attributes.colour }}"), table)
    assert "has no attribute 'colour'" in text and "P0" in text and "P1" in text


def test_rows_that_fail_to_render_are_faults_with_their_ids():
    table = products(title=["Mug", "Lamp", "Vase"], weight=[1.25, None, 2.0])
    settings = TemplateSettings(prompt="{{ title }}, {{ weight | round(1) }} kg")
    faults = template_faults(settings, table.column_names, table)
    assert len(faults) == 1
    assert "template.prompt cannot render" in faults[0].message
    assert faults[0].rows == ("P1",)  # a missing number is "", which `round` refuses


def test_empty_prompts_are_faults_with_their_ids():
    table = products(title=["Mug", None, " "])
    faults = template_faults(TemplateSettings(prompt="{{ title }}"), table.column_names, table)
    assert [(f.message, f.rows) for f in faults] == [("template.prompt renders an empty prompt", ("P1", "P2"))]
    with pytest.raises(CatalogError, match="empty prompt"):
        render_prompts(TemplateSettings(prompt="{{ title }}"), table)


def test_faults_from_many_rows_are_grouped():
    table = products(title=["Mug"] * 7, size=[1, 2, 3, 4, 5, 6, 7])
    faults = template_faults(TemplateSettings(prompt="{{ title }}{{ size | join }}"), table.column_names, table)
    assert len(faults) == 1 and len(faults[0].rows) == 7
    assert "and 2 more" in str(faults[0])


# --- sandbox ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ title.__class__.__mro__ }}",
        "{{ ''['__class__'] }}",
        "{{ title['__class__']['__base__'] }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ row.clear() }}{{ title }}",
        "{{ row.update({'title': 'x'}) }}{{ title }}",
    ],
)
def test_sandbox_refuses_unsafe_access(template):
    table = products(title=["Mug"])
    settings = TemplateSettings(prompt=template)
    faults = template_faults(settings, table.column_names, table)
    assert faults, "the sandbox let it through"
    with pytest.raises(CatalogError) as info:
        render_prompts(settings, table)
    assert "<class" not in str(info.value)


def test_templates_are_deterministic():
    text = faults_text(TemplateSettings(prompt="{{ title }} {{ ['a', 'b'] | random }}"), products(title=["Mug"]))
    assert "random" in text
    table = products(title=["Mug"] * 50)
    first, _ = render_prompts(TemplateSettings(preset="product-photo"), table)
    assert len(set(first)) == 1 and first == render_prompts(TemplateSettings(preset="product-photo"), table)[0]


def test_autoescape_is_off():
    positives, _ = render_prompts(TemplateSettings(prompt="{{ title }}"), products(title=["Salt & Pepper <Set>"]))
    assert positives == ["Salt & Pepper <Set>"]


# --- structs, maps, lists -----------------------------------------------------------------------


def test_struct_map_and_list_values():
    attributes = pa.array(
        [{"color": "sand", "size": "M"}, {"color": None, "size": "L"}],
        pa.struct([("color", pa.string()), ("size", pa.string())]),
    )
    extra = pa.array([[("finish", "matte")], []], pa.map_(pa.string(), pa.string()))
    tags = pa.array([["handmade", None, "ceramic"], None], pa.list_(pa.string()))
    table = products(title=["Mug", "Lamp"]).append_column("attributes", attributes)
    table = table.append_column("extra", extra).append_column("tags", tags)
    template = (
        "{{ title }}, {{ attributes.color }}, size {{ attributes['size'] }}, "
        "{{ extra.get('finish') }} finish, {{ tags }}, ({{ attributes }})"
    )
    positives, _ = render_prompts(TemplateSettings(prompt=template), table)
    assert positives == [
        "Mug, sand, size M, matte finish, handmade, ceramic, (color: sand, size: M)",
        "Lamp, size L, finish, (size: L)",
    ]


def test_row_mapping_reads_optional_and_odd_columns():
    table = pa.table({"id": ["a"], "title": ["Mug"], "product name": ["Stoneware Mug"], "items": ["2"]})
    template = "{{ row['product name'] }}, {{ row.colour }}, {{ row.get('brand') }}, {{ row['items'] }} pieces"
    assert template_faults(TemplateSettings(prompt=template), table.column_names) == []
    positives, _ = render_prompts(TemplateSettings(prompt=template), table)
    assert positives == ["Stoneware Mug, 2 pieces"]


def test_row_mapping_can_be_iterated():
    table = products(title=["Mug"], color=[None], material=["oak"])
    template = "{% for name, value in row.items() if name != 'id' %}{{ name }}={{ value }}, {% endfor %}"
    positives, _ = render_prompts(TemplateSettings(prompt=template), table)
    assert positives == ["title=Mug, color=, material=oak"]


# --- per-category overrides ---------------------------------------------------------------------


def test_category_override_picks_the_right_template():
    table = products(
        title=["Runner", "Boot", "Mug", "Lamp", "Scarf"],
        category=["footwear", "FOOTWEAR ", "kitchen", None, "Apparel"],
    )
    settings = TemplateSettings(
        prompt="photo of {{ title }}",
        negative_prompt="blurry",
        by_category={
            "footwear": TemplateOverride(prompt="side view of {{ title }}"),
            "kitchen": TemplateOverride(negative_prompt="clutter, {{ title }}"),
            "apparel": TemplateOverride(prompt="{{ title }} on a mannequin", negative_prompt="wrinkles"),
        },
    )
    positives, negatives = render_prompts(settings, table)
    assert positives == ["side view of Runner", "side view of Boot", "photo of Mug", "photo of Lamp", "Scarf on a mannequin"]
    assert negatives == ["blurry", "blurry", "clutter, Mug", "blurry", "wrinkles"]


def test_categories_differing_only_in_case_are_refused():
    with pytest.raises(ValidationError, match="ignores case"):
        TemplateSettings(prompt="x", by_category={"Shoes": TemplateOverride(), "shoes": TemplateOverride()})


def test_category_override_over_a_preset():
    table = products(title=["Runner", "Mug"], category=["footwear", "kitchen"], type=["shoe", "mug"])
    settings = TemplateSettings(
        preset="product-photo",
        category_column="type",
        by_category={"shoe": TemplateOverride(prompt="side view of {{ title }}, white background")},
    )
    positives, negatives = render_prompts(settings, table)
    assert positives[0] == "side view of Runner, white background"
    assert positives[1].startswith("professional e-commerce studio product photo of Mug")
    assert negatives[0] == negatives[1] == normalize_prompt(PRESETS["product-photo"].negative_prompt)


def test_categories_without_any_prompt_template_are_faults():
    table = products(title=["Runner", "Mug", "Vase"], category=["footwear", "kitchen", None])
    settings = TemplateSettings(by_category={"footwear": TemplateOverride(prompt="{{ title }}")})
    faults = template_faults(settings, table.column_names, table)
    assert [(f.rows, "'kitchen'" in f.message) for f in faults] == [(("P1",), True), (("P2",), False)]


def test_no_negative_template_gives_none():
    positives, negatives = render_prompts(TemplateSettings(prompt="{{ title }}"), products(title=["Mug"]))
    assert (positives, negatives) == (["Mug"], [None])


# --- presets ------------------------------------------------------------------------------------


def test_presets_match_the_settings_choices():
    choices = typing.get_args(typing.get_args(TemplateSettings.model_fields["preset"].annotation)[0])
    assert set(choices) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_render_the_demo_catalog_cleanly(preset):
    table = pq.read_table(DEMO)
    settings = TemplateSettings(preset=preset)
    assert template_faults(settings, table.column_names, table) == []
    positives, negatives = render_prompts(settings, table)
    assert len(positives) == len(negatives) == table.num_rows == 12
    for row, positive, negative in zip(table.to_pylist(), positives, negatives):
        assert_clean(positive)
        assert_clean(negative)
        for field in ("title", "color", "material", "brand"):
            assert row[field] in positive, f"{preset}: {field} {row[field]!r} missing from {positive!r}"
        assert "watermark" in negative


def test_product_photo_preset_needs_only_titles():
    table = products(title=["Stoneware Mug", "Oak Chair"], color=[None, "natural"])
    positives, _ = render_prompts(TemplateSettings(preset="product-photo"), table)
    assert positives[0].startswith("professional e-commerce studio product photo of Stoneware Mug, single product")
    assert "Oak Chair, natural color, single product" in positives[1]


def test_dataset_preset_uses_the_prompt_column():
    table = products(prompt=["a red fox in snow", None], title=[None, "Oak Chair"])
    positives, negatives = render_prompts(TemplateSettings(preset="dataset"), table)
    assert positives == ["a red fox in snow, high quality, detailed", "Oak Chair, high quality, detailed"]
    assert negatives[0].startswith("low quality")


def test_preset_parts_can_be_replaced():
    settings = TemplateSettings(preset="product-photo", negative_prompt="blurry, {{ title }} duplicate")
    positives, negatives = render_prompts(settings, products(title=["Mug"]))
    assert "photo of Mug" in positives[0] and negatives == ["blurry, Mug duplicate"]


# --- settings -----------------------------------------------------------------------------------


def test_settings_from_yaml():
    text = """
template:
  preset: product-photo
  negative_prompt: "blurry, text, watermark, {{ row.color }} tint"
  category_column: category
  by_category:
    footwear:
      prompt: "side view of {{ title }}, {{ row.color }}, on a white background"
    apparel:
      prompt: "{{ title }} on an invisible mannequin, {{ row.material }}"
"""
    settings = TemplateSettings(**yaml.safe_load(text)["template"])
    assert settings.is_set() and settings.by_category["footwear"].prompt.startswith("side view")
    table = pq.read_table(DEMO)
    positives, negatives = render_prompts(settings, table)
    shoe = table.column("category").to_pylist().index("footwear")
    assert positives[shoe] == "side view of Trail Running Shoe, blue, on a white background"
    assert negatives[shoe] == "blurry, text, watermark, blue tint"


def test_settings_are_strict():
    assert not TemplateSettings().is_set()
    assert template_faults(TemplateSettings(), ["id"]) == []
    with pytest.raises(ValidationError):
        TemplateSettings(promt="{{ title }}")
    with pytest.raises(ValidationError):
        TemplateSettings(preset="studio")
    with pytest.raises(ValidationError, match="needs a prompt"):
        TemplateSettings(negative_prompt="blurry")
    with pytest.raises(ValueError, match="no template"):
        render_prompts(TemplateSettings(), products(title=["Mug"]))
