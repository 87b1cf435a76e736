"""Prompt templates: product fields (title, colour, material, brand...) into positive and negative prompts.

E-commerce catalogs have no prompt column. A run's `template:` settings turn each row into a
prompt with Jinja2, before any model loads and without Prefect, so every stage that needs a
prompt can share it. Example configuration:

    template:
      preset: product-photo          # or write your own with `prompt:` / `negative_prompt:`
      by_category:
        footwear:
          prompt: "side view of {{ title }}, {{ row.color }}, on a white background"

How a template sees a row
-------------------------
- Every catalog column is a variable (`{{ title }}`), and `row` holds the whole row as a mapping,
  for names that are not identifiers (`row['product name']`) and for optional columns.
- Struct and map columns are mappings (`attributes.color`, `attributes['size']`); lists render
  comma-joined.
- Missing values (null, NaN), also inside structs, maps and lists, arrive as "" so that `~`,
  string filters and `{% if color %}` all treat them as empty. (Jinja2 stringifies `None` as
  "None" in `~` and filters, where no `finalize` hook can reach it.) Test for them with
  `{% if color %}` and give a fallback with `color or 'neutral'`, not `is none`. A map key that
  a row lacks, read as `attributes.get('size')`, is None: it prints as nothing, but write
  `attributes.get('size', '')` to use it with `~` or a filter.
- Floats that hold whole numbers render without ".0", because pandas turns an integer column
  with gaps into floats (a size of 38 would otherwise read "38.0").

Required and optional columns
-----------------------------
A column named directly (`{{ color }}`) is required: a catalog without it is refused before any
row renders, and an undefined name raises (`StrictUndefined`), so a typo is never silently empty.
A column read through `row` (`row.color`, `row['color']`, `row.get('color')`) is optional: a
catalog may lack it, and it then reads as "". The shipped presets read everything but the
product's `title` through `row`: "product-photo" requires only `title`, so a catalog of ids and
titles is valid for it; "dataset" requires nothing and uses `prompt`, else the product fields.
We chose this over exempting the presets' names in the static check: the rule shows in the
template itself and works the same for a user's own templates. (`row.x` finds a dict method
first for x in items, keys, values, get...; write `row['items']` for such columns. A catalog
column named `row` is reachable only as `row['row']`.) Inside struct and map values a missing key
raises, as a typo would (`attributes.size`); read keys that some rows lack with `.get`.

Output clean-up
---------------
Rendered text is normalised: whitespace runs (newlines included) become one space, empty
comma-separated items vanish (", ," and leading or trailing commas), and no space stays before a
comma or inside brackets, so `(word:1.3)` weights and decimals such as `1.5` come through intact.

Templates run in Jinja2's immutable sandbox with autoescape off: `{{ ''.__class__ }}` is refused.
The sandbox (prompting/sandbox.py) is also bounded: a row may make at most MAX_MADE_CHARS
characters, render at most MAX_RENDERED_CHARS, compute integers up to MAX_INT_BITS and take
TIME_BUDGET_S; past any of them the row is a fault like any template that cannot render.
`namespace()` is not available: its attributes could grow across loop turns unchecked.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import pyarrow as pa
from jinja2 import Template, TemplateSyntaxError, meta, nodes
from pydantic import BaseModel, ConfigDict, model_validator

from catalogen.catalog import CatalogError, Fault
from catalogen.prompting.sandbox import (  # the bounded sandbox, and how a template sees a row
    ROW,
    TemplateTimeError,
    _BoundedSandbox,
    _Row,
    _bound_ast,
    _clean,
    _environment,
    _render_bounded,
)


class TemplateOverride(BaseModel):
    """Templates that replace the base ones for one category (or that a preset ships)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    negative_prompt: str | None = None


PRODUCT_PHOTO = TemplateOverride(
    prompt=(
        "professional e-commerce studio product photo of {{ title }}"
        "{% if row.brand %} by {{ row.brand }}{% endif %}, "
        "{% if row.color %}{{ row.color }} color{% endif %}, "
        "{% if row.material %}made of {{ row.material }}{% endif %}, "
        "{{ row.description }}, "
        "single product centered on a clean seamless white background, soft even studio lighting, "
        "soft natural shadow, sharp focus, high detail, true-to-life colors, commercial catalog photography"
    ),
    negative_prompt=(
        "blurry, out of focus, low quality, low resolution, jpeg artifacts, noise, grainy, "
        "overexposed, underexposed, text, watermark, signature, garbled text, distorted logo, "
        "extra objects, clutter, busy background, multiple products, duplicate, cropped, out of frame, "
        "deformed, warped, disfigured, bad proportions, hands, people"
    ),
)

# For training sets: a neutral caption with a light quality suffix. It takes the row's own
# `prompt` (catalogs built from prompt lists) and, where a row has none, a short caption from its
# product fields, so it suits both kinds of catalog. Every column is optional (read via `row`); a row
# with neither a prompt nor a title renders empty, which `template_faults` reports by row id.
DATASET = TemplateOverride(
    prompt=(
        "{% if row.prompt %}{{ row.prompt }}, high quality, detailed"
        "{% elif row.title %}{{ row.title }}{% if row.brand %} by {{ row.brand }}{% endif %}, "
        "{{ row.color }}, {{ row.material }}, high quality, detailed"
        "{% endif %}"
    ),
    negative_prompt="low quality, worst quality, blurry, jpeg artifacts, watermark, text, signature",
)

PRESETS: dict[str, TemplateOverride] = {"product-photo": PRODUCT_PHOTO, "dataset": DATASET}


class TemplateSettings(BaseModel):
    """The `template:` section of a run configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["product-photo", "dataset"] | None = None
    prompt: str | None = None  # Jinja2 source; replaces the preset's prompt
    negative_prompt: str | None = None  # Jinja2 source; replaces the preset's negative prompt
    category_column: str = "category"
    by_category: dict[str, TemplateOverride] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "TemplateSettings":
        if self.is_set() and not self._has_prompt_template():
            raise ValueError(
                "a template needs a prompt: set template.prompt (e.g. '{{ prompt }}'), "
                "template.preset, or a prompt under template.by_category"
            )
        seen: dict[str, str] = {}
        for key in self.by_category:
            folded = key.strip().casefold()
            if folded in seen:
                raise ValueError(
                    f"template.by_category has '{seen[folded]}' and '{key}', which match the same "
                    "categories (matching ignores case); keep one"
                )
            seen[folded] = key
        return self

    def is_set(self) -> bool:
        """Whether any template is configured; if not, rows bring their own prompts."""
        own = self.prompt is not None or self.negative_prompt is not None
        return bool(self.preset or own or self.by_category)

    def _has_prompt_template(self) -> bool:
        if self.preset or self.prompt is not None:
            return True
        return any(override.prompt is not None for override in self.by_category.values())


# --- which template a row uses ------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    name: str  # where the template came from, as messages name it
    text: str


@dataclass(frozen=True)
class _Choice:
    """The pair of templates a row renders with; None where none applies."""

    prompt: _Source | None
    negative: _Source | None


def _base_choice(settings: TemplateSettings) -> _Choice:
    preset = _Choice(None, None)
    if settings.preset:
        shipped = PRESETS[settings.preset]
        name = f"(preset '{settings.preset}')"
        preset = _Choice(
            _source_or(f"template.prompt {name}", shipped.prompt, None),
            _source_or(f"template.negative_prompt {name}", shipped.negative_prompt, None),
        )
    return _Choice(
        _source_or("template.prompt", settings.prompt, preset.prompt),
        _source_or("template.negative_prompt", settings.negative_prompt, preset.negative),
    )


def _category_choices(settings: TemplateSettings, base: _Choice) -> dict[str, _Choice]:
    choices = {}
    for key, override in settings.by_category.items():
        prefix = f"template.by_category.{key}"
        choices[key] = _Choice(
            _source_or(f"{prefix}.prompt", override.prompt, base.prompt),
            _source_or(f"{prefix}.negative_prompt", override.negative_prompt, base.negative),
        )
    return choices


def _source_or(name: str, text: str | None, fallback: _Source | None) -> _Source | None:
    """The template `text` under `name` if it is set, else the one it replaces."""
    return _Source(name, text) if text is not None else fallback


class _Chooser:
    """Picks a row's templates from its category: exact match, then ignoring case and surrounding spaces."""

    def __init__(self, settings: TemplateSettings):
        self.base = _base_choice(settings)
        self.by_key = _category_choices(settings, self.base)
        self.by_folded = {key.strip().casefold(): choice for key, choice in self.by_key.items()}

    def choose(self, category: Any) -> _Choice:
        if category is None or category == "":
            return self.base
        key = str(category)
        if key in self.by_key:
            return self.by_key[key]
        return self.by_folded.get(key.strip().casefold(), self.base)

    def sources(self) -> list[_Source]:
        """Every distinct template, base first, each once."""
        found: dict[str, _Source] = {}
        for choice in [self.base, *self.by_key.values()]:
            for source in (choice.prompt, choice.negative):
                if source is not None:
                    found.setdefault(source.name, source)
        return list(found.values())


_REPEATED_COMMAS = re.compile(r",(?: ?,)+")  # commas with nothing but a space between
_AFTER_OPEN = re.compile(r"([(\[])[ ,]+")
_BEFORE_CLOSE = re.compile(r"[ ,]+([)\]]|:[\d.]+[)\]])")  # also before an A1111 weight: "(red, :1.2)"


def normalize_prompt(text: str) -> str:
    """Tidy a rendered prompt: one space between words, no empty comma-separated items.

    >>> normalize_prompt(" photo of  mug, , sand ,  ( glossy:1.2) ,")
    'photo of mug, sand, (glossy:1.2)'
    """
    text = " ".join(text.split()).replace(" ,", ",")
    if ",," in text or ", ," in text:
        text = _REPEATED_COMMAS.sub(",", text)
    if "(" in text or "[" in text:
        text = _AFTER_OPEN.sub(r"\1", text)
        text = _BEFORE_CLOSE.sub(r"\1", text)
    return text.strip(" ,")


# --- checks before rendering --------------------------------------------------------------------


def _dunder_faults(ast: nodes.Template, source: _Source) -> list[Fault]:
    """`x.__class__` and the like, refused up front rather than by the sandbox mid-run."""
    faults = []
    for node in ast.find_all(nodes.Getattr):
        if node.attr.startswith("__"):
            where = f"{source.name}: line {node.lineno}"
            faults.append(Fault(f"{where}: attribute '{node.attr}' is not allowed in a sandboxed template"))
    return faults


def _optional_columns(ast: nodes.Template) -> set[str] | None:
    """Columns read through `row` by a constant name (`row.x`, `row['x']`, `row.get('x')`).

    None when `row` is used any other way (`row[name]`, `row.items()`, `{{ row }}`): then every
    column may be read. Knowing the columns spares converting ones no template reads (images, vectors).
    """
    names: set[str] = set()
    accounted: set[int] = set()  # ids of the `row` Name nodes explained by a constant lookup
    for node in ast.find_all((nodes.Call, nodes.Getattr, nodes.Getitem)):
        name = _constant_lookup(node)
        if name is not None:
            names.add(name)
            accounted.add(id(_lookup_target(node)))
    for node in ast.find_all(nodes.Name):
        if node.name == ROW and id(node) not in accounted:
            return None
    return names


def _lookup_target(node: nodes.Node) -> nodes.Node:
    return node.node.node if isinstance(node, nodes.Call) else node.node


def _constant_lookup(node: nodes.Node) -> str | None:
    """The column a node reads from `row` by a constant name, if it is such a read."""
    if isinstance(node, nodes.Call):
        call = node.node
        if (
            isinstance(call, nodes.Getattr)
            and call.attr == "get"
            and _is_row(call.node)
            and node.args
            and isinstance(node.args[0], nodes.Const)
        ):
            return str(node.args[0].value)
        return None
    if not _is_row(node.node):
        return None
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return str(node.arg.value)
    if isinstance(node, nodes.Getattr) and not hasattr(dict, node.attr):
        return node.attr
    return None


def _is_row(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == ROW


def _missing_column_fault(source: _Source, name: str, columns: Sequence[str]) -> Fault:
    close = difflib.get_close_matches(name, list(columns), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return Fault(f"{source.name} uses it, but the catalog has no such column{hint}", name)


@dataclass
class _Prepared:
    """A compiled template; one that reads no variable renders once and is reused."""

    name: str
    template: Template
    constant: bool
    columns: set[str] | None  # the columns it reads; None: it may read any
    text: str | None = None
    timed_out: TemplateTimeError | None = None  # once a row ran out of time, later rows are not tried

    def render(self, row: _Row) -> str:
        if self.text is not None:
            return self.text
        if self.timed_out is not None:
            raise self.timed_out
        try:
            text = normalize_prompt(_render_bounded(self.template, row))
        except TemplateTimeError as exc:
            self.timed_out = exc
            raise
        if self.constant:
            self.text = text
        return text


def _prepare(
    env: _BoundedSandbox, source: _Source, columns: Sequence[str]
) -> tuple[_Prepared | None, list[Fault]]:
    """Compile one template and check the columns it names; None if it cannot compile."""
    try:
        ast = env.parse(source.text)
        template = env.from_string(_bound_ast(ast))  # also finds unknown filters and tests
    except TemplateSyntaxError as exc:
        return None, [Fault(f"{source.name} does not compile: line {exc.lineno}: {exc.message}")]
    names = meta.find_undeclared_variables(ast)
    required = names - {ROW} - set(env.globals)
    faults = [_missing_column_fault(source, name, columns) for name in sorted(required - set(columns))]
    faults += _dunder_faults(ast, source)
    read = _optional_columns(ast)
    if read is not None:
        read |= required
    return _Prepared(source.name, template, constant=not names, columns=read), faults


@dataclass
class _Compiled:
    chooser: _Chooser
    templates: dict[str, _Prepared]  # by source name
    category_column: str

    def columns_read(self, available: Sequence[str]) -> list[str]:
        """The catalog columns any template (or the choice of template) reads, in catalog order."""
        wanted = {self.category_column}
        for prepared in self.templates.values():
            if prepared.columns is None:
                return list(available)
            wanted |= prepared.columns
        return [name for name in available if name in wanted]


def _compile(settings: TemplateSettings, columns: Sequence[str]) -> tuple[_Compiled, list[Fault]]:
    env = _environment()
    chooser = _Chooser(settings)
    templates: dict[str, _Prepared] = {}
    faults: list[Fault] = []
    for source in chooser.sources():
        prepared, source_faults = _prepare(env, source, columns)
        faults += source_faults
        if prepared is not None:
            templates[source.name] = prepared
    if settings.by_category and settings.category_column not in columns:
        faults.append(
            Fault(
                "template.by_category is set but the catalog has no such column "
                "(set template.category_column to the column holding categories)",
                settings.category_column,
            )
        )
    return _Compiled(chooser, templates, settings.category_column), faults


# --- rendering ----------------------------------------------------------------------------------


def _row_ids(rows: pa.Table) -> list[str]:
    if "id" not in rows.column_names:
        return [f"#{i}" for i in range(rows.num_rows)]
    return [f"#{i}" if rid is None else str(rid) for i, rid in enumerate(rows.column("id").to_pylist())]


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    return [_clean(value) for value in column.to_pylist(maps_as_pydicts="lossy")]


def _row_fields(rows: pa.Table, names: list[str]) -> list[_Row]:
    if not names:
        return [_Row() for _ in range(rows.num_rows)]
    columns = [_column_values(rows.column(name)) for name in names]
    return [_Row(zip(names, values)) for values in zip(*columns)]


def _render_row(compiled: _Compiled, choice: _Choice, fields: _Row, category: Any) -> tuple[str, str | None]:
    """Render one row's prompts; raises `_RowFault` with the reason it cannot."""
    if choice.prompt is None:
        which = f"category '{category}' has" if category != "" else "rows without a category have"
        raise _RowFault(
            f"no prompt template applies: {which} no prompt under template.by_category, "
            "and there is no template.prompt or template.preset"
        )
    sources = [choice.prompt] if choice.negative is None else [choice.prompt, choice.negative]
    texts = []
    for source in sources:
        try:
            texts.append(compiled.templates[source.name].render(fields))
        except Exception as exc:  # a user's template can raise anything: report it with the row
            raise _RowFault(f"{source.name} cannot render: {exc}") from exc
    if not texts[0]:
        raise _RowFault(f"{choice.prompt.name} renders an empty prompt")
    return texts[0], texts[1] if len(texts) > 1 else None


class _RowFault(Exception):
    """Why one row cannot render; collected, never shown as a traceback."""


def _render(
    compiled: _Compiled, settings: TemplateSettings, rows: pa.Table
) -> tuple[list[str], list[str | None], list[Fault]]:
    faults: dict[str, list[str]] = {}  # message -> row ids, in the order first seen
    positives: list[str] = []
    negatives: list[str | None] = []
    fields_by_row = _row_fields(rows, compiled.columns_read(rows.column_names))
    for row_id, fields in zip(_row_ids(rows), fields_by_row):
        category = fields.get(settings.category_column)
        choice = compiled.chooser.choose(category)
        try:
            positive, negative = _render_row(compiled, choice, fields, category)
        except _RowFault as fault:
            faults.setdefault(str(fault), []).append(row_id)
            positive, negative = "", None
        positives.append(positive)
        negatives.append(negative)
    return positives, negatives, [Fault(message, rows=tuple(ids)) for message, ids in faults.items()]


# --- public API ---------------------------------------------------------------------------------


def template_faults(
    settings: TemplateSettings, columns: Sequence[str], rows: pa.Table | None = None
) -> list[Fault]:
    """Every problem with the run's templates, found before any model loads.

    First the static checks: each template compiles and names only columns in `columns`, and
    `by_category` has its category column. If those pass and `rows` is given, every row is
    rendered once: rows whose rendering raises, or whose prompt comes out empty, are listed by id.
    """
    if not settings.is_set():
        return []
    compiled, faults = _compile(settings, columns)
    if faults or rows is None:
        return faults
    return _render(compiled, settings, rows)[2]


def render_prompts(settings: TemplateSettings, rows: pa.Table) -> tuple[list[str], list[str | None]]:
    """Positive and negative prompt for each row, in row order.

    A negative prompt is None where no negative template applies to the row (the run's default
    then holds). Raises CatalogError listing every fault `template_faults` would report.

    >>> table = pa.table({"id": ["MUG-001"], "title": ["Stoneware Mug"], "color": [None]})
    >>> render_prompts(TemplateSettings(prompt="{{ title }}, {{ color }}, studio photo"), table)
    (['Stoneware Mug, studio photo'], [None])
    """
    if not settings.is_set():
        raise ValueError("no template is configured: set template.preset, template.prompt or by_category")
    compiled, faults = _compile(settings, rows.column_names)
    if not faults:
        positives, negatives, faults = _render(compiled, settings, rows)
    if faults:
        raise CatalogError("template", faults)
    return positives, negatives
