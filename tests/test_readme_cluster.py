"""The README's "Scoring on a cluster" examples run as written, each as its own script from the project root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _section_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Scoring on a cluster\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


EXAMPLES = _section_examples()


def test_the_section_has_a_dask_and_a_ray_example():
    assert [("fastlstm.integrations.dask" in code, "fastlstm.integrations.ray" in code) for code in EXAMPLES] == [
        (True, False), (False, True)]


@pytest.mark.parametrize("engine,expected", [
    ("dask", r"\(2000, 50, 4\) -?\d\.\d+\n\(\d+, 5\)\n"),  # 5 columns: time and 4 outputs
    ("ray", r"(\d+ \(\d+, 64\) -> \(\d+, 4\)\n){3}"),
])
def test_readme_example_runs_as_written(engine, expected, tmp_path):
    pytest.importorskip({"dask": "distributed", "ray": "ray"}[engine])
    code = next(code for code in EXAMPLES if f"fastlstm.integrations.{engine}" in code)
    script = tmp_path / f"readme_{engine}.py"
    script.write_text(code, encoding="utf-8")
    # The engines' workers import fastlstm too: from this source tree, as the tests do.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(expected, done.stdout), done.stdout
