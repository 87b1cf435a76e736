"""The two small languages that choose rows, shared by `export --where`, `select:` and `review:`.

A rule is `COLUMN<op>VALUE` with <op> one of >= <= == != > <, the value read in the column's type
(numbers, true/false, text, ISO times); `== null` / `!= null` ask whether the column has a value.
A row for which a rule cannot be decided (a null value) does not pass it.

A score (`select.by`) is a number, a numeric column, or `+ - * /` and parentheses over them, e.g.
`score_aesthetic + 0.05 * score_clip`. It is parsed by Python's `ast` and then every node checked
against an allow-list: nothing is ever evaluated as Python, so a call, an attribute, a subscript
or `__import__` is refused with a line that names it. Both are checked against the columns a run
will have (`check_rule`, `check_by`) before any work, and evaluated over a whole table at once
with pyarrow.compute (`rule_mask`, `by_score`).
"""

from __future__ import annotations

import ast
import difflib
import re
from datetime import datetime, timezone
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

OPERATORS = {">=": pc.greater_equal, "<=": pc.less_equal, "==": pc.equal, "!=": pc.not_equal,
             ">": pc.greater, "<": pc.less}
PATTERN = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|!=|>|<)\s*(.*?)\s*$")
NULL = "null"
_ARITHMETIC = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply, ast.Div: pc.divide}
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.UAdd, ast.Constant, ast.Name, ast.Load,
            *_ARITHMETIC)


class RuleError(ValueError):
    """A rule or score that cannot be used; the message names the setting and the column."""


# --- rules: COLUMN<op>VALUE ------------------------------------------------------------------------


def parse_rule(clause: str, setting: str = "--where") -> tuple[str, str, str]:
    """`caption_clip_score>=25` -> ("caption_clip_score", ">=", "25"); the syntax alone, no column check."""
    match = PATTERN.match(str(clause))
    if not match:
        raise RuleError(f"{setting} {clause!r} is not COLUMN<op>VALUE with <op> one of {', '.join(OPERATORS)}, "
                        "e.g. caption_clip_score>=25")
    column, op, text = match.groups()
    return column, op, text


def _is_null(text: str) -> bool:
    return text.lower() == NULL


def rule_value(text: str, column: str, typ: pa.DataType, clause: str, setting: str = "--where") -> pa.Scalar:
    """The rule's value as a scalar comparable with the column."""
    head = f"{setting} {clause!r}: column {column}"
    if pa.types.is_integer(typ) and re.fullmatch(r"[+-]?\d+", text):
        return pa.scalar(int(text), pa.int64())  # exact, also beyond 2**53 (seeds)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        try:
            return pa.scalar(float(text), pa.float64())
        except ValueError:
            raise RuleError(f"{head} holds numbers ({typ}); {text!r} is not one") from None
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return pa.scalar(text, pa.string())
    if pa.types.is_boolean(typ):
        if text.lower() not in ("true", "false"):
            raise RuleError(f"{head} holds true/false; {text!r} is neither")
        return pa.scalar(text.lower() == "true")
    if pa.types.is_timestamp(typ) or pa.types.is_date(typ):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise RuleError(f"{head} holds times; {text!r} is not an ISO date/time") from None
        if pa.types.is_timestamp(typ) and typ.tz and moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return pa.scalar(moment if pa.types.is_timestamp(typ) else moment.date(), typ)
    raise RuleError(f"{head} holds {typ}, which rules cannot compare")


def _unknown(setting: str, clause: str, column: str, columns: Mapping[str, pa.DataType], source: str) -> RuleError:
    close = difflib.get_close_matches(column, list(columns), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; its columns: {', '.join(columns)}"
    return RuleError(f"{setting} {clause!r}: {source} has no column {column!r}{hint}")


def check_rule(clause: str, columns: Mapping[str, pa.DataType], setting: str = "--where",
               source: str = "results.parquet") -> tuple[str, str, pa.Scalar | None]:
    """(column, operator, value; None for `== null`) or a RuleError naming the setting and column."""
    column, op, text = parse_rule(clause, setting)
    if column not in columns:
        raise _unknown(setting, clause, column, columns, source)
    if _is_null(text):
        if op not in ("==", "!="):
            raise RuleError(f"{setting} {clause!r}: null is compared with == or != only")
        return column, op, None
    return column, op, rule_value(text, column, columns[column], clause, setting)


def rule_mask(table: pa.Table, clause: str, setting: str = "--where", source: str = "results.parquet") -> pa.Array:
    """The rows for which one rule holds (a null never does, except for `== null`)."""
    types = {f.name: f.type for f in table.schema}
    column, op, scalar = check_rule(clause, types, setting, source)
    values = table.column(column)
    if scalar is None:
        return (pc.is_null(values) if op == "==" else pc.is_valid(values)).combine_chunks()
    if scalar.type == pa.float64() and not pa.types.is_floating(values.type):
        values = pc.cast(values, pa.float64(), safe=False)  # an integer column against 2.5
    return pc.fill_null(OPERATORS[op](values, scalar), False).combine_chunks()


# --- scores: numbers, columns, + - * / -------------------------------------------------------------


def _node_text(node: ast.AST, text: str) -> str:
    return ast.get_source_segment(text, node) or type(node).__name__


def parse_by(text: str, setting: str = "select.by") -> ast.Expression:
    """The score's syntax tree, every node on the allow-list; a RuleError naming what is not."""
    try:
        tree = ast.parse(str(text).strip(), mode="eval")
    except SyntaxError:
        raise RuleError(f"{setting} {text!r} is not a column, a number or + - * / of them, e.g. "
                        "score_aesthetic + 0.05 * score_clip") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            raise RuleError(f"{setting} {text!r}: {_node_text(node.func, text)}(…) is a function call; only columns, "
                            "numbers, + - * / and parentheses are allowed")
        if isinstance(node, ast.Attribute):
            raise RuleError(f"{setting} {text!r}: {_node_text(node, text)} is an attribute; only columns, numbers, "
                            "+ - * / and parentheses are allowed")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise RuleError(f"{setting} {text!r}: {node.value!r} is not a number")
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            raise RuleError(f"{setting} {text!r}: {node.id} is not a column")
        if not isinstance(node, _ALLOWED):
            raise RuleError(f"{setting} {text!r}: {_node_text(node, text)} is not allowed; only columns, numbers, "
                            "+ - * / and parentheses")
    return tree


def by_columns(tree: ast.Expression) -> list[str]:
    """The columns a score reads, in order of appearance."""
    return list(dict.fromkeys(n.id for n in ast.walk(tree) if isinstance(n, ast.Name)))


def is_numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)


def check_by(text: str, columns: Mapping[str, pa.DataType], setting: str = "select.by",
             source: str = "the run's results") -> ast.Expression:
    """The parsed score, or a RuleError naming the setting and the first unknown or non-numeric column."""
    tree = parse_by(text, setting)
    for column in by_columns(tree):
        if column not in columns:
            raise _unknown(setting, text, column, columns, source)
        if not is_numeric(columns[column]):
            kind = "text" if pa.types.is_string(columns[column]) else str(columns[column])
            raise RuleError(f"{setting} {text!r}: column {column} holds {kind}, not numbers")
    return tree


def by_score(table: pa.Table, tree: ast.Expression) -> pa.Array:
    """The score of every row as float64 (null where a column it reads is null), all rows at once."""
    def value(node: ast.AST) -> pa.Array | pa.Scalar:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant):
            return pa.scalar(float(node.value))
        if isinstance(node, ast.Name):
            return pc.cast(table.column(node.id), pa.float64(), safe=False).combine_chunks()  # seeds beyond 2**53
        if isinstance(node, ast.UnaryOp):
            inner = value(node.operand)
            return pc.negate(inner) if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp):
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        raise RuleError(f"cannot evaluate {type(node).__name__}")  # parse_by let nothing else through

    result = value(tree)
    if isinstance(result, pa.Scalar):  # a constant score: every row the same
        return pa.array([result.as_py()] * table.num_rows, pa.float64())
    return result
