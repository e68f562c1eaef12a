"""The built-in `calculator` tool: arithmetic on a parsed expression tree, never `eval`.

The expression is parsed by Python's `ast` (mode "eval") and the tree is walked here: numbers
(int and float literals), `+ - * / // % **`, unary minus and plus, and parentheses (which the
parser folds into the tree). Anything else (names, calls, attributes, strings, comparisons,
subscripts, bit operations) is refused. Integers are exact (Python's big integers); a division
`/` gives a float. What could cost unbounded time or memory is refused before it is computed:
an integer power whose result would have more than MAX_BITS bits (`9**9**9` is refused at once,
from the operands' sizes: bits(a**b) ~ b * log2|a|), and any intermediate integer above MAX_BITS.
Errors (a division by zero, a float overflow, a refused node) come back as the tool's error text.
"""
from __future__ import annotations

import ast
import math
import operator

MAX_BITS = 4096           # largest integer result: ~1233 decimal digits
MAX_EXPRESSION_CHARS = 1000


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot compute."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _power(a: int | float, b: int | float) -> int | float:
    if isinstance(a, int) and isinstance(b, int):
        if b < 0:
            if a == 0:
                raise CalculatorError("0 cannot be raised to a negative power")
            return a ** b  # a float, |result| <= 1
        if abs(a) > 1 and b * math.log2(abs(a)) > MAX_BITS:  # b may be huge: estimate from the operands
            raise CalculatorError(f"the result of {a} ** {b} would have more than {MAX_BITS} bits")
        return a ** b
    try:
        result = float(a) ** float(b)
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    if isinstance(result, complex):
        raise CalculatorError("a negative number to a fractional power is not a real number")
    return result


def _walk(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            result = _power(a, b)
        else:
            try:
                result = _BINARY[type(node.op)](a, b)
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            except OverflowError:
                raise CalculatorError("the result is too large") from None
        if isinstance(result, int) and result.bit_length() > MAX_BITS:
            raise CalculatorError(f"an intermediate result has more than {MAX_BITS} bits")
        if isinstance(result, float) and not math.isfinite(result):
            raise CalculatorError("the result is not a finite number")
        return result
    what = type(node).__name__
    if isinstance(node, ast.Constant):
        what = f"a {type(node.value).__name__} constant"
    raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed (found {what})")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression (module docstring); CalculatorError otherwise."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression has more than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"cannot parse the expression: {type(e).__name__}") from None
    try:
        return _walk(tree)
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses.

    Args:
        expression: The expression, e.g. "(1234 * 5678) - 9 ** 3".
    """
    value = evaluate(expression)
    return repr(value) if isinstance(value, float) else str(value)
