"""benchmarks/gpu_check.sh's step bookkeeping (benchmarks/gpu_steps.sh) with fake steps, and
bench_gpu_ask.py's agreement threshold: the GPU checks must be able to fail, and a step that ran
nothing must say SKIPPED, on a machine without a GPU too."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_steps(lines: str, tmp_path: Path) -> tuple[int, str]:
    script = tmp_path / "steps.sh"
    script.write_text(f"set -uo pipefail\nsource {REPO / 'benchmarks' / 'gpu_steps.sh'}\n{lines}\nsummary\n")
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout


def _verdicts(out: str) -> dict[str, str]:
    """step name -> ok / SKIPPED / FAILED, from the summary block."""
    verdicts = {}
    for line in out.split("=== gpu_check summary")[1].splitlines()[1:]:
        verdict, rest = line.split(None, 1)
        verdicts[rest.split(" (")[0]] = verdict
    return verdicts


def test_steps_are_passed_skipped_or_failed(tmp_path):
    rc, out = _run_steps("""
step "plain pass"      true
step "wrong answer"    bash -c 'echo "bench_gpu_ask: FAILED: fast_as_cpu_record 0/17 < 0.941"; exit 1'
step "all skipped"     printf '..\\n========== 3 skipped in 0.12s ==========\\n'
step "quiet skipped"   printf 'sss\\n1 skipped, 20 deselected in 5.01s\\n'
step "some passed"     printf '1 passed, 2 skipped in 1.00s\\n'
step "none collected"  bash -c 'echo "no tests ran in 0.01s"; exit 5'
step "bench skipped"   echo '{"benchmark": "gpu_ask", "skipped": "no CUDA GPU visible to torch"}'
step "bench ran"       echo '{"benchmark": "gpu_ask", "models": {}}'
""", tmp_path)
    assert _verdicts(out) == {"plain pass": "ok", "wrong answer": "FAILED", "all skipped": "SKIPPED",
                              "quiet skipped": "SKIPPED", "some passed": "ok", "none collected": "SKIPPED",
                              "bench skipped": "SKIPPED", "bench ran": "ok"}
    assert "SKIPPED bench skipped (no CUDA GPU visible to torch)" in out
    assert "SKIPPED all skipped (pytest: 3 skipped in 0.12s)" in out
    assert rc == 1  # a failed step fails the whole check


def test_exit_status_of_the_summary(tmp_path):
    assert _run_steps('step a true\nstep b true', tmp_path)[0] == 0
    assert _run_steps("step a true\nstep b printf '2 skipped in 0.1s\\n'", tmp_path)[0] == 3
    assert _run_steps("step a false\nstep b printf '2 skipped in 0.1s\\n'", tmp_path)[0] == 1


def test_a_real_pytest_run_that_skips_everything_is_skipped(tmp_path):
    (tmp_path / "test_gpu_only.py").write_text(
        "import pytest\n\ndef test_kernel():\n    pytest.skip('needs a CUDA GPU')\n")
    rc, out = _run_steps(f'step "gpu tests" {sys.executable} -m pytest {tmp_path / "test_gpu_only.py"} '
                         f'-q -rs -p no:cacheprovider -p no:randomly', tmp_path)
    assert _verdicts(out) == {"gpu tests": "SKIPPED"} and rc == 3
    assert "SKIPPED gpu tests (pytest: 1 skipped in" in out


def test_gpu_check_without_a_gpu_runs_nothing_and_fails():
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert p.returncode == 2 and "no CUDA GPU" in p.stderr


def test_bench_gpu_ask_fails_below_its_agreement_threshold():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_gpu_ask import below_threshold
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    good = {"questions": 17, "fast_as_cpu_record": 17, "reference_as_cpu_record": 16, "identical_answers": 16}
    assert below_threshold(good, 16 / 17) == []
    both_wrong_alike = {**good, "fast_as_cpu_record": 0, "reference_as_cpu_record": 0, "identical_answers": 17}
    assert below_threshold(both_wrong_alike, 16 / 17) == ["fast_as_cpu_record 0/17 < 0.941",
                                                           "reference_as_cpu_record 0/17 < 0.941"]
    assert below_threshold(None, 16 / 17) == []  # the demo was not among --models
