"""Docker cannot run here: check that the Dockerfile mirrors the README install and runs a real script."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_installs_requirements_and_runs_a_script():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY requirements\.txt", text, re.M)
    assert re.search(r"^RUN pip install --no-cache-dir -r requirements\.txt$", text, re.M)
    assert "pip install -r requirements.txt" in (ROOT / "README.md").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert command[0] == "python" and (ROOT / command[1]).is_file()
    assert "HF_TOKEN" not in re.sub(r"#.*", "", text)  # never baked into the image
