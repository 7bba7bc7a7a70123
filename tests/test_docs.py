from __future__ import annotations

from pathlib import Path

from common.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme() -> None:
    missing = [n for n in Settings.model_fields if f"`GENQ_{n.upper()}`" not in README]
    assert missing == []
