"""The install's secrets: created once, atomically, readable by their owner only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from services.runtime.settings import Settings, read_or_create_secret

READ_SECRET = "import sys; from pathlib import Path; from services.runtime.settings import read_or_create_secret; " \
              "print(read_or_create_secret(Path(sys.argv[1])))"


def test_processes_starting_at_once_all_read_the_same_non_empty_secret(tmp_path: Path):
    target = tmp_path / "secret"
    processes = [subprocess.Popen([sys.executable, "-c", READ_SECRET, str(target)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(12)]
    values = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert len(values) == 1 and len(values.pop()) == 64
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"], "no temporary file is left behind"


def test_processes_starting_at_once_over_an_empty_secret_file_all_read_the_same_secret(tmp_path: Path):
    target = tmp_path / "secret"
    target.touch(mode=0o600)  # Left empty by an older Baton that crashed.
    processes = [subprocess.Popen([sys.executable, "-c", READ_SECRET, str(target)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(12)]
    values = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert len(values) == 1 and len(values.pop()) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["secret"], "no temporary file is left behind"


def test_an_empty_secret_file_is_filled_not_trusted(tmp_path: Path):
    target = tmp_path / "secret"
    target.touch(mode=0o600)
    # An empty file (an older Baton crashed between creating and writing it) is not a secret.
    value = read_or_create_secret(target)
    assert len(value) == 64
    assert read_or_create_secret(target) == value


def test_the_data_dir_is_made_private_even_if_it_existed_open(tmp_path: Path):
    data_dir = tmp_path / "baton"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    settings = Settings(data_dir=data_dir)
    token = settings.api_token_value()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "api-token").stat().st_mode) == 0o600
    assert settings.api_token_value() == token
