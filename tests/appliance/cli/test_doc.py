"""The README's generated tables (schemas, guest codes) agree with their sources, and the check bites."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from appliance import schemas
from appliance.cli import doc
from appliance.guest import codes

README = Path(__file__).resolve().parents[3] / "README.md"


def block(text: str, name: str) -> str:
    match = doc._block(name).search(text)
    assert match, name
    return match.group(2)


def test_readme_tables_are_what_the_schemas_and_the_guest_codes_generate() -> None:
    stale = doc.stale(README.read_text(encoding="utf-8"))
    assert not stale, f"README.md is out of date in {stale}: run .venv/bin/python -m appliance.cli.doc"


def test_each_block_holds_its_table() -> None:
    text = README.read_text(encoding="utf-8")
    assert block(text, "guest-codes") == codes.markdown_table() + "\n"
    assert "| `scratch.quota` | size | `50GiB` |" in block(text, "config")
    assert "| `controller.mode` | one of `push`, `pull` | `push` |" in block(text, "userdata")
    assert "| `instance_id` | string | *required* |" in block(text, "targets")


def test_a_changed_schema_default_makes_the_readme_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text(encoding="utf-8")
    changed = copy.deepcopy(schemas.load("config"))
    changed["properties"]["scratch"]["properties"]["quota"]["default"] = "80GiB"
    real = doc.load

    def load(name: str) -> dict[str, Any]:
        return changed if name == "config" else real(name)

    monkeypatch.setattr(doc, "load", load)
    assert doc.stale(text) == ["config"]
    assert "| `scratch.quota` | size | `80GiB` |" in block(doc.update(text), "config")


def test_a_hand_edited_table_is_stale_and_regenerated(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    original = doc.update(README.read_text(encoding="utf-8"))
    edited = original.replace("Lowest level of the messages logged.", "Anything goes.", 1)
    assert edited != original
    readme.write_text(edited, encoding="utf-8")
    assert doc.main(["--check", str(readme)]) == 1
    assert readme.read_text(encoding="utf-8") == edited  # --check changes nothing
    assert doc.main([str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == original
    assert doc.main(["--check", str(readme)]) == 0


def test_a_readme_without_a_block_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8").replace("<!-- END GENERATED userdata -->", ""))
    assert doc.main(["--check", str(readme)]) == 2
    assert "BEGIN GENERATED userdata" in capsys.readouterr().err


def test_refs_within_a_file_are_expanded_and_refs_to_another_file_are_one_row() -> None:
    service = doc.field_table("config")
    assert "| `sources.s3.endpoint_url` |" in service  # #/$defs/s3
    assert "| `hooks.points.<point>[].hook` | string | *required* |" in service  # #/$defs/hook
    user = doc.field_table("userdata")
    assert "| `hooks` | object |" in user
    assert "`hooks.points" not in user  # documented with the service configuration
    assert "| `limits.scratch.quota` | size | `50GiB` |" in user  # scalar: type and default of the target
