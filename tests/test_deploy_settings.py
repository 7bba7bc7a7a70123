"""Every GENQ_* variable a deployment file or its docs name is a setting of the code."""

from __future__ import annotations

import re

from common.settings import Settings
from tests.deploy_files import DEPLOY_FILES, ROOT


def test_every_genq_variable_in_the_deployment_files_is_a_setting() -> None:
    named = {
        (str(path.relative_to(ROOT)), name)
        for path in DEPLOY_FILES
        for name in re.findall(r"\bGENQ_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert len({name for _, name in named}) >= 10  # the scan finds them
    unknown = sorted((file, n) for file, n in named if n[5:].lower() not in Settings.model_fields)
    assert unknown == []
