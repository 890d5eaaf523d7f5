"""Field mappings: which value of which field of a decoded payload means which press kind.

A LoRaWAN network server's codec (ChirpStack's ``object``, The Things Stack's
``decoded_payload``) reports a button the way its vendor wrote it: ``{"sos": true}``,
``{"button": "single"}``, ``{"alarm": 1}``. A mapping names the field and the values that
mean each kind, as data in the config, so a city needs no codec of its own:

    format_options = { mapping = [ { field = "sos", panic = [true] },
                                   { field = "button", panic = ["single"], cancel = ["double"] } ] }

Rules are tried in order; the first whose field holds one of its values decides. A field
may be a dotted path into nested objects (``"status.sos"``). Values match by type:
booleans only booleans (``true`` is not ``1``), numbers numerically, strings without
regard to case. A payload that no rule (and no ``event`` name) maps is not a press, and
the message becomes a dead letter saying which fields were read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.errors import DecodeError
from gateway.formats._common import OptionError, as_str
from gateway.model import PressKind

KINDS = tuple(kind.value for kind in PressKind)
_MAX_RULES = 32


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One field and the values of it that mean each press kind."""

    field: str
    values: tuple[tuple[bool | int | float | str, PressKind], ...]

    def kind_for(self, value: object) -> PressKind | None:
        """The kind the field's ``value`` means, or None."""
        for wanted, kind in self.values:
            if _same(value, wanted):
                return kind
        return None


# Out of the box, with nothing configured: a codec's {"sos": true} is a panic.
DEFAULT_RULES: tuple[FieldRule, ...] = (
    FieldRule("sos", ((True, PressKind.PANIC),)),
)


def rules_option(options: Mapping[str, object], key: str = "mapping") -> tuple[FieldRule, ...]:
    """The configured rules (tried before :data:`DEFAULT_RULES`); OptionError when malformed."""
    raw = options.get(key)
    if raw is None:
        return DEFAULT_RULES
    tables: Sequence[object]
    if isinstance(raw, Mapping):
        tables = [raw]
    elif isinstance(raw, list | tuple):
        tables = raw
    else:
        raise OptionError(f"option {key!r} must be a table or a list of tables "
                          "like { field = \"sos\", panic = [true] }")
    if not tables or len(tables) > _MAX_RULES:
        raise OptionError(f"option {key!r} must hold 1 to {_MAX_RULES} rules")
    return tuple(_rule(key, index, table) for index, table in enumerate(tables)) + DEFAULT_RULES


def _rule(key: str, index: int, table: object) -> FieldRule:
    where = f"option {key!r} rule {index + 1}"
    if not isinstance(table, Mapping):
        raise OptionError(f"{where} must be a table like {{ field = \"sos\", panic = [true] }}")
    unknown = sorted(set(table) - {"field", *KINDS})
    if unknown:
        raise OptionError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                          f"(field and {', '.join(KINDS)})")
    name = table.get("field")
    if not isinstance(name, str) or not name or any(not part for part in name.split(".")):
        raise OptionError(f"{where}: field must be a field name (or a dotted path)")
    values: list[tuple[bool | int | float | str, PressKind]] = []
    for kind in PressKind:
        listed = table.get(kind.value)
        if listed is None:
            continue
        if not isinstance(listed, list | tuple) or not listed:
            raise OptionError(f"{where}: {kind.value} must be a non-empty list of values")
        for value in listed:
            if not isinstance(value, bool | int | float | str):
                raise OptionError(f"{where}: {kind.value} value {value!r} is not a boolean, "
                                  "number or string")
            taken = [k for v, k in values if _same(value, v)]
            if taken:
                raise OptionError(f"{where}: value {value!r} means both {taken[0].value} "
                                  f"and {kind.value}")
            values.append((value, kind))
    if not values:
        raise OptionError(f"{where}: names no value for any of {', '.join(KINDS)}")
    return FieldRule(name, tuple(values))


def press_kind(
    doc: Mapping[str, object], events: Mapping[str, PressKind], rules: Sequence[FieldRule],
    what: str,
) -> PressKind:
    """The kind of a decoded payload (``what`` names it in errors): its ``event`` name if
    it has one, else the first rule that maps it; DecodeError when neither does."""
    name = as_str(doc.get("event"))
    if name is not None:
        kind = events.get(name.casefold())
        if kind is None:
            raise DecodeError("unknown_event", name[:64])
        return kind
    mapped, read = kind_by_rules(doc, rules)
    if mapped is None:
        fields = ("event", *dict.fromkeys(rule.field for rule in rules))
        raise DecodeError("no_event", f"{what} has no event; {read}", fields=fields)
    return mapped


def kind_by_rules(
    doc: Mapping[str, object], rules: Sequence[FieldRule]
) -> tuple[PressKind | None, str]:
    """The kind the first matching rule gives, and what was read (for a dead letter)."""
    read: list[str] = []
    for rule in rules:
        present, value = _lookup(doc, rule.field)
        if not present:
            continue
        kind = rule.kind_for(value)
        if kind is not None:
            return kind, rule.field
        read.append(f"{rule.field}={value!r}"[:80])
    if read:
        return None, "no mapping matched: " + ", ".join(read)
    fields = ", ".join(sorted({rule.field for rule in rules}))
    return None, f"none of the mapped fields ({fields}) is present"


def _lookup(doc: Mapping[str, object], path: str) -> tuple[bool, object]:
    value: object = doc
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _same(value: object, wanted: object) -> bool:
    if isinstance(wanted, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value is wanted
    if isinstance(wanted, int | float):
        return isinstance(value, int | float) and value == wanted
    if isinstance(wanted, str):
        return isinstance(value, str) and value.casefold() == wanted.casefold()
    return False
