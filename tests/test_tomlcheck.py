"""Tests for dispatch.tomlcheck: every problem names its file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dispatch.tomlcheck import ConfigWarning, Node, child_key, load_toml, root
from gateway.errors import ConfigError


def test_quoted_keys_for_kodes_and_indexes_for_arrays() -> None:
    assert child_key("", "people") == "people"
    assert child_key("routing", "35.77.01.1001") == 'routing."35.77.01.1001"'
    items = Node("f.toml", "people", [{"id": "a"}]).items()
    assert items[0].key == "people[0]"
    assert items[0].table({"id"})["id"].key == "people[0].id"


def test_unknown_and_missing_keys_are_errors() -> None:
    top = root("f.toml", {"levels": [], "wiat_s": 3})
    with pytest.raises(ConfigError) as near:
        top.table({"levels", "wait_s"})
    assert str(near.value) == "f.toml: wiat_s: unknown key (did you mean 'wait_s'?)"
    with pytest.raises(ConfigError) as far:
        root("f.toml", {"zzzz": 1}).table({"levels", "wait_s"})
    assert str(far.value) == "f.toml: zzzz: unknown key (expected one of: levels, wait_s)"
    with pytest.raises(ConfigError, match=r"^f.toml: wait_s: missing$"):
        root("f.toml", {}).table({"wait_s"}, required={"wait_s"})


def test_booleans_are_not_integers_and_ranges_are_enforced() -> None:
    with pytest.raises(ConfigError, match="expected an integer"):
        Node("f.toml", "wait_s", True).integer(0, 10)
    with pytest.raises(ConfigError, match="between 0 and 10, got 11"):
        Node("f.toml", "wait_s", 11).integer(0, 10)
    assert Node("f.toml", "wait_s", 10).integer(0, 10) == 10


def test_texts_reject_duplicates_and_pattern_mismatches() -> None:
    with pytest.raises(ConfigError, match=r"^f.toml: ids\[1\]: duplicate entry 'a'$"):
        Node("f.toml", "ids", ["a", "a"]).texts()
    with pytest.raises(ConfigError, match="not lowercase: 'A'"):
        Node("f.toml", "id", "A").text(re.compile("[a-z]+"), "not lowercase")
    with pytest.raises(ConfigError, match="must not be empty"):
        Node("f.toml", "id", " ").text()


def test_warning_reads_like_an_error_line() -> None:
    assert str(ConfigWarning("r.toml", "rosters[0]", "gap")) == "r.toml: rosters[0]: gap"


def test_a_problem_with_the_whole_file_names_no_key_placeholder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_toml(tmp_path / "absent.toml")
    assert str(caught.value) == f"{tmp_path / 'absent.toml'}: file not found"
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: not valid TOML: "):
        load_toml(bad)
    # A value at the document root has no key either.
    with pytest.raises(ConfigError) as at_root:
        Node("f.toml", "", 3).table({"a"})
    assert str(at_root.value) == "f.toml: expected a table"
