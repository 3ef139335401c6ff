"""The prompt-digest secret: created atomically once (0600, never seen half-written, one secret
however many processes start at once); an empty or unreadable one stops start-up clearly."""

from __future__ import annotations

import stat
import threading

import pytest
from click.testing import CliRunner

from tokenaudit.inference.audit import SECRET_FILE, DigestSecretError, PromptDigester


def test_created_once_private_and_complete(tmp_path):
    digester = PromptDigester.from_settings("", tmp_path)
    path = tmp_path / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text())) == 32
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE], "no temp file left behind"
    assert PromptDigester.from_settings("", tmp_path)("x") == digester("x")


def test_processes_starting_at_once_agree_on_one_secret(tmp_path):
    for round_ in range(5):
        folder = tmp_path / str(round_)
        barrier = threading.Barrier(8)
        digests: list[str] = []

        def start() -> None:
            barrier.wait()
            digests.append(PromptDigester.from_settings("", folder)("same prompt"))

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(digests) == 8 and len(set(digests)) == 1, "every process uses the one secret on disk"
        assert sorted(p.name for p in folder.iterdir()) == [SECRET_FILE]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ("not hex at all", "not hex"),
        ("abcd", "too short"),
    ],
)
def test_a_bad_secret_file_stops_start_up_with_a_clear_error(tmp_path, content, problem):
    (tmp_path / SECRET_FILE).write_text(content)
    with pytest.raises(DigestSecretError, match=problem) as err:
        PromptDigester.from_settings("", tmp_path)
    assert "TOKENAUDIT_PROMPT_DIGEST_SECRET" in str(err.value)


def test_an_unreadable_secret_stops_start_up(tmp_path):
    (tmp_path / SECRET_FILE).mkdir()  # unreadable as a file, whoever runs the test (root too)
    with pytest.raises(DigestSecretError, match="unreadable"):
        PromptDigester.from_settings("", tmp_path)


def test_serve_refuses_to_start_with_an_empty_secret(data_dir):
    from tokenaudit.cli import main

    data_dir.mkdir(parents=True)
    (data_dir / SECRET_FILE).write_text("")
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 1 and "prompt-digest secret" in result.output and "empty" in result.output
