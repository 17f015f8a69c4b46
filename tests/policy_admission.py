"""What the API server does with a ValidatingAdmissionPolicy whose binding selects every param:
matchConditions, then, once per param, the variables and every validation; a failing validation's
messageExpression is the denial. Evaluated with cel-python like tests/crd_admission.py.

cel-python lacks Kubernetes' CEL extension libraries; the one function the policy uses is added here
with its documented behaviour (the strings library of cel-go's ext package, which Kubernetes enables):
`<list<string>>.join() -> string` and `<list<string>>.join(<string>) -> string`. Any evaluation error
raises: with failurePolicy Fail the API server would refuse every job, so a test should see it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import celpy
from celpy import celtypes

_env = celpy.Environment()


def _join(items: celtypes.ListType, sep: celtypes.StringType | None = None) -> celtypes.StringType:
    if not all(isinstance(i, celtypes.StringType) for i in items):
        raise TypeError("join needs a list of strings")
    return celtypes.StringType(("" if sep is None else str(sep)).join(str(i) for i in items))


@cache
def _program(expression: str) -> Any:
    return _env.program(_env.compile(expression), functions={"join": _join})


def evaluate(expression: str, activation: dict[str, Any]) -> Any:
    result = _program(expression).evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def denials(
    policy: dict[str, Any],
    obj: dict[str, Any],
    params: list[dict[str, Any]],
    old: dict[str, Any] | None = None,
) -> list[str]:
    """The messages of every failing validation, per param in order (the API server's response names the
    first); [] when the request is admitted."""
    spec = policy["spec"]
    request = {"operation": "UPDATE" if old is not None else "CREATE"}
    base = {"object": obj, "oldObject": old, "request": request}
    activation = {k: celpy.json_to_cel(v) for k, v in base.items()}
    if not all(evaluate(c["expression"], activation) for c in spec.get("matchConditions", [])):
        return []
    out = []
    for param in params:  # none: parameterNotFoundAction Allow admits
        act = {**activation, "params": celpy.json_to_cel(param)}
        variables: dict[celtypes.StringType, Any] = {}
        act["variables"] = celtypes.MapType(variables)
        for var in spec.get("variables", []):
            variables[celtypes.StringType(var["name"])] = evaluate(var["expression"], act)
            act["variables"] = celtypes.MapType(variables)
        for validation in spec["validations"]:
            if not evaluate(validation["expression"], act):
                out.append(str(evaluate(validation["messageExpression"], act)))
    return out
