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
The sandbox is also bounded (see "limits" below): a row may make at most MAX_MADE_CHARS
characters, render at most MAX_RENDERED_CHARS, compute integers up to MAX_INT_BITS and take
TIME_BUDGET_S; past any of them the row is a fault like any template that cannot render.
`namespace()` is not available: its attributes could grow across loop turns unchecked.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import threading
import time
from dataclasses import dataclass
from string import Formatter
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import pyarrow as pa
from jinja2 import StrictUndefined, Template, TemplateSyntaxError, filters, meta, nodes, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, model_validator

from catalogen.catalog import CatalogError, Fault

ROW = "row"  # the name a template reads the whole row by


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


# --- values in, text out ------------------------------------------------------------------------


class _Row(dict):
    """The whole row as `row`: a column the catalog lacks reads as "", which makes it optional.

    Struct and map values stay plain dicts, so a mistyped key there raises with a readable message.
    """

    def __missing__(self, key: Any) -> str:
        return ""

    def get(self, key: Any, default: Any = "") -> Any:
        return super().get(key, default)


def _clean(value: Any) -> Any:
    """Missing values become "", inside structs, maps and lists too."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def _as_text(value: Any) -> Any:
    """Jinja2's `finalize` hook: how a value prints in `{{ ... }}`."""
    if value is None:
        return ""
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, dict):
        return _join(f"{key}: {text}" for key, text in _texts(value.items()))
    if isinstance(value, (list, tuple)):
        return _join(text for _, text in _texts(enumerate(value)))
    return value


def _float_text(value: float) -> str:
    if math.isnan(value):
        return ""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _texts(pairs: Iterable[tuple[Any, Any]]) -> Iterable[tuple[Any, str]]:
    """(key, text) for each value that prints as something."""
    for key, value in pairs:
        text = str(_as_text(value))
        if text.strip():
            yield key, text


def _join(parts: Iterable[str]) -> str:
    return ", ".join(parts)


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


# --- limits: what one row's rendering may use ---------------------------------------------------
#
# The sandbox stops attribute escapes but not resource use: `'a' * 10**9`, `2 ** 9999999999`,
# `|center(10**9)`, `'{0:>999999999}'.format(x)` and nested loops would each take the process's
# memory or time. Every operation that can make a value larger than its inputs first reserves
# what it would make from the row's allowance, integers stay within MAX_INT_BITS, each row has a
# time budget, and the rendered text is cut off past MAX_RENDERED_CHARS. Going past any of them
# is the row's fault, reported like any other template that cannot render.

MAX_MADE_CHARS = 1_000_000  # characters (or list items) a template may make while rendering one row
MAX_RENDERED_CHARS = 20_000  # the longest prompt a template may render
MAX_INT_BITS = 4096  # the largest integer arithmetic may make (about 1,230 digits)
TIME_BUDGET_S = 2.0  # per template and row

# "%-20s", "%(name)08.3f", "%*d": the widths and precisions of printf-style fields.
_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


class TemplateLimitError(SecurityError):
    """A template went past one of the limits above while rendering a row."""


class TemplateTimeError(TemplateLimitError):
    """A template ran past its time budget on a row."""


class _Allowance:
    """What one render may still make, and when its time is up."""

    def __init__(self, seconds: float | None = None):
        self.left = MAX_MADE_CHARS
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def spend(self, size: int, what: str) -> None:
        if size > self.left:
            raise TemplateLimitError(
                f"{what} would make more than the {MAX_MADE_CHARS:,} characters (or list items) a row may make"
            )
        self.left -= size

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TemplateTimeError(f"it ran for over {TIME_BUDGET_S:g} s on one row (the limit)")


_active = threading.local()  # `allowance`: the render in progress in this thread


def _allowance() -> _Allowance:
    """The current render's allowance; outside a render (constant folding) a fresh one per check."""
    return getattr(_active, "allowance", None) or _Allowance()


def _spend(size: int, what: str) -> None:
    allowance = _allowance()
    allowance.check_time()
    allowance.spend(size, what)


def _check_time() -> None:
    _allowance().check_time()


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


def _check_power(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        bits = right * abs(left).bit_length()
        if bits > MAX_INT_BITS:
            raise TemplateLimitError(f"'**' would make a number of over {MAX_INT_BITS} bits (the limit)")


def _check_product(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        bits = abs(left).bit_length() + abs(right).bit_length()
        if bits > MAX_INT_BITS:
            raise TemplateLimitError(f"'*' would make a number of over {MAX_INT_BITS} bits (the limit)")
    elif isinstance(left, int) or isinstance(right, int):
        count, sequence = (left, right) if isinstance(left, int) else (right, left)
        _spend(_length(sequence) * max(count, 0), "'*'")


def _format_size(text: str, fields: int, widths: Sequence[int], args: Sequence[Any]) -> int:
    """An upper bound of a formatted string's length: the text, each field at its widest, every width."""
    widest = max((len(str(arg)) for arg in args), default=0)
    return len(text) + fields * widest + sum(widths)


def _printf_size(text: str, args: Any) -> int:
    """How long `text % args` can get; a width taken from the arguments (`%*d`) is refused."""
    fields = _PRINTF_FIELD.findall(text)
    if any("*" in (width, precision) for width, precision in fields):
        raise TemplateLimitError("'%' with a width from the arguments ('%*') is not allowed in a template")
    widths = [int(number) for field in fields for number in field if number]
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    return _format_size(text, len(fields), widths, values)


def _str_format_size(text: str, args: Sequence[Any]) -> int:
    """How long `text.format(*args)` can get; a width taken from the arguments (`{:{w}}`) is refused."""
    fields, widths = 0, []
    for _, name, spec, _ in Formatter().parse(text):
        if name is None:
            continue
        if spec and "{" in spec:
            raise TemplateLimitError("a format width from the arguments ('{:{w}}') is not allowed in a template")
        fields += 1
        widths += [int(number) for number in _DIGITS.findall(spec or "")]
    return _format_size(text, fields, widths, args)


def _replaced_size(text: str, old: str, new: str, count: int | None) -> int:
    found = text.count(old)
    if count is not None and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def _joinable(items: Iterable[Any], separator: str, what: str) -> list[str]:
    """The items as text, reserving their length (and the separators') as each one arrives."""
    texts = []
    for item in items:
        text = str(item)
        _spend(len(text) + (len(separator) if texts else 0), what)
        texts.append(text)
    return texts


def _check_str_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Reserve what a string method would make; `join` gets its items as a list it may consume once."""
    target = getattr(method, "__wrapped__", method)  # the sandbox wraps str.format
    text = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if not isinstance(text, str):
        return args
    what = f"str.{name}"
    if name in _PADDING_METHODS and args and isinstance(args[0], int):
        _spend(max(args[0], len(text)), what)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        _spend(len(text) + text.count("\t") * max(int(size), 0), what)
    elif name == "replace" and len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count")
        _spend(_replaced_size(text, str(args[0]), str(args[1]), count), what)
    elif name == "join" and args:
        return (_joinable(args[0], text, what), *args[1:])
    elif name in ("format", "format_map"):
        values = list(args) + list(kwargs.values())
        if name == "format_map" and args and isinstance(args[0], dict):
            values = list(args[0].values())
        _spend(_str_format_size(text, values), what)
    return args


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with arithmetic, calls and growth checked against the row's allowance.

    `*`, `**`, `+` and `%` are intercepted, which also keeps Jinja2 from folding them while it
    compiles (where `2 ** 9999999999` would hang before any row renders).
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            _check_product(left, right)
        elif operator == "+":
            _spend(_length(left) + _length(right), "'+'")
        elif operator == "%" and isinstance(left, str):
            _spend(_printf_size(left, right), "'%'")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_time()
        args = _check_str_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


# Filters that can make more than they are given, each reserving it first.


def _bounded_center(value: Any, width: int = 80) -> str:
    _spend(max(int(width), len(str(value))), "center")
    return filters.do_center(value, width)


def _bounded_indent(text: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(text)
    per_line = width if isinstance(width, int) else len(str(width))
    _spend(len(text) + (text.count("\n") + 1) * max(per_line, 0), "indent")
    return filters.do_indent(text, width, first, blank)


@pass_eval_context
def _bounded_join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    if attribute is not None:
        value = map(filters.make_attrgetter(eval_ctx.environment, attribute), value)
    return str(d).join(_joinable(value, str(d), "join"))


@pass_eval_context
def _bounded_replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    _spend(_replaced_size(str(s), str(old), str(new), count), "replace")
    return filters.do_replace(eval_ctx, s, old, new, count)


def _bounded_format(value: Any, *args: Any, **kwargs: Any) -> str:
    _spend(_printf_size(str(value), kwargs or args), "format")
    return filters.do_format(value, *args, **kwargs)


def _bounded_batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterable[list[Any]]:
    _spend(int(linecount), "batch")
    return filters.do_batch(value, linecount, fill_with)


def _bounded_slice(value: Iterable[Any], slices: int, fill_with: Any = None) -> Iterable[list[Any]]:
    _spend(int(slices), "slice")
    return filters.sync_do_slice(value, slices, fill_with)


_GROWING_FILTERS = {
    "center": _bounded_center, "indent": _bounded_indent, "join": _bounded_join, "replace": _bounded_replace,
    "format": _bounded_format, "batch": _bounded_batch, "slice": _bounded_slice,
}
# Filters the compiled template calls for every loop and every `~`: names no template can write.
_LOOP_FILTER = "catalogen loop"
_CONCAT_FILTER = "catalogen concat"


def _timed_loop(items: Iterable[Any]) -> Iterator[Any]:
    """A `{% for %}` loop's items, checking the row's time budget at each."""
    for item in items:
        _check_time()
        yield item


def _concat(parts: Sequence[Any]) -> str:
    """`a ~ b`, reserving the joined length first."""
    return "".join(_joinable(parts, "", "'~'"))


def _timed(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that checks the row's time budget before each call (keeps Jinja2's pass_* marks)."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        return function(*args, **kwargs)

    return timed


def _bound_ast(ast: nodes.Template) -> nodes.Template:
    """Route every loop's items and every `~` through the filters that check the row's budget."""
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
    for concat in list(ast.find_all(nodes.Concat)):
        parts = nodes.Tuple(concat.nodes, "load", lineno=concat.lineno)
        concat.nodes = [nodes.Filter(parts, _CONCAT_FILTER, [], [], None, None, lineno=concat.lineno)]
    return ast


def _render_bounded(template: Template, row: _Row) -> str:
    """Render within the row's allowance and time budget; output past MAX_RENDERED_CHARS is refused."""
    _active.allowance = _Allowance(TIME_BUDGET_S)
    try:
        chunks, size = [], 0
        for chunk in template.generate(row, **{ROW: row}):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise TemplateLimitError(f"it renders over {MAX_RENDERED_CHARS:,} characters (the limit)")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _active.allowance = None


def _environment() -> _BoundedSandbox:
    """The bounded sandbox, without Jinja2's two sources of chance, so a row's prompt depends on the row only.

    `optimized=False`: no constant folding while compiling, so a template's cost is paid (and
    limited) only while a row renders.
    """
    env = _BoundedSandbox(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, finalize=_as_text,
        optimized=False,
    )
    del env.filters["random"]
    del env.globals["lipsum"]
    del env.globals["namespace"]  # a namespace's attributes grow across loop turns, past every check
    env.filters = {name: _timed(function) for name, function in {**env.filters, **_GROWING_FILTERS}.items()}
    env.filters[_LOOP_FILTER] = _timed_loop
    env.filters[_CONCAT_FILTER] = _concat
    return env


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
