"""Text files are read and written as UTF-8 whatever the locale.

Python's default text encoding is the locale's: ASCII on a machine or CI runner without a UTF-8 locale
(``LC_ALL=C`` with ``PYTHONUTF8=0``). The collection writes UTF-8 (``±`` in ``cv_summary.md``, class
names in users' metadata), so a text ``open``/``read_text``/``write_text`` without an explicit encoding
fails there with a ``UnicodeDecodeError`` that no UTF-8 machine shows (CI met it on ``cv_summary.md``).
"""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import REPO

#: owners of an ``open`` attribute that is not a text-file open (images, archives, browsers)
NOT_TEXT_OPEN = {"Image", "gzip", "tarfile", "zipfile", "h5py", "np", "os", "webbrowser", "io"}

ASCII_LOCALE = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def _mode(node: ast.AST | None) -> str | None:
    if node is None:
        return "r"
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def text_io_without_encoding(source: str) -> list[int]:
    """Line numbers of the text-mode file calls in ``source`` that name no encoding."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        f, mode = node.func, None
        keyword_mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
        if isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
            mode = "text"
        elif isinstance(f, ast.Name) and f.id == "open":
            mode = _mode(node.args[1] if len(node.args) > 1 else keyword_mode)
        elif isinstance(f, ast.Attribute) and f.attr == "open":
            if isinstance(f.value, ast.Name) and f.value.id in NOT_TEXT_OPEN:
                continue
            mode = _mode(node.args[0] if node.args else keyword_mode)  # Path.open(mode)
        if mode is not None and "b" not in mode:
            lines.append(node.lineno)
    return lines


def test_the_checker_finds_a_text_open_without_encoding():
    source = (
        "from pathlib import Path\n"
        "open('a.json')\n"  # 2: found
        "open('a.bin', 'rb')\n"
        "Path('a').read_text()\n"  # 4: found
        "Path('a').read_text(encoding='utf-8')\n"
        "Path('a').open('w')\n"  # 6: found
        "Image.open('a.png')\n"
        "open('b.txt', 'a+', encoding='utf-8')\n"
    )
    assert text_io_without_encoding(source) == [2, 4, 6]


def test_every_text_file_call_in_the_repo_names_utf8():
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, encoding="utf-8", check=True
    ).stdout.split()
    assert len(files) > 50  # the whole tree, not an empty listing
    missing = {f: n for f in files if (n := text_io_without_encoding((REPO / f).read_text(encoding="utf-8")))}
    assert not missing, f"text I/O without encoding='utf-8' (fails under an ASCII locale), file: lines {missing}"


def test_cv_summary_markdown_round_trips_under_an_ascii_locale(tmp_path):
    script = "\n".join(
        [
            "import locale, sys",
            "from pathlib import Path",
            "from custom.segmentation.metrics import summarize, summary_markdown",
            "from custom.utils import atomic_write",
            "assert 'utf' not in locale.getpreferredencoding(False).lower(), locale.getpreferredencoding(False)",
            "cases = [{'fold': 0, 'case': c, 'dice': [0.5], 'hd95': [3.0], 'nsd': [0.6]} for c in ('x', 'y')]",
            "out = Path(sys.argv[1])",
            "atomic_write(out, lambda f: f.write(summary_markdown(summarize(cases, ['liver'], 2.0))), mode='w')",
            "print(out.read_text(encoding='utf-8').count(chr(177)))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cv_summary.md")],
        cwd=REPO,
        env={**ASCII_LOCALE, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) >= 4  # the "±" cells were written as UTF-8 and read back
