"""The bench scripts' one child-process set-up (``bench/child.py``): a measurement runs in a fresh process and its
result, its failure or its time limit comes back to the script that started it."""

from __future__ import annotations

import pytest

from bench.child import ChildFailed, run_child

#: a script as the bench scripts are written: its main serves --child with a measuring function
SCRIPT = """
import argparse, sys, time
from bench.child import add_child_option, peak_rss_mib, serve_child

def measure(spec):
    print("progress line", flush=True)
    if spec.get("fail"):
        raise ValueError("this row cannot be measured")
    time.sleep(spec.get("sleep", 0))
    return {"row": spec["row"], "peak_rss_mib": peak_rss_mib()}

def main():
    parser = argparse.ArgumentParser()
    add_child_option(parser)
    args = parser.parse_args()
    if args.child:
        return serve_child(args.child, measure)

if __name__ == "__main__":
    sys.exit(main())
"""


@pytest.fixture()
def script(tmp_path, monkeypatch) -> str:
    (tmp_path / "fake_bench_script.py").write_text(SCRIPT, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child finds it after the repository
    return "fake_bench_script"


def test_a_row_runs_in_its_own_process_and_its_result_comes_back(script, capsys):
    run = run_child(script, {"row": "a"}, echo=True)
    assert run.returncode == 0
    assert run.result["row"] == "a" and run.result["peak_rss_mib"] > 0
    assert "progress line" in capsys.readouterr().out  # echo: the child's progress is shown as it comes
    assert "progress line" in run.log


def test_a_failed_row_is_an_error_with_its_output_or_a_raised_child_failed(script):
    run = run_child(script, {"row": "a", "fail": True})
    assert run.returncode == 1 and "no result" in run.result["error"]
    assert "ValueError: this row cannot be measured" in run.log
    with pytest.raises(ChildFailed, match="this row cannot be measured"):
        run_child(script, {"row": "a", "fail": True}, check=True)


def test_a_row_past_its_time_limit_is_stopped(script):
    run = run_child(script, {"row": "a", "sleep": 60}, timeout=1, poll_s=0.2)
    assert run.result == {"error": "timed out after 1 s"} and run.returncode is None
    assert run.seconds < 30
