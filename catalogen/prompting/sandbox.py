"""The bounded sandbox templates render in: how a template sees a row, and what one row's rendering may use.

Jinja2's immutable sandbox (autoescape off) refuses attribute escapes such as `{{ ''.__class__ }}`;
this adds bounds on resources (see "limits" below): a row may make at most MAX_MADE_CHARS
characters, render at most MAX_RENDERED_CHARS, compute integers up to MAX_INT_BITS and take
TIME_BUDGET_S. `namespace()` is not available: its attributes could grow across loop turns
unchecked. The presets, the choice of template per row, the checks and the clean-up of what
renders are prompting/templates.py's, which uses this module (never the other way round).
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from string import Formatter
from typing import Any, Callable, Iterable, Iterator, Sequence

from jinja2 import StrictUndefined, Template, filters, nodes, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROW = "row"  # the name a template reads the whole row by


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
